"""`lowlm tokenize`'s held-out compression against the number of new pieces kept."""

from __future__ import annotations

import json

import pytest

from lowlm.tokenization.pieces_curve import piece_counts

from .conftest import run_tokenize


def test_piece_counts_run_from_none_to_all():
    assert piece_counts(0) == [0]
    counts = piece_counts(7708)
    assert counts[0] == 0 and counts[-1] == 7708 and counts == sorted(set(counts))
    assert len(counts) >= 8


@pytest.mark.parametrize("kind", ["sentencepiece", "byte_bpe"])
def test_curve_runs_from_the_base_tokenizer_to_the_merged_one(
    write_config, sp_base, byte_base, kind
):
    base = sp_base if kind == "sentencepiece" else byte_base
    extra = {"vocab_size": 800} if kind == "byte_bpe" else {}
    _, _, folder = run_tokenize(write_config, model={"tokenizer": str(base)}, **extra)
    report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    curve, heldout = report["compression_curve"], report["texts"]["heldout"]
    assert curve[0]["new_pieces"] == 0 and curve[-1]["new_pieces"] == report["new_tokens"]
    # No new piece: the base's own count; all of them: the merged tokenizer's.
    assert curve[0]["tokens"] == heldout["before"]["tokens"]
    assert curve[-1]["tokens"] == heldout["after"]["tokens"]
    assert curve[-1]["tokens_per_char"] < 0.8 * curve[0]["tokens_per_char"]
