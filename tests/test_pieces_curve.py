"""`lowlm tokenize`'s held-out compression against the number of new pieces kept."""

from __future__ import annotations

import json

import pytest

from lowlm.tokenization.pieces_curve import piece_counts


def test_piece_counts_run_from_none_to_all():
    assert piece_counts(0) == [0]
    counts = piece_counts(7708)
    assert counts[0] == 0 and counts[-1] == 7708 and counts == sorted(set(counts))
    assert len(counts) >= 8


@pytest.mark.parametrize("kind", ["sentencepiece", "byte_bpe"])
def test_curve_runs_from_the_base_tokenizer_to_the_merged_one(sp_merged, byte_merged, kind):
    _, _, folder = sp_merged if kind == "sentencepiece" else byte_merged
    report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    curve, heldout = report["compression_curve"], report["texts"]["heldout"]
    assert curve[0]["new_pieces"] == 0 and curve[-1]["new_pieces"] == report["new_tokens"]
    # No new piece: the base's own count; all of them: the merged tokenizer's.
    assert curve[0]["tokens"] == heldout["before"]["tokens"]
    assert curve[-1]["tokens"] == heldout["after"]["tokens"]
    assert curve[-1]["tokens_per_char"] < 0.8 * curve[0]["tokens_per_char"]
    if kind == "sentencepiece":  # the HTML report draws this curve in its tokenizer chart
        _assert_report_draws(report, curve)


def _assert_report_draws(report: dict, curve: list[dict]) -> None:
    import base64
    import struct

    from lowlm.report.charts import compression_curve, pyplot, tokenizer_chart

    figure, ax = pyplot().subplots()
    compression_curve(ax, curve)
    (line,) = ax.get_lines()
    assert list(line.get_xdata()) == [row["new_pieces"] for row in curve]
    assert list(line.get_ydata()) == [row["tokens_per_char"] for row in curve]
    pyplot().close(figure)

    def width(uri: str) -> int:  # a PNG's width, from its header
        return struct.unpack(">I", base64.b64decode(uri.split(",", 1)[1])[16:20])[0]

    without = {key: value for key, value in report.items() if key != "compression_curve"}
    assert width(tokenizer_chart(report)) > width(tokenizer_chart(without))
