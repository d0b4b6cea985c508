"""The report's tokenizer section for a tokenizer trained alone (tokenize.merge: false, as for a
model trained from scratch): its vocabulary and characters per token on each held-out text,
beside the reference tokenizer the config names (model.tokenizer or model.base), if any.
A merged tokenizer's section (new tokens over a base) is report.py's own."""

from __future__ import annotations


def is_alone(tokenizer: dict) -> bool:
    """Whether tokenizer/report.json describes a tokenizer trained alone (reports written
    before "merged" was recorded had no base then)."""
    return not tokenizer.get("merged", tokenizer.get("base") is not None)


def alone_section(tokenizer: dict) -> list[str]:
    """HTML parts: a sentence, the chart and the table."""
    from lowlm.report.html import escape, img_tag
    from lowlm.report.text import fmt

    reference = tokenizer.get("reference")
    against = (
        f" It is compared with the reference tokenizer {escape(reference)} (vocabulary "
        f"{fmt(tokenizer.get('reference_vocab_size'))}) on the same text."
        if reference
        else " No reference tokenizer is named (set model.tokenizer to compare with one)."
    )
    return [
        "<h2 id='tokenizer'>Tokenizer</h2>",
        f"<p>A tokenizer trained alone (tokenize.merge: false): vocabulary "
        f"{fmt(tokenizer.get('vocab_size'))}. Characters per "
        f"token on the held-out text (text no stage trained on) and on each eval text; higher "
        f"means shorter sequences.{against}</p>",
        img_tag(_chart(tokenizer), "characters per token by text"),
        _table(tokenizer),
    ]


def _texts(tokenizer: dict) -> dict[str, dict]:
    texts = tokenizer.get("texts") or {}
    return {k: v for k, v in texts.items() if isinstance(v, dict) and "after" in v}


def _chart(tokenizer: dict) -> str | None:
    from lowlm.report.charts import before_after_bars, png_uri, pyplot

    texts = _texts(tokenizer)
    if not texts:
        return None
    fig, ax = pyplot().subplots(figsize=(max(4.0, 1.8 * len(texts)), 3.4))
    before_after_bars(
        ax,
        list(texts),
        [(entry.get("before") or {}).get("chars_per_token") for entry in texts.values()],
        [entry["after"].get("chars_per_token", 0.0) for entry in texts.values()],
        ("reference", "this run"),
        "characters per token",
        "characters per token by text (higher is better)",
    )
    fig.tight_layout()
    return png_uri(fig)


def _table(tokenizer: dict) -> str:
    from lowlm.report.charts import finite
    from lowlm.report.html import escape
    from lowlm.report.text import fmt

    rows = []
    for label, entry in _texts(tokenizer).items():
        after, before = entry["after"], entry.get("before") or {}
        change = entry.get("token_change")
        rows.append(
            f"<tr><td>{escape(label)}</td><td class='num'>{fmt(after.get('lines'))}</td>"
            f"<td class='num'>{fmt(after.get('chars_per_token'))}</td>"
            f"<td class='num'>{fmt(before.get('chars_per_token'))}</td>"
            f"<td class='num'>{f'{change:+.1%}' if finite(change) else '-'}</td>"
            f"<td class='num'>{fmt(after.get('tokens_per_word'))}</td>"
            f"<td class='num'>{fmt(after.get('byte_fallback_share'))}</td></tr>"
        )
    return (
        "<table><thead><tr><th>text</th><th class='num'>lines</th>"
        "<th class='num'>chars/token</th><th class='num'>reference</th>"
        "<th class='num'>tokens vs reference</th><th class='num'>tokens/word</th>"
        "<th class='num'>byte-fallback share</th></tr></thead>"
        "<tbody>" + "".join(rows) + "</tbody></table>"
    )
