"""`lowlm eval`: MMLU, C-Eval, CMMLU, TMMLU+, local multiple-choice sets and bits per character.

Reads `eval` (tasks, model, batch size) and the run's newest model (or `eval.model`);
writes `eval/results.json`, `eval/results.md` and, with `log_samples`,
`eval/samples-<task>.jsonl` (one record per question). Prompts and scoring follow
lm-evaluation-harness; see `lowlm.evaluation`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections import defaultdict
from pathlib import Path

from lowlm import __version__
from lowlm.config import EvalTask, LowlmConfig
from lowlm.errors import LowlmError
from lowlm.evaluation.benchmarks import (
    BENCHMARKS,
    LETTERS,
    Question,
    build_context,
    load_hub,
    load_local,
    local_subjects,
)
from lowlm.evaluation.scoring import Request, auto_batch_size, score_requests
from lowlm.graph import StageRun, execute, folder
from lowlm.models.load import load_for_inference, tokenizer_hash
from lowlm.models.metrics import text_nll
from lowlm.rundir import atomic_dir

STAGE = "eval"
KNOWN_TASKS = [*BENCHMARKS, "mc", "ppl"]


def _questions(
    task: EvalTask,
) -> tuple[dict[str, list[Question]], dict[str, list[Question]], object]:
    """(eval questions by subject, few-shot pool by subject, benchmark) of a benchmark task."""
    benchmark = BENCHMARKS[task.name]
    split = task.split or benchmark.default_split
    fewshot_split = task.fewshot_split or benchmark.fewshot_split
    if task.name == "ceval" and split == "test":
        raise LowlmError("C-Eval's test answers are not public; evaluate split 'val'.")
    path = Path(task.path) if task.path else None
    if path is not None and not path.exists():
        raise LowlmError(f"{task.name}: path {path} does not exist.")
    subjects = local_subjects(benchmark, path, split) if path else list(benchmark.subjects)
    if task.subjects:
        unknown = [s for s in task.subjects if s not in subjects]
        if unknown:
            raise LowlmError(f"{task.name}: unknown or missing subjects {', '.join(unknown)}.")
        subjects = list(task.subjects)
    evaluated, pools = {}, {}
    for subject in subjects:
        load = (
            (lambda s, sp: load_local(benchmark, path, s, sp))
            if path
            else (lambda s, sp: load_hub(benchmark, s, sp))
        )
        evaluated[subject] = load(subject, split)[: task.limit]
        if task.shots:
            try:
                pools[subject] = load(subject, fewshot_split)[: task.shots]
            except LowlmError:
                if task.name != "tmmluplus":
                    raise
                pools[subject] = load(subject, "dev")[: task.shots]  # the harness's copy
        else:
            pools[subject] = []
    return evaluated, pools, benchmark


def _mc_questions(task: EvalTask) -> dict[str, list[Question]]:
    """A local CSV (with header) or JSONL multiple-choice file, with configurable fields."""
    if not task.path or not Path(task.path).is_file():
        raise LowlmError(f"mc: path {task.path!r} is not a file; point it at a .csv or .jsonl.")
    path, fields = Path(task.path), task.fields
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.split("\n"), start=1):
            if line.strip():
                try:
                    rows.append((number, json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise LowlmError(f"{path}:{number}: not valid JSON ({exc.msg}).") from None
    else:
        rows = [
            (number, row) for number, row in enumerate(csv.DictReader(io.StringIO(text)), start=2)
        ]
    by_subject: dict[str, list[Question]] = defaultdict(list)
    for index, (number, row) in enumerate(rows):
        try:
            choices = [str(row[name]) for name in fields.choices]
            question = str(row[fields.question])
            raw_answer = str(row[fields.answer]).strip()
        except KeyError as exc:
            raise LowlmError(f"{path}:{number}: no field {exc}; set the task's fields.") from None
        letters = LETTERS[: len(choices)]
        answer = (
            letters[int(raw_answer)]
            if raw_answer.isdigit() and int(raw_answer) < len(letters)
            else raw_answer
        )
        if answer not in letters:
            raise LowlmError(
                f"{path}:{number}: answer {raw_answer!r} is not one of {', '.join(letters)}."
            )
        subject = str(row.get(fields.subject, "all")) if fields.subject else "all"
        by_subject[subject].append(Question(subject, index, question, choices, answer))
    if not by_subject:
        raise LowlmError(f"{path} holds no question.")
    return dict(by_subject)


def _aggregate(samples: list[dict], categories: dict[str, str]) -> dict:
    per_subject: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for sample in samples:
        tally = per_subject[sample["subject"]]
        tally[0] += sample["correct"]
        tally[1] += sample["correct_norm"]
        tally[2] += 1
    subjects = {
        s: {"acc": c / n, "acc_norm": cn / n, "n": n} for s, (c, cn, n) in per_subject.items()
    }
    total = sum(v["n"] for v in subjects.values())
    by_category: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for subject, (correct, _, n) in per_subject.items():
        category = categories.get(subject, "other")
        by_category[category][0] += correct
        by_category[category][1] += n
    return {
        "acc": sum(v["acc"] * v["n"] for v in subjects.values()) / total,
        "acc_norm": sum(v["acc_norm"] * v["n"] for v in subjects.values()) / total,
        "acc_macro": sum(v["acc"] for v in subjects.values()) / len(subjects),
        "n": total,
        "subjects": subjects,
        "categories": {c: {"acc": k / n, "n": n} for c, (k, n) in sorted(by_category.items())},
    }


def run_multiple_choice(
    model,
    tokenizer,
    task: EvalTask,
    batch_size: int,
    max_length: int,
    add_bos: bool,
    progress_factory,
) -> tuple[dict, list[dict]]:
    if task.name == "mc":
        evaluated = _mc_questions(task)
        pools = {s: [] for s in evaluated}
        if task.shots:  # mc: the first n questions of each subject are the examples
            pools = {s: qs[: task.shots] for s, qs in evaluated.items()}
            evaluated = {s: qs[task.shots :] for s, qs in evaluated.items()}
        describe, cue, categories = (lambda s: task.description), task.answer_cue, {}
        split = "file"
    else:
        evaluated, pools, benchmark = _questions(task)
        describe, cue = benchmark.description, benchmark.answer_cue
        categories, split = benchmark.subjects, task.split or benchmark.default_split
    questions = [q for qs in evaluated.values() for q in qs]
    requests = []
    for q in questions:
        context = build_context(describe(q.subject), pools[q.subject], q, cue)
        if task.chat_template:
            context = tokenizer.apply_chat_template(
                [{"role": "user", "content": context}], tokenize=False, add_generation_prompt=True
            )
        requests.append(Request(context, [f" {letter}" for letter in LETTERS[: len(q.choices)]]))
    progress = progress_factory(len(requests), task.name)
    started = time.perf_counter()
    scores = score_requests(model, tokenizer, requests, batch_size, max_length, add_bos, progress)
    seconds = time.perf_counter() - started
    progress.close()
    samples = []
    for q, lls in zip(questions, scores, strict=True):
        letters = LETTERS[: len(lls)]
        prediction = letters[max(range(len(lls)), key=lambda i: lls[i])]
        lengths = [len(letter) for letter in letters]  # the harness normalises by choice length
        normalised = letters[max(range(len(lls)), key=lambda i: lls[i] / lengths[i])]
        samples.append(
            {
                "subject": q.subject,
                "index": q.index,
                "target": q.answer,
                "prediction": prediction,
                "scores": lls,
                "correct": int(prediction == q.answer),
                "correct_norm": int(normalised == q.answer),
            }
        )
    result = _aggregate(samples, categories)
    result.update(
        task=task.name,
        split=split,
        shots=task.shots,
        seconds=round(seconds, 2),
        questions_per_s=round(len(samples) / max(seconds, 1e-9), 2),
        template="lm-evaluation-harness" + (" + chat template" if task.chat_template else ""),
        fewshot="first_n" if task.shots else None,
        aggregation="acc: micro (questions, as the harness's groups); acc_macro: mean of subjects",
        example_prompt=requests[0].context if requests else None,
    )
    return result, samples


def run_ppl(model, tokenizer, task: EvalTask) -> dict:
    if not task.path or not Path(task.path).is_file():
        raise LowlmError(f"ppl: path {task.path!r} is not a file; point it at a text file.")
    try:
        lines = [
            line for line in Path(task.path).read_text(encoding="utf-8").split("\n") if line.strip()
        ]
    except UnicodeDecodeError as exc:
        raise LowlmError(f"{task.path} is not UTF-8 ({exc}).") from None
    if not lines:
        raise LowlmError(f"{task.path} holds no text.")
    started = time.perf_counter()
    nll, chars, tokens = text_nll(model, tokenizer, lines)
    return {
        "task": "ppl",
        "path": task.path,
        "lines": len(lines),
        "chars": chars,
        "tokens": tokens,
        "bits_per_char": nll / chars / math.log(2),
        "nats_per_char": nll / chars,
        "token_perplexity": math.exp(nll / tokens),
        "chars_per_token": chars / tokens,
        "seconds": round(time.perf_counter() - started, 2),
    }


def markdown(results: dict) -> str:
    rows = [
        "| task | split | shots | n | acc (micro) | acc (macro) | acc_norm | bits/char |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results["tasks"].items():
        if r["task"] == "ppl":
            rows.append(f"| {name} | - | - | {r['lines']} | - | - | - | {r['bits_per_char']:.4f} |")
        else:
            rows.append(
                f"| {name} | {r['split']} | {r['shots']} | {r['n']} | {r['acc']:.4f} | "
                f"{r['acc_macro']:.4f} | {r['acc_norm']:.4f} | - |"
            )
    return "\n".join(rows) + "\n"


def _task_key(task: EvalTask, taken: dict) -> str:
    key = (
        f"{task.name}_{task.shots}shot"
        if task.name != "ppl"
        else f"ppl_{Path(task.path or '').stem}"
    )
    return key if key not in taken else f"{key}_{len(taken)}"


def _progress(total: int, name: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=name, unit="q", dynamic_ncols=True)


def run(config: LowlmConfig, force: bool = False) -> dict:
    cfg = config.eval
    if not cfg.tasks:
        raise LowlmError(
            f"no eval task is configured; add eval.tasks (known: {', '.join(KNOWN_TASKS)})."
        )
    for index, task in enumerate(cfg.tasks):
        if task.path and not Path(task.path).exists():
            raise LowlmError(
                f"eval.tasks[{index}] ({task.name}): path {task.path} does not exist; fix the "
                "path, or omit it to use the Hugging Face dataset."
            )
    execute(config, STAGE, _work, force=force)
    return json.loads((folder(config, STAGE) / "results.json").read_text(encoding="utf-8"))


def _work(run: StageRun) -> dict:
    config, cfg = run.config, run.config.eval
    source = run.plan.model
    if not source:
        raise LowlmError("there is no model to evaluate; set eval.model or run a stage first.")
    model, tokenizer, card = load_for_inference(source, config.model)
    max_length = cfg.max_length or getattr(model.config, "max_position_embeddings", 2048)
    batch_size = (
        cfg.batch_size
        if cfg.batch_size != "auto"
        else auto_batch_size(model, min(max_length, 1024))
    )
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
        "tasks": {},
    }
    samples_by_task = {}
    for task in cfg.tasks:
        name = _task_key(task, results["tasks"])
        if task.name == "ppl":
            results["tasks"][name] = run_ppl(model, tokenizer, task)
        else:
            result, samples = run_multiple_choice(
                model, tokenizer, task, batch_size, max_length, cfg.add_bos, _progress
            )
            results["tasks"][name] = result
            samples_by_task[name] = samples
    # One artifact: results, table and samples appear together or not at all.
    with atomic_dir(run.folder) as out:
        if cfg.log_samples:
            for name, samples in samples_by_task.items():
                (out / f"samples-{name}.jsonl").write_text(
                    "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples),
                    encoding="utf-8",
                )
        (out / "results.json").write_text(
            json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        (out / "results.md").write_text(markdown(results), encoding="utf-8")
    metrics = {name: r.get("acc", r.get("bits_per_char")) for name, r in results["tasks"].items()}
    print(markdown(results), end="")
    print(f"eval: wrote {run.folder / 'results.json'}")
    return {"metrics": metrics}


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
    for name in [*a, *(k for k in b if k not in a)]:
        metric = "bits_per_char" if (a.get(name) or b.get(name))["task"] == "ppl" else "acc"
        left, right = (a.get(name) or {}).get(metric), (b.get(name) or {}).get(metric)
        change = f"{right - left:+.4f}" if left is not None and right is not None else "-"
        fmt = lambda v: f"{v:.4f}" if v is not None else "-"  # noqa: E731
        rows.append(f"| {name} | {metric} | {fmt(left)} | {fmt(right)} | {change} |")
    return "\n".join(rows) + "\n"
