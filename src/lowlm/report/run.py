"""What the report reads from the run directory: each stage's state and record, logs, a
baseline's results. Nothing is re-run and no model is loaded.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from lowlm.errors import LowlmError
from lowlm.graph import ORDER, PRETRAIN_STAGES, STAGES, Graph

PRETRAIN = tuple(s.name for s in PRETRAIN_STAGES)


@dataclass
class StageView:
    name: str
    status: str
    reason: str
    in_config: bool
    record: dict = field(default_factory=dict)

    @property
    def metrics(self) -> dict:
        return self.record.get("metrics") or {}

    @property
    def seconds(self) -> float | None:
        """The stage's time: recorded when it finished, else since it started."""
        if isinstance(self.record.get("seconds"), int | float):
            return float(self.record["seconds"])
        started = timestamp(self.record.get("started"))
        if started is None:
            return None
        end = timestamp(self.record.get("finished")) if self.status != "running" else None
        return max(0.0, (end or time.time()) - started)


def stage_views(graph: Graph) -> list[StageView]:
    """Every stage the config builds or the manifest records, in the graph's order."""
    enabled, recorded = graph.enabled(), graph.manifest()
    views = []
    for name in ORDER:
        if name not in enabled and name not in recorded:
            continue
        state = graph.state(name)
        views.append(StageView(name, state.status, state.reason, name in enabled, state.record))
    return views


def timestamp(value) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S%z").timestamp()
    except ValueError:
        return None


def read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_log(run_path: Path, name: str) -> list[dict]:
    """A training stage's log.jsonl: the finished folder's, else the one being written."""
    folder = STAGES[name].folder
    for path in (run_path / folder / "log.jsonl", run_path / f".{folder}.train" / "log.jsonl"):
        if path.is_file():
            lines = []
            for line in path.read_text(encoding="utf-8").split("\n"):
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue  # an empty or half-written last line
                if isinstance(entry, dict) and isinstance(entry.get("step"), int):
                    lines.append(entry)
            return lines
    return []


def read_baseline(path: Path | None) -> dict | None:
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        raise LowlmError(
            f"--baseline {path} does not exist; pass a results.json of lowlm eval or a run "
            "directory."
        )
    data = read_json(path)
    if data is None or not isinstance(data.get("tasks"), dict):
        raise LowlmError(f"--baseline {path} is not a results.json of lowlm eval (no 'tasks').")
    return data
