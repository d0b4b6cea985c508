"""`prepare.dedup.sentences`: datatrove's sentence dedup with the language's own sentence
splitting (Han text at 。, not on whitespace or lines)."""

from __future__ import annotations

import json
from collections import Counter

import pyarrow.parquet as pq
import pytest
from datatrove.utils.text import simplify_text

from lowlm.data.prepare.languages import CharacterTokenizer, RegexWordTokenizer, check_language
from lowlm.data.prepare.languages import word_tokenizer as language_tokenizer

from .conftest import EN_LINES, ZH_LINES, invoke, prepare_config, write_text

BOILERPLATE = {
    "cmn_Hant": "本網站內容受著作權保護。未經授權請勿轉載！如有問題請寫信給管理員。",
    "eng_Latn": "This page was generated automatically. All rights are reserved! "
    "Write to the webmaster if something is wrong.",
}


def test_sentences_are_split_by_the_language_s_rules_not_on_whitespace():
    han = CharacterTokenizer("cmn_Hant")
    text = "第一句。第二句「引用！」 第三句\n第四句"
    assert han.sent_tokenize(text) == ["第一句。", "第二句「引用！」", "第三句", "第四句"]
    assert [text[a:b] for a, b in han.span_tokenize(text)] == han.sent_tokenize(text)
    words = RegexWordTokenizer("por_Latn")
    text = "O valor é 3.14 hoje. Compre já! (Fim.) Sem ponto"
    assert words.sent_tokenize(text) == [
        "O valor é 3.14 hoje.",
        "Compre já!",
        "(Fim.)",
        "Sem ponto",
    ]
    assert language_tokenizer(check_language("cmn_Hant"))[1] == "characters"


def _end_sentence(text: str, language: str) -> str:
    if language == "cmn_Hant":
        return text if text.endswith(("。", "！", "？")) else text + "。"
    return (text if text.endswith((".", "!", "?")) else text + ".") + " "


def _corpus(language: str) -> tuple[list[str], list[str]]:
    """(documents, the unique sentences of those that stay): 30 documents of 6 lines, every
    third one with the same 3-sentence boilerplate on its last line, and a last document of
    one sentence besides it."""
    lines = ZH_LINES if language == "cmn_Hant" else EN_LINES
    docs = ["\n".join(lines[i * 6 : (i + 1) * 6]) for i in range(30)]
    # on the last line, after its sentence's end: only sentence splitting separates it
    docs = [
        _end_sentence(doc, language) + BOILERPLATE[language] if i % 3 == 0 else doc
        for i, doc in enumerate(docs)
    ]
    tokenizer = language_tokenizer(check_language(language))[0]
    one_sentence = next(x for x in lines[200:] if len(tokenizer.sent_tokenize(x)) == 1)
    docs.append(one_sentence + "\n" + BOILERPLATE[language])
    sentences = [[s for s in tokenizer.sent_tokenize(doc)] for doc in docs]
    counts = Counter(simplify_text(s) for doc in sentences for s in doc)
    kept = [s for doc in sentences[:-1] for s in doc if counts[simplify_text(s)] == 1]
    return docs, kept


@pytest.mark.parametrize("language", ["cmn_Hant", "eng_Latn"])
def test_repeated_boilerplate_sentences_are_cut_and_unique_ones_stay(
    write_config, tmp_path, language
):
    docs, unique = _corpus(language)
    raw = write_text(tmp_path / "raw.txt", docs)
    dedup = {"sentences": True, "sentence_min_words": 30}
    path = prepare_config(write_config, [raw], language=language, quality=False, dedup=dedup)
    result = invoke("prepare", path)
    assert result.exit_code == 0, result.output
    corpus = tmp_path / "runs" / "t" / "corpus"
    texts = [
        t for shard in corpus.glob("*.parquet") for t in pq.read_table(shard)["text"].to_pylist()
    ]
    joined = "\n".join(texts)
    boilerplate = language_tokenizer(check_language(language))[0].sent_tokenize(
        BOILERPLATE[language]
    )
    assert len(boilerplate) == 3
    assert all(joined.count(sentence) == 1 for sentence in boilerplate)  # the first copy
    assert all(sentence in joined for sentence in unique)
    assert len(texts) == 30  # the boilerplate-only document is removed
    stats = json.loads((corpus / "stats.json").read_text(encoding="utf-8"))
    row = next(r for r in stats["funnel"] if r["step"] == "sentences")
    assert row == {
        "step": "sentences",
        "in": 31,
        "removed": 1,
        "documents": 30,
        "reasons": {"too_short_after_cutting": 1},
    }
    assert stats["kept"]["characters"] == sum(len(t) for t in texts)  # counted as written
    assert stats["kept"]["bytes"] == sum(len(t.encode("utf-8")) for t in texts)
    cut = stats["sentence_dedup"]
    assert cut["sentences_removed"] >= 3 * 10  # 9 copies cut, 1 in the removed document
    assert cut["documents_cut"] >= 9
    assert cut["characters_cut_from_kept_documents"] >= 9 * len(BOILERPLATE[language]) - 9
    removed = corpus / "removed" / "sentences-too_short_after_cutting.jsonl"
    assert BOILERPLATE[language] in json.loads(removed.read_text(encoding="utf-8"))["text"]
