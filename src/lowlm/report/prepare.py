"""The report's corpus-preparation section, from corpus/stats.json and corpus/removed/ alone:
the funnel of documents kept at each step, the language-score histogram, removed documents per
reason with examples, and contamination per benchmark."""

from __future__ import annotations

import json
from pathlib import Path

from lowlm.report.charts import png_uri, pyplot
from lowlm.report.html import escape, img_tag
from lowlm.report.text import fmt

EXAMPLES_PER_REASON = 2


def _row(*cells, head: bool = False) -> str:
    tag = "th" if head else "td"
    return "<tr>" + "".join(f"<{tag}>{escape(c)}</{tag}>" for c in cells) + "</tr>"


def _table(head: tuple, rows: list[tuple]) -> str:
    body = "".join(_row(*r) for r in rows)
    return f"<table><thead>{_row(*head, head=True)}</thead><tbody>{body}</tbody></table>"


def _histogram(stats: dict) -> str | None:
    histogram = stats.get("lid", {}).get("score_histogram") or {}
    counts = histogram.get("counts") or []
    if not any(counts):
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 2.4))
    width = 1 / len(counts)
    ax.bar([i * width for i in range(len(counts))], counts, width=width * 0.9, align="edge")
    threshold = stats["lid"].get("threshold")
    if threshold is not None:
        ax.axvline(threshold, color="#cf222e", linestyle="--", label=f"threshold {threshold:.3g}")
        ax.legend(fontsize=8)
    ax.set_xlabel(f"target-language score ({stats['lid'].get('label')})")
    ax.set_ylabel("documents read")
    return png_uri(fig)


def _examples(removed: Path, reason_file: str) -> str:
    path = removed / f"{reason_file}.jsonl"
    if not path.is_file():
        return ""
    lines = path.read_text(encoding="utf-8").splitlines()[:EXAMPLES_PER_REASON]
    texts = [json.loads(line).get("text", "")[:160].replace("\n", " ⏎ ") for line in lines]
    return " · ".join(texts)


def prepare_section(run_path: Path) -> str:
    corpus = run_path / "corpus"
    try:
        stats = json.loads((corpus / "stats.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return ""
    kept = stats.get("kept", {})
    funnel = stats.get("funnel", [])
    read = funnel[0] if funnel else {}
    lid = stats.get("lid", {})
    calibration = stats.get("calibration") or {}
    parts = [
        "<h2 id='prepare'>Corpus preparation</h2>",
        f"<p>{fmt(kept.get('documents'))} of {fmt(read.get('documents'))} documents kept "
        f"({fmt(kept.get('characters'))} characters, {fmt(kept.get('heldout_documents'))} "
        f"marked held out) for {escape(stats.get('language'))}; language ID "
        f"{escape(lid.get('model'))} (label {escape(lid.get('label'))}"
        f", threshold {fmt(lid.get('threshold'))}); words: "
        f"{escape(stats.get('word_tokenizer'))}; "
        f"thresholds: {escape(stats.get('thresholds_source'))}"
        + (
            f", calibrated on {fmt(calibration.get('documents'))} clean documents "
            f"({len(calibration.get('changed') or {})} loosened)"
            if calibration
            else ""
        )
        + ".</p>",
    ]
    rows = [("read", "", "", fmt(read.get("documents")), "")]
    for step in funnel[1:]:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(step["reasons"].items()) if v)
        rows.append(
            (step["step"], fmt(step["in"]), fmt(step["removed"]), fmt(step["documents"]), reasons)
        )
    parts.append(_table(("step", "in", "removed", "kept", "removed because"), rows))
    parts.append(img_tag(_histogram(stats), "language-score histogram"))
    examples = []
    for step in funnel[1:]:
        for reason, count in sorted(step["reasons"].items()):
            shown = _examples(corpus / "removed", f"{step['step']}-{reason}")
            examples.append((f"{step['step']}: {reason}", fmt(count), shown))
        if not step["reasons"] and step["removed"]:
            shown = _examples(corpus / "removed", f"{step['step']}-removed")
            examples.append((step["step"], fmt(step["removed"]), shown))
    if examples:
        parts += [
            "<h3>Removed documents</h3>",
            _table(("reason", "documents", "examples"), examples),
        ]
    decont = stats.get("decontamination") or {}
    if decont.get("index_ngrams") or decont.get("not_checked"):
        rows = [
            (name, fmt(ngrams), fmt((decont.get("removed") or {}).get(name, 0)))
            for name, ngrams in (decont.get("index_ngrams") or {}).items()
        ]
        rows += [(item, "not checked", "") for item in decont.get("not_checked") or []]
        size = f"{fmt(decont.get('n_gram'))}-{escape(decont.get('unit'))}"
        parts += [
            f"<h3>Contamination ({size} n-grams)</h3>",
            _table(("benchmark", "n-grams indexed", "documents removed"), rows),
        ]
    return "\n".join(p for p in parts if p)
