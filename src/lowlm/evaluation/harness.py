"""lm-evaluation-harness tasks, run in-process on the model `lowlm eval` has loaded.

A `{harness: NAME}` task is the harness's own implementation: its task YAML, prompts,
metrics and aggregation. lowlm wraps the model and tokenizer it loaded (adapters merged, as
for the native tasks) in the harness's `HFLM` and calls the harness's `simple_evaluate`, so
the model is loaded once and every figure is what `lm_eval --model hf` reports for the
same weights. Under `accelerate launch` the harness splits the requests over the ranks
itself (its data-parallel path); lowlm only tells its HFLM the ranks, which the harness
leaves at one for a model passed in already loaded.

The stage key holds each task's configuration: the task's YAML as the harness resolves it
(includes merged), every task of a group or tag likewise, and the Python files their
`!function` entries name, so editing any of them makes eval stale.
"""

from __future__ import annotations

import copy
import difflib
import functools
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from lowlm.config import EvalConfig, EvalTask
from lowlm.errors import LowlmError
from lowlm.rundir import sha256_text

EXTRA = "pip install 'lowlm[harness]'"


def require(what: str):
    """The lm_eval module, or one line saying how to install it."""
    try:
        import lm_eval
    except ImportError:
        raise LowlmError(
            f"{what} needs lm-evaluation-harness, which is not installed; install the extra: "
            f"{EXTRA}"
        ) from None
    return lm_eval


@functools.lru_cache(maxsize=4)
def _cached_manager(include: tuple[str, ...], defaults: bool, stamp: tuple):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include) or None, include_defaults=defaults)


def _manager(include: tuple[str, ...], defaults: bool):
    """One index per process, rebuilt when a file in the user's folders changes."""
    stamp = tuple(
        (str(path), path.stat().st_mtime_ns, path.stat().st_size)
        for folder in include
        for path in sorted(Path(folder).rglob("*"))
        if path.is_file()
    )
    return _cached_manager(include, defaults, stamp)


def manager_for(name: str, include: list[str]):
    """The harness's TaskManager that knows `name`. The user's folders alone when they define
    the task and everything it refers to (indexing the harness's ~14,000 built-in names takes
    ~10 s); otherwise the built-in index too, the user's folders overriding it as in the
    harness."""
    require(f"harness task '{name}'")
    folders = []
    for folder in include:
        if not Path(folder).is_dir():
            raise LowlmError(f"eval.harness_include: folder {folder} does not exist.")
        folders.append(str(Path(folder).resolve()))
    if folders:
        local = _manager(tuple(folders), False)
        if name in local.task_index and _self_contained(local, name):
            return local
    full = _manager(tuple(folders), True)
    if name not in full.task_index:
        close = difflib.get_close_matches(name, full.all_tasks, n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else "`lm_eval ls tasks` lists them."
        raise LowlmError(f"unknown lm-evaluation-harness task or group '{name}'; {hint}")
    return full


def _references(items) -> list[str]:
    """Task, group and tag names a group's `task:` list refers to."""
    names = []
    for item in items if isinstance(items, list) else [items]:
        if isinstance(item, str):
            names.append(item)
        elif isinstance(item, dict) and "group" in item:
            names += _references(item.get("task", []))
        elif isinstance(item, dict) and isinstance(item.get("task"), str):
            names.append(item["task"])
    return names


def _children(manager, name: str) -> list[str]:
    from lm_eval.tasks._index import Kind

    entry = manager.task_index[name]
    if entry.kind is Kind.TAG:
        return sorted(entry.tags)
    if entry.kind is Kind.GROUP:
        return _references((entry.cfg or {}).get("task", []))
    return []


def _self_contained(manager, name: str, seen: frozenset = frozenset()) -> bool:
    if name not in manager.task_index:
        return False
    return all(
        _self_contained(manager, child, seen | {name})
        for child in _children(manager, name)
        if child not in seen and child != name
    )


def _code(config) -> dict[str, str]:
    """Content ids of the Python files a config's `!function` entries name (the harness
    indexes them as '<folder>/<module>.<function>')."""
    found = {}
    values = config.values() if isinstance(config, dict) else config
    for value in values:
        if isinstance(value, dict | list):
            found.update(_code(value))
        elif isinstance(value, str) and "/" in value and "." in value:
            module = Path(value.rpartition(".")[0] + ".py")
            if module.is_file():
                found[str(module)] = sha256_text(module.read_text(encoding="utf-8"))
    return found


def _resolved(manager, name: str, seen: frozenset) -> dict:
    entry = manager.task_index[name]
    children = [c for c in _children(manager, name) if c != name and c not in seen]
    return {
        "config": entry.cfg,
        "code": _code(entry.cfg or {}),
        "children": {
            child: _resolved(manager, child, seen | {name})
            for child in children
            if child in manager.task_index
        },
    }


def config_hash(manager, name: str) -> str:
    """A hash of everything that defines the task (see the module's docstring)."""
    resolved = _resolved(manager, name, frozenset())
    return sha256_text(json.dumps(resolved, sort_keys=True, ensure_ascii=False, default=str))


def stage_inputs(cfg: EvalConfig) -> dict[str, str]:
    """What the eval stage's key reads of its harness tasks: their configurations and the
    harness's version."""
    lm_eval = require("a harness task")
    inputs = {"harness:version": lm_eval.__version__}
    for index, task in enumerate(cfg.tasks):
        if task.harness:
            manager = manager_for(task.harness, cfg.harness_include)
            inputs[f"eval.tasks[{index}]:harness:{task.harness}"] = config_hash(
                manager, task.harness
            )
    return inputs


@dataclass
class Prepared:
    """A harness task built (its data loaded) and checked, before any model is loaded."""

    task: EvalTask
    manager: object
    loaded: dict  # TaskManager.load's {"tasks", "groups", "group_map"}
    config_hash: str

    @property
    def specs(self) -> list:
        """What simple_evaluate is given: the group or task object (not rebuilt), or a tag's
        tasks."""
        name = self.task.harness
        if name in self.loaded["groups"]:
            return [self.loaded["groups"][name]]
        if name in self.loaded["tasks"]:
            return [self.loaded["tasks"][name]]
        return list(self.loaded["tasks"].values())


def prepare(task: EvalTask, include: list[str]) -> Prepared:
    """Build the task and load its data; refuse, in one line, data that needs the Hub while
    it cannot be reached and a limit over a task's size."""
    name = task.harness
    manager = manager_for(name, include)
    try:
        loaded = manager.load([name])
    except ConnectionError as exc:
        raise LowlmError(
            f"harness task '{name}' needs its data from the Hugging Face Hub, which cannot be "
            f"reached ({exc}); run it once with a connection (the data is then cached), or "
            "point the task's YAML at local files."
        ) from None
    except Exception as exc:  # a task YAML or its code is broken: say which, in one line
        raise LowlmError(
            f"harness task '{name}': the harness cannot build it ({type(exc).__name__}: "
            f"{str(exc)[:300]})."
        ) from None
    if task.limit is not None:
        for leaf, built in loaded["tasks"].items():
            size = len(built.eval_docs)
            if task.limit > size:
                raise LowlmError(
                    f"harness task '{name}': limit {task.limit} is over the {size} questions "
                    f"of {leaf}; lower limit, or remove it to score them all."
                )
    return Prepared(task, manager, loaded, config_hash(manager, name))


def check_chat_template(prepared: Prepared, tokenizer) -> None:
    if prepared.task.chat_template and not getattr(tokenizer, "chat_template", None):
        generative = [
            leaf
            for leaf, built in prepared.loaded["tasks"].items()
            if built.OUTPUT_TYPE == "generate_until"
        ]
        kind = f"generative ({', '.join(generative[:3])})" if generative else "set"
        raise LowlmError(
            f"harness task '{prepared.task.harness}' is {kind} to run in the chat template "
            "(chat_template: true), but the model's tokenizer has none; add one to its "
            "tokenizer_config.json, or set chat_template: false."
        )


def _join_ranks(lm) -> None:
    """Under several processes, give the harness's HFLM the ranks (it assumes one process
    for a model passed in loaded), so that its evaluate() splits the requests over them."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    import torch
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    lm.accelerator = accelerator
    lm._rank, lm._world_size = accelerator.process_index, accelerator.num_processes


def evaluate(
    prepared: Prepared,
    model,
    tokenizer,
    batch_size: int,
    max_length: int | None,
    add_bos: bool,
) -> tuple[dict, list[dict]] | None:
    """Run the task through the harness on `model`; (result, samples) on the main rank,
    None on the others."""
    from lm_eval import __version__, simple_evaluate
    from lm_eval.models.huggingface import HFLM

    task = prepared.task
    # A copy: the harness may set the pad token, as it does on its own fresh tokenizer.
    lm = HFLM(
        pretrained=model,
        tokenizer=copy.deepcopy(tokenizer),
        batch_size=batch_size,
        max_length=max_length,
        add_bos_token=True if add_bos else None,
    )
    _join_ranks(lm)
    started = time.perf_counter()
    output = simple_evaluate(
        model=lm,
        tasks=prepared.specs,
        num_fewshot=task.shots,
        limit=task.limit,
        log_samples=True,
        apply_chat_template=task.chat_template,
        task_manager=prepared.manager,
    )
    seconds = time.perf_counter() - started
    if output is None:
        return None
    result = summarise(output, task.harness)
    result.update(
        task="harness",
        harness_task=task.harness,
        shots=task.shots,
        limit=task.limit,
        chat_template=task.chat_template,
        harness_version=__version__,
        config_hash=prepared.config_hash,
        processes=lm.world_size,  # the harness split the requests over these
        seconds=round(seconds, 2),
    )
    samples = [
        _sample(leaf, record)
        for leaf in output.get("samples", {})
        for record in output["samples"][leaf]
    ]
    return result, samples


def _metrics(row: dict) -> dict[str, dict]:
    """{metric: {value, stderr}} of one row of the harness's results ('acc,none' keys)."""
    found = {}
    for key, value in row.items():
        if "," not in key or "_stderr," in key or not isinstance(value, int | float):
            continue
        metric, filter_name = key.split(",", 1)
        stderr = row.get(f"{metric}_stderr,{filter_name}")
        label = metric if filter_name == "none" else key
        found[label] = {
            "value": value,
            "stderr": stderr if isinstance(stderr, int | float) else None,
        }
    return found


def summarise(output: dict, name: str) -> dict:
    """The results.json entry of a harness task: the headline (the task's or group's own
    row), every metric with its stderr, and each task's counts, version and shots."""
    rows = {**output.get("results", {}), **output.get("groups", {})}
    counts = output.get("n-samples", {})
    subtasks = {
        leaf: {
            "metrics": _metrics(rows.get(leaf, {})),
            "n": counts[leaf]["effective"],
            "n_original": counts[leaf]["original"],
            "version": output.get("versions", {}).get(leaf),
            "shots": output.get("n-shot", {}).get(leaf),
        }
        for leaf in counts
    }
    metrics = _metrics(rows.get(name, {}))
    if not metrics and len(subtasks) == 1:
        metrics = next(iter(subtasks.values()))["metrics"]
    headline = "acc" if "acc" in metrics else next(iter(metrics), None)
    result: dict = {
        "n": sum(s["n"] for s in subtasks.values()),
        "metric": headline,
        "metrics": metrics,
        "subtasks": subtasks,
        "groups": {g: _metrics(rows.get(g, {})) for g in output.get("group_subtasks", {})},
        "higher_is_better": output.get("higher_is_better", {}).get(name),
    }
    if headline:
        result[headline] = metrics[headline]["value"]
    return result


def _sample(leaf: str, record: dict) -> dict:
    """One question as lowlm's samples files hold it: the prediction is the highest-scoring
    choice of a multiple-choice task (its log-likelihoods in `scores`), else the filtered
    answer."""
    responses = record.get("filtered_resps", [])
    scored = [r for r in responses if isinstance(r, list | tuple) and r]
    sample = {"subject": leaf, "index": record["doc_id"], "target": record.get("target")}
    if len(scored) > 1 and len(scored) == len(responses):
        scores = [float(r[0]) for r in scored]
        sample["scores"] = scores
        sample["prediction"] = max(range(len(scores)), key=lambda i: scores[i])
    else:
        sample["prediction"] = responses[0] if len(responses) == 1 else responses
    for metric in record.get("metrics", []):
        sample[metric] = record.get(metric)
    return sample
