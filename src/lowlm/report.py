"""`lowlm report`: one self-contained HTML page of a run, read from its run directory alone.

The page shows, per stage of the graph, its status (done, stale with the inputs that changed,
running, interrupted, failed, not run), its time, key figures and energy from manifest.json;
the tokenizer's before/after chart (tokenizer/report.json); the held-out loss per character
from the base through resize and each pre-training stage; the training and held-out loss
curves of every pre-training stage on one time axis and SFT's loss (each stage's log.jsonl);
the eval table (eval/results.json) beside a baseline's results.json, with per-subject bars;
and a few of eval's recorded answers. Nothing is re-run and no model is loaded.

The page loads nothing: charts are PNGs drawn by matplotlib (Agg) and inlined as data: URIs,
styles are inline, and a content-security-policy meta tag forbids every other request, so it
reads the same offline, attached to a message or opened from a shared disk.

`stage_summary` formats the short table `lowlm run` prints when a stage finishes.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from lowlm import __version__
from lowlm.config import LowlmConfig
from lowlm.errors import LowlmError
from lowlm.graph import ORDER, PRETRAIN_STAGES, STAGES, Graph
from lowlm.report_adapt import adaptation_sections, baseline_run
from lowlm.report_tokenizer import alone_section, is_alone
from lowlm.rundir import atomic_write_text

REPORT_FILE = "report.html"
PRETRAIN = tuple(s.name for s in PRETRAIN_STAGES)
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
STATUS_COLOURS = {
    "done": "#1a7f37",
    "stale": "#9a6700",
    "running": "#0969da",
    "interrupted": "#bc4c00",
    "failed": "#cf222e",
    "error": "#cf222e",
    "not run": "#6e7781",
}

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


# ----- what the run directory holds -----------------------------------------------------------


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
        started = _timestamp(self.record.get("started"))
        if started is None:
            return None
        end = _timestamp(self.record.get("finished")) if self.status != "running" else None
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


def _timestamp(value) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S%z").timestamp()
    except ValueError:
        return None


def _read_json(path: Path) -> dict | None:
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
    data = _read_json(path)
    if data is None or not isinstance(data.get("tasks"), dict):
        raise LowlmError(f"--baseline {path} is not a results.json of lowlm eval (no 'tasks').")
    return data


# ----- numbers as text ------------------------------------------------------------------------


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


# ----- charts ---------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    """A figure as a data: URI (PNG), and the figure closed."""
    plt = _pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def tokenizer_chart(report: dict) -> str | None:
    texts = report.get("texts") or {}
    labels = [k for k, v in texts.items() if isinstance(v, dict) and "after" in v]
    if not labels:
        return None
    plt = _pyplot()
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(10, 3.4), gridspec_kw={"width_ratios": [max(2, len(labels)), 2]}
    )
    positions = list(range(len(labels)))
    before = [texts[k].get("before", {}).get("tokens_per_char") for k in labels]
    after = [texts[k]["after"].get("tokens_per_char", 0.0) for k in labels]
    if any(b is not None for b in before):
        bars = left.bar([p - 0.2 for p in positions], [b or 0 for b in before], 0.4, label="base")
        left.bar_label(bars, fmt="%.3g", fontsize=8)
    bars = left.bar([p + 0.2 for p in positions], after, 0.4, label="after", color="#2da44e")
    left.bar_label(bars, fmt="%.3g", fontsize=8)
    ticks = []
    for label in labels:  # the change in token count under each text's name
        change = texts[label].get("token_change")
        ticks.append(f"{label}\n{change:+.0%} tokens" if _finite(change) else label)
    left.set_xticks(positions, ticks)
    left.set_ylabel("tokens per character")
    left.set_title("tokens per character by text (lower is better)")
    left.margins(y=0.25)
    left.legend(fontsize=8)
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
    return _png(fig)


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
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.5, 1.3 * len(points)), 3.2))
    colours = ["#6e7781" if label == "base" else "#0969da" for label, _ in points]
    bars = ax.bar([p[0] for p in points], [p[1] for p in points], color=colours)
    ax.bar_label(bars, fmt="%.3g", fontsize=8)
    ax.set_ylabel("nats per character")
    ax.set_title("held-out loss per character (lower is better)")
    ax.margins(y=0.15)
    fig.tight_layout()
    return _png(fig)


def _times(view: StageView, log: list[dict]) -> list[float]:
    """Wall-clock time of each log line: its own `time`, else placed by its step within the
    stage's recorded span (logs written before lines carried a time)."""
    started = _timestamp(view.record.get("started"))
    end = _timestamp(view.record.get("finished")) if view.status != "running" else None
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
    starts = [t for v in views if (t := _timestamp(v.record.get("started"))) is not None]
    origin = min([*starts, *(min(times) for _, _, times in series)])
    span = max(max(times) for _, _, times in series) - origin
    scale, unit = (60.0, "minutes") if span > 180 else (1.0, "seconds")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 3.8))
    for index, (view, log, times) in enumerate(series):
        colour = f"C{index}"
        x = [(t - origin) / scale for t in times]
        train = [(xi, e["loss"]) for xi, e in zip(x, log, strict=True) if _finite(e.get("loss"))]
        held = [
            (xi, e["eval_loss"])
            for xi, e in zip(x, log, strict=True)
            if _finite(e.get("eval_loss"))
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
    return _png(fig)


def sft_chart(run_path: Path) -> str | None:
    log = read_log(run_path, "sft")
    train = [(e["step"], e["loss"]) for e in log if _finite(e.get("loss"))]
    held = [(e["step"], e["eval_loss"]) for e in log if _finite(e.get("eval_loss"))]
    if not train and not held:
        return None
    plt = _pyplot()
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
    return _png(fig)


def _finite(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _score(result: dict) -> tuple[str, float | None]:
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
    plt = _pyplot()
    for metric, title in (
        ("acc", "accuracy (higher is better)"),
        ("bits/char", "bits per character (lower is better)"),
    ):
        names = [n for n, r in tasks.items() if _score(r)[0] == metric and _finite(_score(r)[1])]
        if not names:
            continue
        fig, ax = plt.subplots(figsize=(max(3.5, 1.4 * len(names) + 1.5), 3.0))
        _paired_bars(
            ax,
            names,
            [_score(tasks[n])[1] for n in names],
            [_score(base_tasks.get(n, {}))[1] for n in names] if baseline else None,
        )
        ax.set_title(title)
        fig.tight_layout()
        charts.append((f"eval: {title}", _png(fig)))
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
        charts.append((f"{name} per subject", _png(fig)))
    return charts


def _paired_bars(ax, labels, ours, theirs, horizontal: bool = False) -> None:
    positions = list(range(len(labels)))
    width = 0.4 if theirs else 0.7
    pairs = [("baseline", theirs, -width / 2, "#6e7781")] if theirs else []
    pairs.append(("this run", ours, width / 2 if theirs else 0.0, "#0969da"))
    for label, values, shift, colour in pairs:
        heights = [v if _finite(v) else 0.0 for v in values]
        at = [p + shift for p in positions]
        if horizontal:
            bars = ax.barh(at, heights, width, label=label, color=colour)
        else:
            bars = ax.bar(at, heights, width, label=label, color=colour)
        ax.bar_label(bars, labels=[fmt(v) if _finite(v) else "-" for v in values], fontsize=7)
    if horizontal:
        ax.set_yticks(positions, labels, fontsize=7)
        ax.invert_yaxis()
    else:
        ax.set_xticks(positions, labels, fontsize=8)
        ax.set_xlim(-0.75, len(labels) - 0.25)
        ax.margins(y=0.15)
    if theirs:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))


# ----- the page -------------------------------------------------------------------------------

_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"Noto Sans","Noto Sans CJK TC",
sans-serif;margin:2rem auto;max-width:1100px;padding:0 1rem;color:#1f2328;line-height:1.45}
h1{margin-bottom:.2rem}h2{margin-top:2.2rem;border-bottom:1px solid #d0d7de;padding-bottom:.3rem}
.meta{color:#59636e;font-size:.9rem}
table{border-collapse:collapse;width:100%;font-size:.88rem}
th,td{text-align:left;vertical-align:top;padding:.35rem .5rem;border-bottom:1px solid #eaeef2}
th{background:#f6f8fa}th.num{text-align:right}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.badge{display:inline-block;color:#fff;border-radius:1rem;padding:.05rem .6rem;font-size:.8rem;
font-weight:600;white-space:nowrap}
.reason{color:#59636e;font-size:.8rem;margin-top:.2rem;max-width:22rem;overflow-wrap:anywhere}
.figures span{display:inline-block;margin:0 .8rem .15rem 0;white-space:nowrap}
.figures b{font-weight:600}
.cards{display:flex;flex-wrap:wrap;gap:.8rem;margin:1rem 0}
.card{border:1px solid #d0d7de;border-radius:.5rem;padding:.6rem .9rem;min-width:11rem}
.card .v{font-size:1.35rem;font-weight:600}.card .l{color:#59636e;font-size:.8rem}
img{max-width:100%;height:auto;display:block;margin:.8rem 0}
details{font-size:.8rem;color:#59636e}pre{white-space:pre-wrap;overflow-wrap:anywhere}
.better{color:#1a7f37}.worse{color:#cf222e}.none{color:#59636e;font-style:italic}
"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _img(uri: str | None, alt: str) -> str:
    return f'<img src="{uri}" alt="{_e(alt)}">' if uri else ""


def _badge(status: str) -> str:
    colour = STATUS_COLOURS.get(status, "#6e7781")
    return f'<span class="badge" style="background:{colour}">{_e(status)}</span>'


def _cards(views: list[StageView], tokenizer: dict | None, results: dict | None) -> str:
    cards = []
    held = ((tokenizer or {}).get("texts") or {}).get("heldout") or {}
    alone = is_alone(tokenizer or {})
    if isinstance(held.get("token_change"), int | float):
        against = " vs the reference" if alone else ""
        cards.append((f"{held['token_change']:+.0%}", f"tokens on held-out text{against}"))
    if isinstance((tokenizer or {}).get("new_tokens"), int) and not alone:
        cards.append((f"{tokenizer['new_tokens']:,}", "new tokens"))
    by_name = {v.name: v.metrics for v in views}
    first = by_name.get("resize", {}).get("heldout_loss_per_char_base")
    last = None
    for name in PRETRAIN:
        value = by_name.get(name, {}).get("heldout_loss_per_char")
        last = value if _finite(value) else last
    if _finite(first) and _finite(last):
        cards.append((f"{fmt(first)} → {fmt(last)}", "held-out loss/char, base → trained"))
    for name, result in ((results or {}).get("tasks") or {}).items():
        metric, value = _score(result)
        if _finite(value):
            cards.append((fmt(value), f"{name} {metric}"))
    seconds = sum(v.seconds or 0.0 for v in views if v.status in ("done", "stale"))
    if seconds:
        cards.append((fmt_seconds(seconds), "time of the recorded stages"))
    kwh = [v.record["energy"].get("kwh") for v in views if isinstance(v.record.get("energy"), dict)]
    kwh = [k for k in kwh if _finite(k)]
    if kwh:
        cards.append((f"{sum(kwh):.3g} kWh", "energy measured"))
    if not cards:
        return ""
    inner = "".join(
        f'<div class="card"><div class="v">{_e(v)}</div><div class="l">{_e(label)}</div></div>'
        for v, label in cards[:8]
    )
    return f'<div class="cards">{inner}</div>'


def _stage_rows(views: list[StageView]) -> str:
    rows = []
    for view in views:
        figures = "".join(
            f"<span>{_e(label)} <b>{_e(value)}</b></span>"
            for label, value in key_figures(view.name, view.metrics)
        )
        details = ""
        if view.metrics:
            dumped = json.dumps(view.metrics, indent=1, ensure_ascii=False, default=str)
            details = f"<details><summary>all metrics</summary><pre>{_e(dumped)}</pre></details>"
        reason = f'<div class="reason">{_e(view.reason)}</div>' if view.reason else ""
        if not view.in_config:
            reason += '<div class="reason">not in this config</div>'
        rows.append(
            f'<tr class="stage" id="stage-{_e(view.name)}" data-stage="{_e(view.name)}" '
            f'data-status="{_e(view.status)}"><td><b>{_e(view.name)}</b></td>'
            f"<td>{_badge(view.status)}{reason}</td>"
            f'<td class="num">{_e(fmt_seconds(view.seconds))}</td>'
            f'<td class="figures">{figures or "-"}{details}</td>'
            f"<td>{_e(energy_text(view.record))}</td></tr>"
        )
    return (
        "<table><thead><tr><th>stage</th><th>status</th><th>time</th><th>key figures</th>"
        "<th>energy</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
    )


def _tokenizer_table(report: dict) -> str:
    rows = []
    for label, entry in (report.get("texts") or {}).items():
        after, before = entry.get("after") or {}, entry.get("before") or {}
        change = entry.get("token_change")
        rows.append(
            f"<tr><td>{_e(label)}</td><td class='num'>{fmt(after.get('lines'))}</td>"
            f"<td class='num'>{fmt(before.get('tokens_per_char'))}</td>"
            f"<td class='num'>{fmt(after.get('tokens_per_char'))}</td>"
            f"<td class='num'>{f'{change:+.1%}' if _finite(change) else '-'}</td>"
            f"<td class='num'>{fmt(entry.get('lines_changed'))}</td>"
            f"<td class='num'>{fmt(after.get('byte_fallback_share'))}</td></tr>"
        )
    return (
        "<table><thead><tr><th>text</th><th class='num'>lines</th>"
        "<th class='num'>tokens/char base</th><th class='num'>after</th>"
        "<th class='num'>tokens</th><th class='num'>lines changed</th>"
        "<th class='num'>byte-fallback share after</th></tr></thead>"
        "<tbody>" + "".join(rows) + "</tbody></table>"
    )


def _eval_table(results: dict, baseline: dict | None) -> str:
    tasks = results.get("tasks") or {}
    base_tasks = (baseline or {}).get("tasks") or {}
    head = "<th>task</th><th>metric</th><th class='num'>this run</th>"
    if baseline:
        head += "<th class='num'>baseline</th><th class='num'>change</th>"
    head += "<th class='num'>n</th>"
    rows = []
    for name, result in tasks.items():
        metric, value = _score(result)
        metrics = (result.get("metrics") or {}) if isinstance(result, dict) else {}
        stderr = (metrics.get(metric) or {}).get("stderr")  # a harness task's
        shown = f"{fmt(value)} ± {fmt(stderr)}" if _finite(stderr) else fmt(value)
        cells = f"<td>{_e(name)}</td><td>{_e(metric)}</td><td class='num'>{_e(shown)}</td>"
        if baseline:
            _, theirs = _score(base_tasks.get(name, {}))
            change, css = "-", "none"
            if _finite(value) and _finite(theirs):
                delta = value - theirs
                better = delta > 0 if metric == "acc" else delta < 0
                change, css = (
                    f"{delta:+.4g}",
                    ("better" if better else "worse") if delta else "none",
                )
            cells += f"<td class='num'>{fmt(theirs)}</td><td class='num {css}'>{_e(change)}</td>"
        count = result.get("n", result.get("lines")) if isinstance(result, dict) else None
        rows.append(f"<tr>{cells}<td class='num'>{fmt(count)}</td></tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _samples(run_path: Path, per_task: int = 3) -> str:
    """A few answers eval recorded (eval/samples-<task>.jsonl), if it recorded any."""
    blocks = []
    for path in sorted((run_path / "eval").glob("samples-*.jsonl")):
        rows = []
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                try:
                    sample = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(sample, dict):
                    continue
                shown = {
                    k: sample[k]
                    for k in ("subject", "index", "target", "prediction")
                    if k in sample
                }
                rows.append(
                    "<tr>" + "".join(f"<td>{_e(fmt(v))}</td>" for v in shown.values()) + "</tr>"
                )
                if len(rows) >= per_task:
                    break
        if rows:
            name = path.stem.removeprefix("samples-")
            blocks.append(
                f"<h3>{_e(name)}</h3><table><thead><tr><th>subject</th><th>index</th>"
                f"<th>target</th><th>prediction</th></tr></thead><tbody>{''.join(rows)}"
                "</tbody></table>"
            )
    return "".join(blocks)


def render(config: LowlmConfig, baseline: Path | None = None) -> str:
    """The report's HTML, from the run directory alone."""
    graph = Graph(config)
    run_path = graph.run_dir.path
    if not run_path.is_dir():
        raise LowlmError(
            f"there is no run directory {run_path} (run.root / run.name); run a stage of this "
            "config first, e.g. `lowlm run CONFIG`."
        )
    baseline_dir = baseline_run(baseline)  # a run directory: compared in adaptation_sections
    base_results = read_baseline(None if baseline_dir else baseline)
    views = stage_views(graph)
    unreadable = [view for view in views if view.status == "error"]
    if unreadable:  # a page of unreadable stages must not replace a report of the run
        raise LowlmError(
            f"cannot report {run_path}: {unreadable[0].name} cannot be checked "
            f"({unreadable[0].reason.rstrip('.')}); restore that input, or report the run with "
            f"the config it recorded: `lowlm report {run_path}`."
        )
    tokenizer = _read_json(run_path / STAGES["tokenize"].folder / "report.json")
    results = _read_json(run_path / STAGES["eval"].folder / "results.json")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>lowlm report: {_e(config.run.name)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>lowlm report: {_e(config.run.name)}</h1>",
        f'<p class="meta">run directory {_e(run_path)} · written '
        f"{_e(time.strftime('%Y-%m-%d %H:%M:%S %z'))} by lowlm {_e(__version__)} from the run "
        "directory alone (nothing re-run)</p>",
        _cards(views, tokenizer, results),
        "<h2>Stages</h2>",
    ]
    if views:
        parts.append(_stage_rows(views))
    else:
        parts.append('<p class="none">No stage is configured or has run.</p>')

    parts.append(_prepare(run_path))
    if tokenizer and is_alone(tokenizer):
        parts += alone_section(tokenizer)
    elif tokenizer:
        parts += [
            "<h2 id='tokenizer'>Tokenizer</h2>",
            f"<p>{fmt(tokenizer.get('new_tokens'))} new tokens "
            f"({fmt(tokenizer.get('reachable_new_tokens'))} reachable) over a base of "
            f"{fmt(tokenizer.get('base_vocab_size'))}; vocabulary "
            f"{fmt(tokenizer.get('vocab_size'))}. Held-out text is text no stage trained on.</p>",
            _img(tokenizer_chart(tokenizer), "tokens per character before and after"),
            _tokenizer_table(tokenizer),
        ]
    held = heldout_chart(views)
    if held:
        parts += [
            "<h2 id='resize'>Held-out loss per character</h2>",
            "<p>Nats per character on the tokenizer's held-out lines: the base model, the "
            "resized one (new rows initialised), and after each pre-training stage. Per "
            "character, so figures under different tokenizers compare.</p>",
            _img(held, "held-out loss per character by stage"),
        ]
    parts += adaptation_sections(run_path, baseline_dir)
    curves = training_chart(run_path, views)
    if curves:
        parts += [
            "<h2 id='training'>Pre-training</h2>",
            "<p>Training loss (solid) and held-out loss (dashed) of each stage's log.jsonl, "
            "placed at the wall-clock time each line was written.</p>",
            _img(curves, "pre-training loss over time"),
        ]
    sft = sft_chart(run_path)
    if sft:
        parts += ["<h2 id='sft'>Instruction tuning</h2>", _img(sft, "sft loss by step")]
    if results:
        parts.append("<h2 id='eval'>Evaluation</h2>")
        if base_results is not None:
            parts.append(
                f"<p>Against the baseline {_e(baseline)} (model "
                f"{_e(base_results.get('model', '?'))}).</p>"
            )
        parts.append(_eval_table(results, base_results))
        for title, chart in eval_charts(results, base_results):
            parts.append(_img(chart, title))
        samples = _samples(run_path)
        if samples:
            parts += ["<h2 id='samples'>Recorded answers</h2>", samples]
    curves = _checkpoint_curves(graph)
    if curves:
        parts += [
            "<h2 id='benchmark-curves'>Benchmarks over training</h2>",
            "<p>Each eval task on the checkpoints of the last pre-training stage and its final "
            "model (<code>lowlm eval --checkpoints</code>), against training tokens.</p>",
            _img(curves, "benchmark scores against training tokens"),
        ]
    parts.append("</body></html>")
    return "\n".join(p for p in parts if p)


def _prepare(run_path: Path) -> str:
    """The corpus-preparation section (lowlm.prepare_report), when the run prepared a corpus."""
    from lowlm.prepare_report import prepare_section

    return prepare_section(run_path)


def _checkpoint_curves(graph: Graph) -> str | None:
    from lowlm.evaluation.checkpoints import PRETRAIN, curves_chart

    stage = next((n for n in PRETRAIN if STAGES[n].enabled(graph.config)), None)
    if stage is None:
        return None
    state = graph.state(stage)
    return curves_chart(graph.run_dir.path, state.plan.key if state.plan else None)


def write_report(config: LowlmConfig, baseline: Path | None = None) -> Path:
    """Write <run>/report.html atomically; returns its path."""
    path = config.run_dir / REPORT_FILE
    atomic_write_text(path, render(config, baseline))
    return path
