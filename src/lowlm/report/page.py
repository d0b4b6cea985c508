"""The HTML page: every section of the report, self-contained (inline styles, inlined
charts, a content-security policy that forbids every request).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from lowlm import __version__
from lowlm.config import LowlmConfig
from lowlm.errors import LowlmError
from lowlm.graph import STAGES, Graph
from lowlm.report.adapt import adaptation_sections, baseline_run
from lowlm.report.charts import (
    checkpoint_curves_chart,
    eval_charts,
    finite,
    headline_score,
    heldout_chart,
    sft_chart,
    tokenizer_chart,
    training_chart,
)
from lowlm.report.html import escape, img_tag
from lowlm.report.run import PRETRAIN, StageView, read_baseline, read_json, stage_views
from lowlm.report.text import energy_text, fmt, fmt_seconds, key_figures
from lowlm.report.tokenizer import alone_section, is_alone
from lowlm.rundir import atomic_write_text

REPORT_FILE = "report.html"
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


def _badge(status: str) -> str:
    colour = STATUS_COLOURS.get(status, "#6e7781")
    return f'<span class="badge" style="background:{colour}">{escape(status)}</span>'


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
        last = value if finite(value) else last
    if finite(first) and finite(last):
        cards.append((f"{fmt(first)} → {fmt(last)}", "held-out loss/char, base → trained"))
    for name, result in ((results or {}).get("tasks") or {}).items():
        metric, value = headline_score(result)
        if finite(value):
            cards.append((fmt(value), f"{name} {metric}"))
    seconds = sum(v.seconds or 0.0 for v in views if v.status in ("done", "stale"))
    if seconds:
        cards.append((fmt_seconds(seconds), "time of the recorded stages"))
    kwh = [v.record["energy"].get("kwh") for v in views if isinstance(v.record.get("energy"), dict)]
    kwh = [k for k in kwh if finite(k)]
    if kwh:
        cards.append((f"{sum(kwh):.3g} kWh", "energy measured"))
    if not cards:
        return ""
    inner = "".join(
        f'<div class="card"><div class="v">{escape(v)}</div>'
        f'<div class="l">{escape(label)}</div></div>'
        for v, label in cards[:8]
    )
    return f'<div class="cards">{inner}</div>'


def _stage_rows(views: list[StageView]) -> str:
    rows = []
    for view in views:
        figures = "".join(
            f"<span>{escape(label)} <b>{escape(value)}</b></span>"
            for label, value in key_figures(view.name, view.metrics)
        )
        details = ""
        if view.metrics:
            dumped = json.dumps(view.metrics, indent=1, ensure_ascii=False, default=str)
            details = (
                f"<details><summary>all metrics</summary><pre>{escape(dumped)}</pre></details>"
            )
        reason = f'<div class="reason">{escape(view.reason)}</div>' if view.reason else ""
        if not view.in_config:
            reason += '<div class="reason">not in this config</div>'
        rows.append(
            f'<tr class="stage" id="stage-{escape(view.name)}" data-stage="{escape(view.name)}" '
            f'data-status="{escape(view.status)}"><td><b>{escape(view.name)}</b></td>'
            f"<td>{_badge(view.status)}{reason}</td>"
            f'<td class="num">{escape(fmt_seconds(view.seconds))}</td>'
            f'<td class="figures">{figures or "-"}{details}</td>'
            f"<td>{escape(energy_text(view.record))}</td></tr>"
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
            f"<tr><td>{escape(label)}</td><td class='num'>{fmt(after.get('lines'))}</td>"
            f"<td class='num'>{fmt(before.get('tokens_per_char'))}</td>"
            f"<td class='num'>{fmt(after.get('tokens_per_char'))}</td>"
            f"<td class='num'>{f'{change:+.1%}' if finite(change) else '-'}</td>"
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
        metric, value = headline_score(result)
        metrics = (result.get("metrics") or {}) if isinstance(result, dict) else {}
        stderr = (metrics.get(metric) or {}).get("stderr")  # a harness task's
        shown = f"{fmt(value)} ± {fmt(stderr)}" if finite(stderr) else fmt(value)
        cells = (
            f"<td>{escape(name)}</td><td>{escape(metric)}</td><td class='num'>{escape(shown)}</td>"
        )
        if baseline:
            _, theirs = headline_score(base_tasks.get(name, {}))
            change, css = "-", "none"
            if finite(value) and finite(theirs):
                delta = value - theirs
                better = delta > 0 if metric == "acc" else delta < 0
                change, css = (
                    f"{delta:+.4g}",
                    ("better" if better else "worse") if delta else "none",
                )
            cells += (
                f"<td class='num'>{fmt(theirs)}</td><td class='num {css}'>{escape(change)}</td>"
            )
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
                    "<tr>" + "".join(f"<td>{escape(fmt(v))}</td>" for v in shown.values()) + "</tr>"
                )
                if len(rows) >= per_task:
                    break
        if rows:
            name = path.stem.removeprefix("samples-")
            blocks.append(
                f"<h3>{escape(name)}</h3><table><thead><tr><th>subject</th><th>index</th>"
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
    views = _readable_views(graph)
    tokenizer = read_json(run_path / STAGES["tokenize"].folder / "report.json")
    results = read_json(run_path / STAGES["eval"].folder / "results.json")
    parts = [
        *_head(config.run.name, run_path),
        _cards(views, tokenizer, results),
        "<h2>Stages</h2>",
        _stage_rows(views) if views else '<p class="none">No stage is configured or has run.</p>',
        _prepare(run_path),
        *_tokenizer_section(tokenizer),
        *_heldout_section(views),
        *adaptation_sections(run_path, baseline_dir),
        *_training_sections(run_path, views),
        *_eval_sections(run_path, results, base_results, baseline),
        *_checkpoint_section(graph),
        "</body></html>",
    ]
    return "\n".join(p for p in parts if p)


def _readable_views(graph: Graph) -> list[StageView]:
    """Every stage's view; refused when a stage cannot be checked (a page of unreadable stages
    must not replace a report of the run)."""
    run_path = graph.run_dir.path
    views = stage_views(graph)
    unreadable = [view for view in views if view.status == "error"]
    if unreadable:
        raise LowlmError(
            f"cannot report {run_path}: {unreadable[0].name} cannot be checked "
            f"({unreadable[0].reason.rstrip('.')}); restore that input, or report the run with "
            f"the config it recorded: `lowlm report {run_path}`."
        )
    return views


def _head(run_name: str, run_path: Path) -> list[str]:
    return [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>lowlm report: {escape(run_name)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>lowlm report: {escape(run_name)}</h1>",
        f'<p class="meta">run directory {escape(run_path)} · written '
        f"{escape(time.strftime('%Y-%m-%d %H:%M:%S %z'))} by lowlm {escape(__version__)} "
        "from the run "
        "directory alone (nothing re-run)</p>",
    ]


def _tokenizer_section(tokenizer: dict | None) -> list[str]:
    if not tokenizer:
        return []
    if is_alone(tokenizer):
        return alone_section(tokenizer)
    return [
        "<h2 id='tokenizer'>Tokenizer</h2>",
        f"<p>{fmt(tokenizer.get('new_tokens'))} new tokens "
        f"({fmt(tokenizer.get('reachable_new_tokens'))} reachable) over a base of "
        f"{fmt(tokenizer.get('base_vocab_size'))}; vocabulary "
        f"{fmt(tokenizer.get('vocab_size'))}. Held-out text is text no stage trained on.</p>",
        img_tag(tokenizer_chart(tokenizer), "tokens per character before and after"),
        _tokenizer_table(tokenizer),
    ]


def _heldout_section(views: list[StageView]) -> list[str]:
    held = heldout_chart(views)
    if not held:
        return []
    return [
        "<h2 id='resize'>Held-out loss per character</h2>",
        "<p>Nats per character on the tokenizer's held-out lines: the base model, the "
        "resized one (new rows initialised), and after each pre-training stage. Per "
        "character, so figures under different tokenizers compare.</p>",
        img_tag(held, "held-out loss per character by stage"),
    ]


def _training_sections(run_path: Path, views: list[StageView]) -> list[str]:
    """The pre-training curves and the sft loss, each when its log has points."""
    parts = []
    curves = training_chart(run_path, views)
    if curves:
        parts += [
            "<h2 id='training'>Pre-training</h2>",
            "<p>Training loss (solid) and held-out loss (dashed) of each stage's log.jsonl, "
            "placed at the wall-clock time each line was written.</p>",
            img_tag(curves, "pre-training loss over time"),
        ]
    sft = sft_chart(run_path)
    if sft:
        parts += ["<h2 id='sft'>Instruction tuning</h2>", img_tag(sft, "sft loss by step")]
    return parts


def _eval_sections(
    run_path: Path, results: dict | None, base_results: dict | None, baseline: Path | None
) -> list[str]:
    """The eval table and charts (beside the baseline's results, if given), and a few recorded
    answers."""
    if not results:
        return []
    parts = ["<h2 id='eval'>Evaluation</h2>"]
    if base_results is not None:
        parts.append(
            f"<p>Against the baseline {escape(baseline)} (model "
            f"{escape(base_results.get('model', '?'))}).</p>"
        )
    parts.append(_eval_table(results, base_results))
    for title, chart in eval_charts(results, base_results):
        parts.append(img_tag(chart, title))
    samples = _samples(run_path)
    if samples:
        parts += ["<h2 id='samples'>Recorded answers</h2>", samples]
    return parts


def _checkpoint_section(graph: Graph) -> list[str]:
    """The benchmark curves over the checkpoints of the last enabled pre-training stage, when
    `lowlm eval --checkpoints` scored them."""
    from lowlm.evaluation.checkpoints import PRETRAIN

    stage = next((n for n in PRETRAIN if STAGES[n].enabled(graph.config)), None)
    if stage is None:
        return []
    state = graph.state(stage)
    curves = checkpoint_curves_chart(graph.run_dir.path, state.plan.key if state.plan else None)
    if not curves:
        return []
    return [
        "<h2 id='benchmark-curves'>Benchmarks over training</h2>",
        "<p>Each eval task on the checkpoints of the last pre-training stage and its final "
        "model (<code>lowlm eval --checkpoints</code>), against training tokens.</p>",
        img_tag(curves, "benchmark scores against training tokens"),
    ]


def _prepare(run_path: Path) -> str:
    """The corpus-preparation section (lowlm.prepare_report), when the run prepared a corpus."""
    from lowlm.report.prepare import prepare_section

    return prepare_section(run_path)


def write_report(config: LowlmConfig, baseline: Path | None = None) -> Path:
    """Write <run>/report.html atomically; returns its path."""
    path = config.run_dir / REPORT_FILE
    atomic_write_text(path, render(config, baseline))
    return path
