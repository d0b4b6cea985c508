"""Decontamination of strings shorter than one n-gram: matched on their whole text when at
least the minimum long, never when shorter; and how many clean documents that removes."""

from __future__ import annotations

import pytest

from .conftest import ASSETS, DEMO

pytest.importorskip("datatrove")

ZH = [line for line in (DEMO / "zh-tw.txt").read_text(encoding="utf-8").splitlines() if line]
EN = [line for line in (DEMO / "en.txt").read_text(encoding="utf-8").splitlines() if line]


def make_filter(tmp_path, texts: dict, language: str, n_grams: int, whole_min: int):
    from lowlm.data.prepare.decontaminate import DecontaminationFilter, write_index
    from lowlm.data.prepare.languages import check_language, word_tokenizer

    tokenizer, _ = word_tokenizer(check_language(language))
    folder = tmp_path / f"index-{language}-{whole_min}"
    counts, short = write_index(texts, folder, tokenizer, n_grams, whole_min)
    return DecontaminationFilter(folder, tokenizer, n_grams, whole_min, None), counts, short


def kept(decont, text: str) -> bool:
    from datatrove.data import Document

    return decont.filter(Document(text=text, id="d")) is True


def test_a_question_shorter_than_an_n_gram_is_matched_on_its_whole_text(tmp_path):
    short = "如何在 LibreOffice Math 中快速而輕鬆地對齊字元？"  # 16 units: 14 Han, 2 words
    tiny = "下列何者正確？"  # 6 units: below the minimum of 12
    long = next(line for line in ZH[2700:] if sum("\u4e00" <= c <= "\u9fff" for c in line) > 30)
    texts = {"quiz": {"questions": [short, tiny, long], "other": []}}
    decont, counts, stats = make_filter(tmp_path, texts, "cmn_Hant", 20, 12)
    assert counts["quiz"] > 0
    assert stats["quiz"] == {
        "questions": 2,
        "questions_matched_whole": 1,
        "strings_matched_whole": 1,
    }
    base = "\n".join(ZH[100:105])
    assert kept(decont, base)
    assert not kept(decont, f"{base}\n請問：{short}謝謝")  # inside a line, punctuation aside
    assert not kept(decont, f"{base}\n{long}")
    assert kept(decont, f"{base}\n{short.replace('輕鬆', '輕松')}")  # one unit changed
    assert kept(decont, f"{base}\n{tiny}")
    # A benchmark of short questions alone still gets a filter (no n-gram index at all).
    only_short, counts, _ = make_filter(tmp_path, {"q": {"questions": [short]}}, "cmn_Hant", 20, 8)
    assert counts == {"q": 0} and not kept(only_short, f"{base}\n{short}")


def test_nothing_long_enough_to_check_is_refused(tmp_path):
    from lowlm.errors import LowlmError

    with pytest.raises(LowlmError, match="12 units long"):
        make_filter(tmp_path, {"q": {"questions": ["下列何者正確？"]}}, "cmn_Hant", 20, 12)


def test_mmlu_strings_matched_whole_remove_few_clean_english_documents(tmp_path):
    """False positives: MMLU's questions and choices (all 57 subjects) against the bundled
    English text (Python's documentation, 4-line documents), with and without the strings of
    8 to 12 words matched whole. Run with -s for the figures."""
    mmlu = ASSETS / "bench" / "mmlu" / "data"
    if not mmlu.is_dir():
        pytest.skip(f"MMLU is not in {ASSETS}")
    from datatrove.data import Document
    from datatrove.pipeline.decont import NGramsDecontFilter

    from lowlm.config import EvalTask
    from lowlm.evaluation.tasks import question_texts

    texts = {"mmlu": question_texts(EvalTask(name="mmlu", path=str(mmlu)))}
    documents = ["\n".join(EN[i : i + 4]) for i in range(0, len(EN) - 3, 4)]
    decont, _, stats = make_filter(tmp_path, texts, "eng_Latn", 13, 8)
    n_grams_only = NGramsDecontFilter.filter  # datatrove's own check alone
    removed = {
        13: sum(n_grams_only(decont, Document(text=d, id="d")) is not True for d in documents),
        8: sum(not kept(decont, d) for d in documents),
    }
    print(
        f"\nMMLU: {len(texts['mmlu']['questions'])} questions, "
        f"{stats['mmlu']['strings_matched_whole']} strings of 8-12 words matched whole; "
        f"clean English documents removed of {len(documents)}: n-grams only {removed[13]}, "
        f"with whole strings {removed[8]}"
    )
    assert stats["mmlu"]["strings_matched_whole"] > 1000
    assert removed[8] - removed[13] <= 0.01 * len(documents)
