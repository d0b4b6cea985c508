"""`lowlm eval`: MMLU, C-Eval, CMMLU, TMMLU+, local multiple-choice sets, bits per character and
any lm-evaluation-harness task (`lowlm.evaluation.harness`), on one process or several.

Reads `eval` (tasks, model, batch size) and the run's newest model (or `eval.model`);
writes `eval/results.json`, `eval/results.md` and, with `log_samples`,
`eval/samples-<task>.jsonl` (one record per question). Prompts and scoring follow
lm-evaluation-harness; see `lowlm.evaluation`.
"""

from __future__ import annotations

import json
from pathlib import Path

from lowlm import __version__
from lowlm.config import LowlmConfig
from lowlm.data.heldout import with_heldout_text
from lowlm.errors import LowlmError
from lowlm.evaluation import harness
from lowlm.evaluation.benchmarks import BENCHMARKS
from lowlm.evaluation.ranks import Ranks, eval_ranks
from lowlm.evaluation.runners import (
    ceval_submission,
    run_multiple_choice,
    run_ppl,
    task_key,
)
from lowlm.evaluation.scoring import auto_batch_size
from lowlm.execute import StageRun, execute
from lowlm.graph import folder
from lowlm.models.load import load_for_inference, tokenizer_hash
from lowlm.rundir import atomic_dir

STAGE = "eval"
KNOWN_TASKS = [*BENCHMARKS, "mc", "ppl", "harness: <any lm-evaluation-harness task>"]


def markdown(results: dict) -> str:
    rows = [
        "| task | split | shots | n | acc (micro) | acc (macro) | acc_norm | bits/char |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results["tasks"].items():
        if r["task"] == "ppl":
            rows.append(f"| {name} | - | - | {r['lines']} | - | - | - | {r['bits_per_char']:.4f} |")
        elif r["task"] == "harness":
            rows.append(harness_row(name, r))
        elif r.get("submission"):
            rows.append(
                f"| {name} | {r['split']} | {r['shots']} | {r['n']} | (no public answers: "
                f"{r['submission_file']}) | - | - | - |"
            )
        else:
            rows.append(
                f"| {name} | {r['split']} | {r['shots']} | {r['n']} | {r['acc']:.4f} | "
                f"{r['acc_macro']:.4f} | {r['acc_norm']:.4f} | - |"
            )
    return "\n".join(rows) + "\n"


def harness_row(name: str, r: dict) -> str:
    """A harness task's line of results.md: acc and acc_norm where it has them, else its
    headline metric (every metric, with its stderr, is in results.json)."""
    metrics = r["metrics"]
    value = lambda m: f"{metrics[m]['value']:.4f}" if m in metrics else "-"  # noqa: E731
    headline = r["metric"]
    first = value("acc") if headline in (None, "acc") else f"{headline} {value(headline)}"
    return f"| {name} | harness | {r['shots']} | {r['n']} | {first} | - | {value('acc_norm')} | - |"


def _progress(total: int, name: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=name, unit="q", dynamic_ncols=True)


def run(config: LowlmConfig, force: bool = False) -> dict:
    cfg = config.eval
    if not cfg.tasks:
        raise LowlmError(
            f"no eval task is configured; add eval.tasks (known: {', '.join(KNOWN_TASKS)})."
        )
    for index, task in enumerate(with_heldout_text(cfg.tasks, folder(config, "tokenize"))):
        if task.harness:
            harness.require(f"eval.tasks[{index}] (harness: {task.harness})")
        if task.path and not Path(task.path).exists():
            if task.heldout:
                hint = "run `lowlm tokenize CONFIG` first: it writes the run's held-out text"
            elif task.name in ("ppl", "mc"):  # files of the user's own: no Hub copy
                hint = "fix the path"
            else:
                hint = "fix the path, or omit it to use the Hugging Face dataset"
            raise LowlmError(
                f"eval.tasks[{index}] ({task.name}): path {task.path} does not exist; {hint}."
            )
    # Under several processes every rank scores a share of each task (see evaluation.ranks).
    execute(config, STAGE, _work, force=force, accelerator=eval_ranks().state)
    return json.loads((folder(config, STAGE) / "results.json").read_text(encoding="utf-8"))


def _work(run: StageRun) -> dict:
    config, cfg = run.config, _with_heldout_text(run.config)
    source = run.plan.model
    if not source:
        raise LowlmError("there is no model to evaluate; set eval.model or run a stage first.")
    prepared, ranks = _prepare_harness(cfg), eval_ranks()
    model, tokenizer, card, batch_size, max_length = _load(config, source, prepared, ranks)
    results: dict = {
        "model": source,
        "model_key": run.parent_key(),
        "adapter": card.get("kind") == "adapter",
        "tokenizer_hash": tokenizer_hash(Path(source))
        if (Path(source) / "tokenizer.json").exists()
        else None,
        "vocab_size": len(tokenizer),
        "lowlm_version": __version__,
        "batch_size": batch_size,
        "max_length": max_length,
        "add_bos": cfg.add_bos,
        # How the scores were computed, so that a figure can be reproduced.
        "execution": {
            "device": str(next(model.parameters()).device),
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
            "batch_size": batch_size,
            "batch_size_auto": cfg.batch_size == "auto",
            "shared_prefix_cache": True,
            "batching": "longest first; one forward pass per question when every choice is "
            "one token",
            "tokenization": "one batched fast-tokenizer call per task",
            "processes": ranks.world,
        },
    }
    results["tasks"], samples_by_task, submissions = score_tasks(
        cfg, model, tokenizer, prepared, ranks, batch_size, max_length
    )
    if not ranks.is_main:
        return {"metrics": {}}
    # One artifact: results, table and samples appear together or not at all.
    with atomic_dir(run.folder) as out:
        if cfg.log_samples:
            for name, samples in samples_by_task.items():
                (out / f"samples-{name}.jsonl").write_text(
                    "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples),
                    encoding="utf-8",
                )
        for file_name, submission in submissions.items():
            (out / file_name).write_text(
                json.dumps(submission, indent=1, ensure_ascii=False) + "\n", encoding="utf-8"
            )
        (out / "results.json").write_text(
            json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        (out / "results.md").write_text(markdown(results), encoding="utf-8")
    metrics = {
        name: r.get(r.get("metric") or "acc", r.get("bits_per_char"))
        for name, r in results["tasks"].items()
        if not r.get("submission")
    }
    print(markdown(results), end="")
    print(f"eval: wrote {run.folder / 'results.json'}")
    return {"metrics": metrics}


def run_checkpoints(config: LowlmConfig) -> Path:
    """`lowlm eval --checkpoints`: eval.tasks on every checkpoint the newest pre-training stage
    saved and on its final model, recorded in eval-checkpoints/results.json (the report draws
    the curves)."""
    from lowlm.evaluation.checkpoints import checkpoint_points, headline, write_record

    cfg = _with_heldout_text(config)
    if not cfg.tasks:
        raise LowlmError("no eval task is configured; add eval.tasks to score checkpoints with.")
    stage, key, points = checkpoint_points(config)
    prepared, ranks = _prepare_harness(cfg), eval_ranks()
    scored = []
    for point in points:
        checkpoint = Path(point.checkpoint) if point.checkpoint else None
        model, tokenizer, _, batch_size, max_length = _load(
            config, str(folder(config, stage)), prepared, ranks, checkpoint
        )
        tasks, _, _ = score_tasks(cfg, model, tokenizer, prepared, ranks, batch_size, max_length)
        scored.append((point, tasks))
        if ranks.is_main:
            figures = ", ".join(f"{n} {headline(r)[1]:.4f}" for n, r in tasks.items())
            print(f"{stage} {point.label} ({point.tokens} tokens): {figures}")
    if not ranks.is_main:
        return folder(config, STAGE)
    path = write_record(config, stage, key, scored)
    print(f"eval: wrote {path}")
    return path


def _prepare_harness(cfg) -> dict:
    """Harness tasks built and their data loaded, before any model: a task that cannot run
    stops here."""
    return {
        index: harness.prepare(task, cfg.harness_include)
        for index, task in enumerate(cfg.tasks)
        if task.harness
    }


def _load(config: LowlmConfig, source: str, prepared: dict, ranks: Ranks, checkpoint=None):
    """(model, tokenizer, card, batch size, max length) of the model to score, on this rank's
    device."""
    cfg = config.eval
    model, tokenizer, card = load_for_inference(source, config.model, checkpoint)
    if ranks.state is not None:
        model = model.to(ranks.state.device)
    for task in prepared.values():
        harness.check_chat_template(task, tokenizer)
    max_length = cfg.max_length or getattr(model.config, "max_position_embeddings", 2048)
    batch_size = (
        cfg.batch_size
        if cfg.batch_size != "auto"
        else auto_batch_size(model, min(max_length, 1024))
    )
    return model, tokenizer, card, batch_size, max_length


def _with_heldout_text(config: LowlmConfig):
    """eval's section with `heldout: true` tasks pointed at the run's own held-out text."""
    tasks = with_heldout_text(config.eval.tasks, folder(config, "tokenize"))
    return config.eval.model_copy(update={"tasks": tasks})


def score_tasks(cfg, model, tokenizer, prepared, ranks, batch_size, max_length):
    """Every task of eval.tasks on `model`: (results, samples and submissions by task name);
    on the main rank only, under several processes."""
    tasks: dict = {}
    samples_by_task, submissions = {}, {}
    for index, task in enumerate(cfg.tasks):
        name = task_key(task, tasks)
        if task.harness:
            outcome = harness.evaluate(
                prepared[index], model, tokenizer, batch_size, cfg.max_length, cfg.add_bos
            )
            if outcome is not None:  # the main rank's
                tasks[name], samples_by_task[name] = outcome
        elif task.name == "ppl":
            tasks[name] = run_ppl(model, tokenizer, task, ranks)
        else:
            result, samples = run_multiple_choice(
                model, tokenizer, task, batch_size, max_length, cfg.add_bos, _progress, ranks
            )
            if result.get("submission"):
                result["submission_file"] = f"submission-{name}.json"
                submissions[result["submission_file"]] = ceval_submission(samples)
            tasks[name] = result
            samples_by_task[name] = samples
    return tasks, samples_by_task, submissions


def compare(first: Path, second: Path) -> str:
    """A side-by-side table of two results.json files, with the change."""
    loaded = []
    for path in (first, second):
        try:
            loaded.append(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError) as exc:
            raise LowlmError(f"cannot read results file {path}: {exc}") from None
    a, b = (r.get("tasks", {}) for r in loaded)
    rows = [
        f"| task | metric | {Path(first).parent.parent.name or first} | "
        f"{Path(second).parent.parent.name or second} | change |",
        "|---|---|---|---|---|",
    ]
    fmt = lambda v: f"{v:.4f}" if v is not None else "-"  # noqa: E731
    for name in [*a, *(k for k in b if k not in a)]:
        either = a.get(name) or b.get(name)
        for metric, left, right in _compared(either, a.get(name) or {}, b.get(name) or {}):
            change = f"{right - left:+.4f}" if left is not None and right is not None else "-"
            rows.append(f"| {name} | {metric} | {fmt(left)} | {fmt(right)} | {change} |")
    return "\n".join(rows) + "\n"


def _compared(
    either: dict, left: dict, right: dict
) -> list[tuple[str, float | None, float | None]]:
    """(metric, left, right) rows of one task: every metric of a harness task, else its one."""
    if either["task"] == "harness":
        names = [*left.get("metrics", {}), *right.get("metrics", {})]
        value = lambda r, m: (r.get("metrics", {}).get(m) or {}).get("value")  # noqa: E731
        return [(m, value(left, m), value(right, m)) for m in dict.fromkeys(names)]
    metric = "bits_per_char" if either["task"] == "ppl" else "acc"
    return [(metric, left.get(metric), right.get(metric))]
