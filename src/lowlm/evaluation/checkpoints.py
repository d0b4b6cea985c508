"""Benchmark curves over training (`lowlm eval --checkpoints`): the checkpoints a pre-training
stage saved, the record of their scores, and the report's chart of them against the tokens
each had trained on (as TeenyTinyLlama plotted its benchmarks).

The record, `eval-checkpoints/results.json`, names the stage and its key, so a curve is never
shown for weights other than the stage's current ones; each point is one checkpoint (its
step, tokens and every eval task's result) plus the stage's final model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from lowlm.config import LowlmConfig
from lowlm.errors import LowlmError
from lowlm.graph import PRETRAIN_STAGES, STAGES, Graph, folder
from lowlm.rundir import atomic_write_json

FOLDER = "eval-checkpoints"
PRETRAIN = tuple(s.name for s in reversed(PRETRAIN_STAGES))  # newest first


@dataclass
class Point:
    label: str  # step-N, or final
    step: int
    tokens: int | None
    checkpoint: str | None  # its folder; None for the stage's final model


def checkpoint_points(config: LowlmConfig) -> tuple[str, str, list[Point]]:
    """(stage, its key, points) of the newest pre-training stage the config enables, which
    must be done with its current inputs."""
    stage = next((name for name in PRETRAIN if STAGES[name].enabled(config)), None)
    if stage is None:
        raise LowlmError(
            "--checkpoints scores the checkpoints of a pre-training stage, and this config "
            "trains none (pretrain.full, stage2 and stage1 have 0 steps)."
        )
    state = Graph(config).state(stage)
    if state.status != "done":
        raise LowlmError(
            f"--checkpoints reads {stage}, which is {state.status} ({state.reason or 'no run'}); "
            f"run `{STAGES[stage].command} CONFIG` first."
        )
    out = folder(config, stage)
    points = []
    for path in (out / "checkpoints").glob("step-*"):
        if (path / "state.json").is_file():
            saved = json.loads((path / "state.json").read_text(encoding="utf-8"))
            points.append(Point(path.name, saved["step"], saved.get("tokens"), str(path)))
    points.sort(key=lambda p: p.step)
    metrics = state.record.get("metrics") or {}
    points.append(Point("final", metrics.get("steps", 0), metrics.get("tokens"), None))
    return stage, state.plan.key, points


def write_record(config: LowlmConfig, stage: str, key: str, scored: list[tuple]) -> Path:
    """eval-checkpoints/results.json, written atomically; scored: (point, task results)."""
    path = config.run_dir / FOLDER / "results.json"
    atomic_write_json(
        path,
        {
            "stage": stage,
            "stage_key": key,
            "eval": config.eval.model_dump(mode="json"),
            "points": [{**asdict(p), "tasks": tasks} for p, tasks in scored],
        },
    )
    return path


def headline(result: dict) -> tuple[str | None, float | None]:
    """(metric, value) a task is plotted by: bits per character, or its headline metric."""
    if "bits_per_char" in result:
        return "bits/char", result["bits_per_char"]
    metric = result.get("metric") or "acc"
    return metric, result.get(metric)
