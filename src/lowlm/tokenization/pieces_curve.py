"""Held-out compression against the number of new pieces kept: the merged tokenizer cut after
its first k new merges (byte-level BPE) or pieces (SentencePiece), for a few k, so that a user
sees where the curve flattens. New rows that each appear a few times in a small training
budget may cost more than the compression they buy."""

from __future__ import annotations

import json


def piece_counts(total: int, points: int = 8) -> list[int]:
    """0, then about `points` counts spaced geometrically up to `total`."""
    if total <= 0:
        return [0]
    counts = {0, total}
    for index in range(points):
        counts.add(max(1, round(total ** ((index + 1) / points))))
    return sorted(c for c in counts if c <= total)


def _row(count: int, tokens: int, chars: int) -> dict:
    return {"new_pieces": count, "tokens": tokens, "tokens_per_char": tokens / chars}


def byte_bpe_curve(merged_json: str, base_merges: int, lines: list[str]) -> list[dict]:
    """Tokens per character of `lines` with the base's merges and the first k new ones."""
    from tokenizers import Tokenizer

    full = json.loads(merged_json)
    merges = full["model"]["merges"]
    chars = sum(map(len, lines))
    rows = []
    for count in piece_counts(len(merges) - base_merges):
        full["model"]["merges"] = merges[: base_merges + count]
        tokenizer = Tokenizer.from_str(json.dumps(full))
        encoded = tokenizer.encode_batch(lines, add_special_tokens=False)
        rows.append(_row(count, sum(len(e.ids) for e in encoded), chars))
    return rows


def sentencepiece_curve(proto, base_pieces: int, lines: list[str]) -> list[dict]:
    """The same for a merged SentencePiece model whose new pieces follow the base's."""
    from lowlm.tokenization.sentencepiece_merge import sentencepiece_processor

    chars = sum(map(len, lines))
    rows = []
    for count in piece_counts(len(proto.pieces) - base_pieces):
        cut = type(proto)()
        cut.CopyFrom(proto)
        del cut.pieces[base_pieces + count :]
        processor = sentencepiece_processor(cut)
        rows.append(_row(count, sum(len(processor.encode(line)) for line in lines), chars))
    return rows
