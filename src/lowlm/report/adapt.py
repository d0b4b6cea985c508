"""The report's adaptation figures, from the pre-training stages' records: what each stage did
to the held-out target text and to the base language (nats per character before and after:
the drift), and, with `lowlm report --baseline RUN_DIR`, the run's held-out curve against
training FLOPs and characters beside the baseline run's (e.g. plain LoRA on the base
tokenizer), with each stage's before / after against the base model's figure."""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from lowlm.errors import LowlmError
from lowlm.graph import PRETRAIN_STAGES

PRETRAIN = tuple(s.name for s in PRETRAIN_STAGES)
MANIFEST = "manifest.json"


@dataclass
class HeldoutCurve:
    """One run's held-out nats per character against its cumulative training budget."""

    label: str
    base: float | None  # the base model on the same held-out lines
    points: list[tuple[float, float, float]] = field(default_factory=list)  # flops, chars, nats
    stages: list[tuple[str, float, float]] = field(default_factory=list)  # name, before, after


def baseline_run(path: Path | None) -> Path | None:
    """`--baseline` as a run directory (None when it is a results.json or not given)."""
    if path is None or not Path(path).is_dir():
        return None
    if not (Path(path) / MANIFEST).is_file():
        raise LowlmError(
            f"--baseline {path} is a folder without {MANIFEST}; pass a run directory of lowlm "
            "(e.g. runs/plain) or an eval/results.json."
        )
    return Path(path)


def _records(run_path: Path) -> dict:
    try:
        return json.loads((run_path / MANIFEST).read_text(encoding="utf-8")).get("stages") or {}
    except (OSError, ValueError):
        return {}


def _done_metrics(records: dict, name: str) -> dict:
    record = records.get(name) or {}
    return (record.get("metrics") or {}) if record.get("status") == "done" else {}


def _log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            continue  # a line cut by a kill
    return entries


def heldout_curve(run_path: Path, label: str) -> HeldoutCurve:
    """The curve from each done pre-training stage: its before and after figures and, between
    them, every logged `eval/ppl_heldout` (a ppl eval task on the held-out lines). FLOPs are the
    stage's own count; characters are tokens x the held-out text's characters per token."""
    records = _records(run_path)
    base = _done_metrics(records, "resize").get("heldout_loss_per_char_base")
    from_base = "resize" not in records and "init" not in records  # stages start on model.base
    curve = HeldoutCurve(label, base)
    flops = chars = 0.0
    for name in PRETRAIN:
        metrics = _done_metrics(records, name)
        before = (metrics.get("loss_per_char_before") or {}).get("heldout")
        after = (metrics.get("loss_per_char_after") or {}).get("heldout")
        if before is None or after is None or not metrics.get("steps"):
            continue
        if curve.base is None and from_base and not curve.stages:
            curve.base = before  # the base model itself (LoRA starts at zero)
        per_step = metrics.get("training_flops", 0.0) / metrics["steps"]
        chars_per_token = metrics.get("heldout_chars_per_token", math.nan)  # NaN: not plotted
        chars_per_step = metrics["tokens"] / metrics["steps"] * chars_per_token
        curve.points.append((flops, chars, before))
        for entry in _log(run_path / name / "log.jsonl"):
            bits = entry.get("eval/ppl_heldout")
            if isinstance(bits, int | float) and math.isfinite(bits):
                step = entry["step"]
                point = (flops + step * per_step, chars + step * chars_per_step, bits * math.log(2))
                curve.points.append(point)
        flops += metrics.get("training_flops", 0.0)
        chars += metrics["tokens"] * chars_per_token
        curve.points.append((flops, chars, after))
        curve.stages.append((name, before, after))
    return curve


def drift_rows(run_path: Path) -> list[tuple[str, str, float, float]]:
    """(stage, text, before, after) for every text each done stage scored (held-out, and the
    tokenize.eval_texts files: the base language's drift)."""
    records = _records(run_path)
    rows = []
    for name in PRETRAIN:
        metrics = _done_metrics(records, name)
        before = metrics.get("loss_per_char_before") or {}
        after = metrics.get("loss_per_char_after") or {}
        rows += [(name, text, before[text], after[text]) for text in before if text in after]
    return rows


def _table(head: list[str], rows: list[list[str]]) -> str:
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join(
        "<tr>" + "".join(f"<td class='num'>{html.escape(c)}</td>" for c in row) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>"


def drift_table(run_path: Path) -> str | None:
    rows = drift_rows(run_path)
    if not rows:
        return None
    return _table(
        ["stage", "text", "before (nats/char)", "after", "change"],
        [
            [stage.removeprefix("pretrain-"), text, f"{b:.4f}", f"{a:.4f}", f"{a / b - 1:+.2%}"]
            for stage, text, b, a in rows
        ],
    )


def stages_table(curves: list[HeldoutCurve]) -> str:
    """Held-out figures before and after each stage, against each run's base figure."""
    rows = []
    for curve in curves:
        base = curve.base
        rows.append([curve.label, "base model", "-", f"{base:.4f}" if base else "-", "1.000"])
        for name, before, after in curve.stages:
            ratio = f"{after / base:.3f}" if base else "-"
            rows.append(
                [
                    curve.label,
                    name.removeprefix("pretrain-"),
                    f"{before:.4f}",
                    f"{after:.4f}",
                    ratio,
                ]
            )
    head = ["run", "stage", "before (nats/char)", "after", "after / base"]
    return _table(head, rows)


def comparison_chart(curves: list[HeldoutCurve]) -> str | None:
    """Held-out nats per character against training FLOPs (left) and characters (right)."""
    if not any(c.points for c in curves):
        return None
    from lowlm.report.charts import png_uri, pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for index, curve in enumerate(curves):
        if not curve.points:
            continue
        colour = f"C{index}"
        for ax, column in ((axes[0], 0), (axes[1], 1)):
            xs = [p[column] for p in curve.points]
            ax.plot(xs, [p[2] for p in curve.points], marker="o", color=colour, label=curve.label)
            if curve.base is not None:
                ax.axhline(curve.base, color=colour, linestyle=":", alpha=0.7)
    for ax, label in ((axes[0], "training FLOPs"), (axes[1], "training characters (estimated)")):
        ax.set_xlabel(label)
        ax.set_ylabel("held-out nats per character")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[0].set_title("held-out loss per character (dotted: each run's base)", fontsize=9)
    fig.tight_layout()
    return png_uri(fig)


def adaptation_sections(run_path: Path, baseline: Path | None) -> list[str]:
    """The report's HTML for this: the drift table, and with a baseline run the comparison."""
    from lowlm.report.html import img_tag

    parts = []
    drift = drift_table(run_path)
    if drift:
        parts += [
            "<h2 id='drift'>What each stage did, per text</h2>",
            "<p>Nats per character before and after each pre-training stage on the held-out "
            "lines and on each <code>tokenize.eval_texts</code> file: a rise on the base "
            "language is forgetting.</p>",
            drift,
        ]
    if baseline is None:
        return parts
    curves = [heldout_curve(run_path, "this run"), heldout_curve(baseline, baseline.name)]
    parts += [
        "<h2 id='baseline'>Against the baseline run</h2>",
        f"<p>This run beside {html.escape(str(baseline))}: held-out nats per character at "
        "each stage's start and end (and at each logged <code>ppl</code> eval of the held-out "
        "lines) against the training FLOPs the loop counts and the characters trained on "
        "(tokens x the held-out text's characters per token). Both runs' held-out lines "
        "come from the same rule; compare them only when both used the same corpus, "
        "data.heldout_fraction and run.seed.</p>",
        img_tag(comparison_chart(curves), "held-out curve against the baseline run"),
        stages_table(curves),
    ]
    return parts
