"""A run named by its config file or by its run directory: the directory holds the resolved
config its stages recorded (config.yaml), so `lowlm status runs/x` needs nothing else."""

from __future__ import annotations

from pathlib import Path

import yaml

from lowlm.config import LowlmConfig, load_config
from lowlm.errors import LowlmError

RECORDED_CONFIG = "config.yaml"  # written by every stage's start into the run directory


def load_target(
    target: Path, overrides: list[str] | None, command: str
) -> tuple[LowlmConfig, str | None]:
    """The config of `target` (a YAML config, or a run directory: its recorded config, with
    the run placed where the directory is) and a one-line note when a config file differs
    from the config its run directory recorded (`command`: the lowlm command, for the hint)."""
    target = Path(target).expanduser()
    if not target.exists():
        raise LowlmError(
            f"{target} does not exist; pass the run's YAML config or its run directory."
        )
    if target.is_dir():
        recorded = target / RECORDED_CONFIG
        if not recorded.is_file():
            raise LowlmError(
                f"{target} is a folder without {RECORDED_CONFIG}; pass a run directory (a stage "
                "has run there) or the run's YAML config."
            )
        config = load_config(recorded, overrides)
        if target.name in ("", ".", ".."):  # `lowlm status .` inside the run directory
            target = target.resolve()
        # The folder may have been moved or copied since: the run is where it is now.
        config.run.root, config.run.name = str(target.parent), target.name
        return config, None
    config = load_config(target, overrides)
    return config, _difference_note(config, target, command)


def _flatten(node: object, prefix: str = "") -> dict[str, object]:
    if not isinstance(node, dict):
        return {prefix: node}
    flat: dict[str, object] = {}
    for key, value in node.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _difference_note(config: LowlmConfig, source: Path, command: str) -> str | None:
    """One line naming the keys where `config` differs from the run's recorded config."""
    recorded = config.run_dir / RECORDED_CONFIG
    if not recorded.is_file():
        return None
    try:
        raw = yaml.safe_load(recorded.read_text(encoding="utf-8")) or {}
        previous = LowlmConfig.model_validate(raw).model_dump(mode="json")
    except (OSError, ValueError, yaml.YAMLError):  # pydantic's ValidationError is a ValueError
        return f"note: {recorded} cannot be read as a config; {source} is used as given."
    now, before = _flatten(config.model_dump(mode="json")), _flatten(previous)
    changed = [key for key in sorted(set(now) | set(before)) if now.get(key) != before.get(key)]
    if not changed:
        return None
    shown = ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
    return (
        f"note: {source} differs from the config {config.run_dir} recorded ({shown}); stages "
        f"are compared with {source}; `lowlm {command} {config.run_dir}` uses the recorded one."
    )


def results_file(path: Path) -> Path:
    """An eval results.json named directly, by its run directory or by its eval folder."""
    path = Path(path).expanduser()
    for candidate in (path / "eval" / "results.json", path / "results.json"):
        if path.is_dir() and candidate.is_file():
            return candidate
    if path.is_dir():
        raise LowlmError(
            f"{path} holds no eval/results.json; run `lowlm eval` for that run first, or pass "
            "a results.json."
        )
    return path
