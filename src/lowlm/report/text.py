"""Numbers as text: the key figures of each stage, energy, and the short table `lowlm run`
prints when a stage finishes (no matplotlib).
"""

from __future__ import annotations

import math

from lowlm.config import LowlmConfig
from lowlm.graph import Graph
from lowlm.report.run import PRETRAIN, stage_views

# The figures worth a glance per stage (metric, label); every metric is in the details below.
_PRETRAIN_KEYS = [
    ("loss", "loss"),
    ("eval_loss", "held-out loss"),
    ("eval_ppl", "held-out ppl"),
    ("heldout_loss_per_char", "held-out loss/char"),
    ("steps", "steps"),
    ("tokens", "tokens"),
    ("tokens_per_s", "tokens/s"),
    ("mfu", "MFU"),
    ("skipped_steps", "skipped steps"),
]
KEY_FIGURES = {
    "tokenize": [
        ("vocab_size", "vocabulary"),
        ("new_tokens", "new tokens"),
        ("reachable_new_tokens", "reachable new"),
    ],
    "resize": [
        ("new_tokens", "new rows"),
        ("init", "init"),
        ("heldout_loss_per_char_base", "held-out loss/char, base"),
        ("heldout_loss_per_char_resized", "held-out loss/char, resized"),
    ],
    **{name: _PRETRAIN_KEYS for name in PRETRAIN},
    "export": [("max_logit_diff", "max logit diff"), ("dtype", "dtype")],
    "sft": [
        ("loss", "loss"),
        ("eval_loss", "held-out loss"),
        ("steps", "steps"),
        ("examples", "examples"),
        ("truncated", "truncated"),
        ("dropped", "dropped"),
        ("heldout_text_excluded", "held-out text excluded"),
    ],
}


def fmt(value, key: str = "") -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if key == "mfu":
            return f"{value:.1%}"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.4g}"
    if value is None:
        return "-"
    return str(value)


def fmt_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {rest} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def key_figures(name: str, metrics: dict) -> list[tuple[str, str]]:
    """(label, value) of the figures worth a glance for a stage."""
    figures = [
        (label, fmt(metrics[k], k)) for k, label in KEY_FIGURES.get(name, []) if k in metrics
    ]
    if name == "tokenize":
        for key, value in metrics.items():
            if key.endswith(".chars_per_token"):
                figures.append((f"chars/token {key.split('.')[0]}", fmt(value)))
    if name not in KEY_FIGURES:  # eval, init: every plain figure
        figures = [
            (key, fmt(value, key))
            for key, value in metrics.items()
            if isinstance(value, int | float | str | bool)
        ][:12]
    return figures


def energy_text(record: dict) -> str:
    energy = record.get("energy")
    if not isinstance(energy, dict):
        return "-"
    if not energy.get("measured"):
        return f"not measured: {energy.get('reason', 'no reason recorded')}"
    method = energy.get("method") or {}
    how = "; ".join(f"{k}: {v}" for k, v in method.items()) if isinstance(method, dict) else method
    return f"{fmt(energy.get('kwh'))} kWh, {fmt(energy.get('kg_co2'))} kg CO2 ({how})"


def stage_summary(config: LowlmConfig, name: str) -> str:
    """The short table printed when a stage finishes: status, time, key figures, energy."""
    view = next((v for v in stage_views(Graph(config)) if v.name == name), None)
    if view is None:
        return f"{name}: not configured and never run."
    # Not "name: ...": stages print their own "name: ..." lines, which callers count.
    head = f"{name} {view.status}" + (f" ({fmt_seconds(view.seconds)})" if view.seconds else "")
    rows = key_figures(name, view.metrics)
    if view.reason:
        rows.insert(0, ("reason", view.reason))
    energy = energy_text(view.record)
    if energy != "-":
        rows.append(("energy", energy))
    width = max((len(label) for label, _ in rows), default=0)
    rule = "-" * max(len(head), 40)
    lines = [rule, head, rule, *(f"  {label:<{width}}  {value}" for label, value in rows)]
    return "\n".join(lines)
