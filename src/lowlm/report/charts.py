"""The report's charts: matplotlib (Agg) figures inlined as PNG data: URIs."""

from __future__ import annotations

import base64
import io
import json
import math
import time
from pathlib import Path

from lowlm.report.run import PRETRAIN, StageView, read_log, timestamp
from lowlm.report.text import fmt


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_uri(fig) -> str:
    """A figure as a data: URI (PNG), and the figure closed."""
    plt = pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def tokenizer_chart(report: dict) -> str | None:
    texts = report.get("texts") or {}
    labels = [k for k, v in texts.items() if isinstance(v, dict) and "after" in v]
    if not labels:
        return None
    plt = pyplot()
    curve = [
        row for row in report.get("compression_curve") or [] if finite(row.get("tokens_per_char"))
    ]
    ratios = [max(2, len(labels)), 2] + ([2] if curve else [])
    fig, axes = plt.subplots(
        1, len(ratios), figsize=(10 + 4 * bool(curve), 3.4), gridspec_kw={"width_ratios": ratios}
    )
    left, right = axes[0], axes[1]
    if curve:
        compression_curve(axes[2], curve)
    ticks = []
    for label in labels:  # the change in token count under each text's name
        change = texts[label].get("token_change")
        ticks.append(f"{label}\n{change:+.0%} tokens" if finite(change) else label)
    before_after_bars(
        left,
        ticks,
        [texts[k].get("before", {}).get("tokens_per_char") for k in labels],
        [texts[k]["after"].get("tokens_per_char", 0.0) for k in labels],
        ("base", "after"),
        "tokens per character",
        "tokens per character by text (lower is better)",
    )
    counts = [
        ("base vocabulary", report.get("base_vocab_size")),
        ("new tokens", report.get("new_tokens")),
        ("reachable new", report.get("reachable_new_tokens")),
    ]
    skipped = report.get("skipped_pieces") or {}
    counts += [(f"skipped: {k.replace('_', ' ')}", v) for k, v in skipped.items()]
    counts = [(k, v) for k, v in counts if isinstance(v, int)]
    bars = right.barh([k for k, _ in counts][::-1], [v for _, v in counts][::-1], color="#8250df")
    right.bar_label(bars, labels=[f"{v:,}" for _, v in counts][::-1], fontsize=8, padding=2)
    right.set_title("token counts")
    right.margins(x=0.25)
    right.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    return png_uri(fig)


def compression_curve(ax, curve: list[dict]) -> None:
    """Held-out tokens per character with only the first k new pieces, against k: where the
    curve flattens, more pieces buy little."""
    counts = [row["new_pieces"] for row in curve]
    ax.plot(counts, [row["tokens_per_char"] for row in curve], marker="o", color="#2da44e")
    ax.set_xscale("symlog", linthresh=max(1, min((c for c in counts if c), default=1)))
    ax.set_xlabel("new pieces kept (in training order)")
    ax.set_ylabel("held-out tokens per character")
    ax.set_title("compression against new pieces")
    ax.grid(alpha=0.3)


def before_after_bars(
    ax, ticks: list[str], before: list, after: list, names: tuple[str, str], ylabel: str, title: str
) -> None:
    """A figure per text before (left bar, drawn when any text has one) and after (green),
    each bar labelled with its value; `names` are the two bars' legend entries."""
    positions = list(range(len(ticks)))
    paired = any(b is not None for b in before)
    width, shift = (0.4, 0.2) if paired else (0.6, 0.0)
    if paired:
        bars = ax.bar(
            [p - shift for p in positions], [b or 0 for b in before], width, label=names[0]
        )
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
    bars = ax.bar([p + shift for p in positions], after, width, label=names[1], color="#2da44e")
    ax.bar_label(bars, fmt="%.3g", fontsize=8)
    ax.set_xticks(positions, ticks)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.margins(y=0.25)
    ax.legend(fontsize=8)


def heldout_chart(views: list[StageView]) -> str | None:
    """Held-out loss per character of the base, the resized model and each pre-training stage."""
    by_name = {v.name: v.metrics for v in views}
    points = []
    resize = by_name.get("resize", {})
    for key, label in (
        ("heldout_loss_per_char_base", "base"),
        ("heldout_loss_per_char_resized", "resized"),
    ):
        if isinstance(resize.get(key), int | float):
            points.append((label, float(resize[key])))
    for name in PRETRAIN:
        value = by_name.get(name, {}).get("heldout_loss_per_char")
        if isinstance(value, int | float):
            points.append((name.removeprefix("pretrain-"), float(value)))
    if not points:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(4.5, 1.3 * len(points)), 3.2))
    colours = ["#6e7781" if label == "base" else "#0969da" for label, _ in points]
    bars = ax.bar([p[0] for p in points], [p[1] for p in points], color=colours)
    ax.bar_label(bars, fmt="%.3g", fontsize=8)
    ax.set_ylabel("nats per character")
    ax.set_title("held-out loss per character (lower is better)")
    ax.margins(y=0.15)
    fig.tight_layout()
    return png_uri(fig)


def _times(view: StageView, log: list[dict]) -> list[float]:
    """Wall-clock time of each log line: its own `time`, else placed by its step within the
    stage's recorded span (logs written before lines carried a time)."""
    started = timestamp(view.record.get("started"))
    end = timestamp(view.record.get("finished")) if view.status != "running" else None
    end = end or time.time()
    start = end - view.seconds if view.seconds is not None else (started or end)
    steps = view.metrics.get("steps") or max((e["step"] for e in log), default=1)
    times = []
    for entry in log:
        if isinstance(entry.get("time"), int | float):
            times.append(float(entry["time"]))
        else:
            times.append(start + (end - start) * entry["step"] / max(steps, 1))
    return times


def training_chart(run_path: Path, views: list[StageView]) -> str | None:
    """Training and held-out loss of every pre-training stage on one wall-clock axis."""
    series = []
    for view in views:
        if view.name not in PRETRAIN:
            continue
        log = read_log(run_path, view.name)
        if log:
            series.append((view, log, _times(view, log)))
    if not series:
        return None
    starts = [t for v in views if (t := timestamp(v.record.get("started"))) is not None]
    origin = min([*starts, *(min(times) for _, _, times in series)])
    span = max(max(times) for _, _, times in series) - origin
    scale, unit = (60.0, "minutes") if span > 180 else (1.0, "seconds")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(10, 3.8))
    for index, (view, log, times) in enumerate(series):
        colour = f"C{index}"
        x = [(t - origin) / scale for t in times]
        train = [(xi, e["loss"]) for xi, e in zip(x, log, strict=True) if finite(e.get("loss"))]
        held = [
            (xi, e["eval_loss"]) for xi, e in zip(x, log, strict=True) if finite(e.get("eval_loss"))
        ]
        short = view.name.removeprefix("pretrain-")
        if train:
            ax.plot(
                *zip(*train, strict=True),
                color=colour,
                marker=".",
                markersize=5,
                label=f"{short} training",
            )
        if held:
            ax.plot(
                *zip(*held, strict=True),
                color=colour,
                linestyle="--",
                marker="o",
                markersize=4,
                label=f"{short} held-out",
            )
        if x:
            ax.axvspan(min(x), max(x), color=colour, alpha=0.06)
    ax.set_xlabel(f"{unit} since the run started")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title("pre-training loss, every stage on one time axis")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return png_uri(fig)


def sft_chart(run_path: Path) -> str | None:
    log = read_log(run_path, "sft")
    train = [(e["step"], e["loss"]) for e in log if finite(e.get("loss"))]
    held = [(e["step"], e["eval_loss"]) for e in log if finite(e.get("eval_loss"))]
    if not train and not held:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(10, 3.2))
    if train:
        ax.plot(*zip(*train, strict=True), color="C4", marker=".", label="training")
    if held:
        ax.plot(*zip(*held, strict=True), "--o", color="C4", markersize=4, label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("loss on response tokens")
    ax.set_title("instruction tuning (sft) loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return png_uri(fig)


def finite(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def headline_score(result: dict) -> tuple[str, float | None]:
    """(metric, value) of one task's result: accuracy, or bits per character for ppl."""
    if not isinstance(result, dict):
        return "", None
    if "bits_per_char" in result:
        return "bits/char", result.get("bits_per_char")
    metric = result.get("metric") or "acc"  # a harness task's headline metric
    return metric, result.get(metric)


def eval_charts(results: dict, baseline: dict | None) -> list[tuple[str, str]]:
    """(title, chart) pairs: one for the tasks' headline scores, one per-subject chart per
    benchmark task (this run beside the baseline when it has the task)."""
    tasks = results.get("tasks") or {}
    base_tasks = (baseline or {}).get("tasks") or {}
    charts = []
    plt = pyplot()
    for metric, title in (
        ("acc", "accuracy (higher is better)"),
        ("bits/char", "bits per character (lower is better)"),
    ):
        names = [
            n
            for n, r in tasks.items()
            if headline_score(r)[0] == metric and finite(headline_score(r)[1])
        ]
        if not names:
            continue
        fig, ax = plt.subplots(figsize=(max(3.5, 1.4 * len(names) + 1.5), 3.0))
        _paired_bars(
            ax,
            names,
            [headline_score(tasks[n])[1] for n in names],
            [headline_score(base_tasks.get(n, {}))[1] for n in names] if baseline else None,
        )
        ax.set_title(title)
        fig.tight_layout()
        charts.append((f"eval: {title}", png_uri(fig)))
    for name, result in tasks.items():
        subjects = result.get("subjects") if isinstance(result, dict) else None
        if not isinstance(subjects, dict) or not subjects:
            continue
        labels = sorted(subjects)
        ours = [subjects[s].get("acc") for s in labels]
        theirs = None
        base_subjects = (base_tasks.get(name) or {}).get("subjects") if baseline else None
        if isinstance(base_subjects, dict):
            theirs = [(base_subjects.get(s) or {}).get("acc") for s in labels]
        fig, ax = plt.subplots(figsize=(8, 0.9 + 0.24 * len(labels) * (2 if theirs else 1)))
        _paired_bars(ax, labels, ours, theirs, horizontal=True)
        ax.set_title(f"{name}: accuracy per subject")
        ax.set_xlim(0, 1)
        fig.tight_layout()
        charts.append((f"{name} per subject", png_uri(fig)))
    return charts


def _paired_bars(ax, labels, ours, theirs, horizontal: bool = False) -> None:
    positions = list(range(len(labels)))
    width = 0.4 if theirs else 0.7
    pairs = [("baseline", theirs, -width / 2, "#6e7781")] if theirs else []
    pairs.append(("this run", ours, width / 2 if theirs else 0.0, "#0969da"))
    for label, values, shift, colour in pairs:
        heights = [v if finite(v) else 0.0 for v in values]
        at = [p + shift for p in positions]
        if horizontal:
            bars = ax.barh(at, heights, width, label=label, color=colour)
        else:
            bars = ax.bar(at, heights, width, label=label, color=colour)
        ax.bar_label(bars, labels=[fmt(v) if finite(v) else "-" for v in values], fontsize=7)
    if horizontal:
        ax.set_yticks(positions, labels, fontsize=7)
        ax.invert_yaxis()
    else:
        ax.set_xticks(positions, labels, fontsize=8)
        ax.set_xlim(-0.75, len(labels) - 0.25)
        ax.margins(y=0.15)
    if theirs:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))


def checkpoint_curves_chart(run_path: Path, current_key: str | None) -> str | None:
    """One panel per task: its score against training tokens, over the checkpoints (None when
    nothing was recorded, or the record is of other weights than the stage's current ones)."""
    from lowlm.evaluation.checkpoints import FOLDER, headline

    path = run_path / FOLDER / "results.json"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("stage_key") != current_key:
        return None
    points = [p for p in record.get("points", []) if isinstance(p, dict)]
    names = list(dict.fromkeys(n for p in points for n in p.get("tasks", {})))
    if not names:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names) + 0.8, 3.0), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        drawn = [(p["tokens"], headline(p["tasks"][name])) for p in points if name in p["tasks"]]
        drawn = [(t, m, v) for t, (m, v) in drawn if isinstance(t, int) and v is not None]
        ax.plot([t for t, _, _ in drawn], [v for _, _, v in drawn], marker="o", color="#0969da")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("training tokens")
        ax.set_ylabel(drawn[0][1] if drawn else "")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{record['stage']}: benchmarks over training", fontsize=10)
    fig.tight_layout()
    return png_uri(fig)
