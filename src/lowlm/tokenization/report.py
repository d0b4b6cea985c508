"""Before/after statistics of a tokenizer on held-out texts, as JSON, a table and a chart."""

from __future__ import annotations

from pathlib import Path

from lowlm.tokenization.sentencepiece_merge import count_byte_pieces


def encode_lines(tokenizer, lines: list[str]) -> list[list[int]]:
    if not lines:
        return []
    return tokenizer(lines, add_special_tokens=False)["input_ids"]


def text_stats(tokenizer, lines: list[str], ids: list[list[int]] | None = None) -> dict:
    """Tokens per character and per word, and the share of byte-fallback and unknown tokens."""
    ids = encode_lines(tokenizer, lines) if ids is None else ids
    chars = sum(len(line) for line in lines)
    words = sum(len(line.split()) for line in lines)
    tokens = sum(len(row) for row in ids)
    pieces = [p for row in ids for p in tokenizer.convert_ids_to_tokens(row)]
    unk_id = tokenizer.unk_token_id
    unk = sum(1 for row in ids for i in row if unk_id is not None and i == unk_id)
    return {
        "lines": len(lines),
        "chars": chars,
        "words": words,
        "tokens": tokens,
        "tokens_per_char": tokens / chars if chars else 0.0,
        "chars_per_token": chars / tokens if tokens else 0.0,
        "tokens_per_word": tokens / words if words else 0.0,
        "byte_fallback_share": count_byte_pieces(pieces) / tokens if tokens else 0.0,
        "unk_share": unk / tokens if tokens else 0.0,
    }


def compare(base, merged, lines: list[str]) -> dict:
    """Stats of both tokenizers on the same lines, and how many lines tokenize differently."""
    after_ids = encode_lines(merged, lines)
    entry: dict = {"after": text_stats(merged, lines, after_ids)}
    if base is not None:
        before_ids = encode_lines(base, lines)
        entry["before"] = text_stats(base, lines, before_ids)
        entry["lines_changed"] = sum(a != b for a, b in zip(after_ids, before_ids, strict=True))
        before_tokens = entry["before"]["tokens"]
        entry["token_change"] = (
            entry["after"]["tokens"] / before_tokens - 1.0 if before_tokens else 0.0
        )
    return entry


def format_table(texts: dict[str, dict]) -> str:
    header = (
        f"{'text':<14}{'lines':>7}{'chars/tok before':>18}{'after':>8}"
        f"{'tok/word after':>16}{'bytes after':>13}{'tokens':>9}{'lines changed':>15}"
    )
    rows = [header, "-" * len(header)]
    for label, entry in texts.items():
        after, before = entry["after"], entry.get("before")
        before_cpt = f"{before['chars_per_token']:.3f}" if before else "-"
        change = f"{entry['token_change']:+.1%}" if before else "-"
        changed = str(entry["lines_changed"]) if before else "-"
        rows.append(
            f"{label:<14}{after['lines']:>7}{before_cpt:>18}{after['chars_per_token']:>8.3f}"
            f"{after['tokens_per_word']:>16.3f}{after['byte_fallback_share']:>13.1%}"
            f"{change:>9}{changed:>15}"
        )
    return "\n".join(rows)


def write_chart(texts: dict[str, dict], path: Path, curve: list[dict] | None = None) -> None:
    """A bar chart of characters per token before and after, one group per text; beside it,
    held-out tokens per character against the number of new pieces kept (when measured)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(texts)
    after = [texts[k]["after"]["chars_per_token"] for k in labels]
    before = [texts[k].get("before", {}).get("chars_per_token", 0.0) for k in labels]
    positions = range(len(labels))
    width = max(4, 1.6 * len(labels))
    fig, axes = plt.subplots(1, 2 if curve else 1, figsize=(width + (5 if curve else 0), 3.2))
    ax = axes[0] if curve else axes
    if curve:
        counts = [row["new_pieces"] for row in curve]
        axes[1].plot(counts, [row["tokens_per_char"] for row in curve], marker="o")
        axes[1].set_xscale("symlog", linthresh=max(1, min(c for c in counts if c) or 1))
        axes[1].set_xlabel("new pieces kept (in training order)")
        axes[1].set_ylabel("held-out tokens per character")
        axes[1].grid(alpha=0.3)
    ax.bar([p - 0.2 for p in positions], before, width=0.4, label="base")
    ax.bar([p + 0.2 for p in positions], after, width=0.4, label="lowlm tokenizer")
    ax.set_xticks(list(positions), labels)
    ax.set_ylabel("characters per token")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
