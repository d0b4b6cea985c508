"""Recall of `lowlm prepare` on a synthetic noisy corpus: target-language documents mixed with
other-language ones, exact and near copies, spam and planted benchmark questions; the clean
fraction kept with thresholds calibrated on clean text of the same kind (disjoint from the
corpus). zh-TW from the bundled demo text (Simplified Chinese from the real-text assets when
present); pt-BR from the assets only (skipped without them). Run with -s to see the figures."""

from __future__ import annotations

import json
import random

import pytest
from typer.testing import CliRunner

from lowlm.cli import app

from .conftest import ASSETS, DEMO

ZH = (DEMO / "zh-tw.txt").read_text(encoding="utf-8").splitlines()
EN = (DEMO / "en.txt").read_text(encoding="utf-8").splitlines()
SPAM_ZH = [
    "限時優惠！立即購買",
    "點擊這裡領取大獎",
    "首頁 | 產品 | 關於我們 | 聯絡我們",
    "免費 免費 免費 熱銷",
]
SPAM_PT = ["Compre agora! Oferta imperdível", "Clique aqui e ganhe", "Início | Produtos | Contato"]


def _blocks(lines: list[str], size: int) -> list[str]:
    return ["\n".join(lines[i : i + size]) for i in range(0, len(lines) - size + 1, size)]


def _near(text: str, rng: random.Random) -> str:
    """A near copy: one Han character in 150, or one word in 100, replaced (at least one)."""
    if sum("\u4e00" <= c <= "\u9fff" for c in text) > len(text) / 3:
        chars = list(text)
        for _ in range(max(1, len(chars) // 150)):
            chars[rng.randrange(len(chars))] = "的"
        return "".join(chars)
    words = text.split(" ")
    for _ in range(max(1, len(words) // 100)):
        words[rng.randrange(len(words))] = "também"
    return " ".join(words)


def _spam(phrases: list[str], rng: random.Random) -> str:
    lines = [f"{rng.choice(phrases)} {rng.randint(1, 9999)}" for _ in range(14)]
    return "\n".join(lines + [rng.choice(phrases)] * 6)


def _mc_file(path, questions: list[str], choices: list[str]):
    rows = [dict(zip("ABCD", choices, strict=True), question=q, answer=0) for q in questions]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return path


def build_corpus(clean, other, planted_base, questions, spam_phrases, extra=None):
    """[(category, id, text)] and the documents of each category."""
    rng = random.Random(0)
    docs = [("clean", f"clean-{i}", t) for i, t in enumerate(clean)]
    docs += [("other", f"other-{i}", t) for i, t in enumerate(other)]
    docs += [("exact", f"exact-{i}", clean[i]) for i in range(40)]
    docs += [("near", f"near-{i}", _near(clean[40 + i], rng)) for i in range(40)]
    docs += [("spam", f"spam-{i}", _spam(spam_phrases, rng)) for i in range(40)]
    docs += [
        ("planted", f"planted-{i}", f"{base}\n{q}")
        for i, (base, q) in enumerate(zip(planted_base, questions, strict=False))
    ]
    for category, texts in (extra or {}).items():
        docs += [(category, f"{category}-{i}", t) for i, t in enumerate(texts)]
    rng.shuffle(docs)
    return docs


def measure(
    tmp_path, write_config, docs, language, reference, eval_tasks, calibrate=True, decont=None
) -> dict:
    corpus = tmp_path / "noisy.jsonl"
    corpus.write_text(
        "".join(json.dumps({"id": i, "text": t}, ensure_ascii=False) + "\n" for _, i, t in docs),
        encoding="utf-8",
    )
    clean_file = tmp_path / "clean.txt"
    clean_file.write_text("\n\n".join(reference) + "\n", encoding="utf-8")
    path = write_config(
        prepare={
            "inputs": [str(corpus)],
            "language": language,
            "calibrate_from": [str(clean_file)] if calibrate else [],
            "removed_samples": 100_000,
            "executor": {"workers": 2},
            "decontaminate": decont or {},
        },
        eval={"tasks": eval_tasks},
    )
    result = CliRunner().invoke(app, ["prepare", str(path)])
    assert result.exit_code == 0, result.output
    out = tmp_path / "runs" / "t" / "corpus"
    import pyarrow.parquet as pq

    kept = {r["id"] for s in out.glob("*.parquet") for r in pq.read_table(s).to_pylist()}
    removed_by = {}
    for file in (out / "removed").glob("*.jsonl"):
        for line in file.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            removed_by[record["id"]] = record["metadata"]["removed_by"]
    ids = {cat: [i for c, i, _ in docs if c == cat] for cat in {c for c, _, _ in docs}}

    def removed_share(category: str) -> float:
        return sum(i not in kept for i in ids[category]) / len(ids[category])

    copies = {"exact": "clean-{}", "near": "clean-{}"}
    figures = {cat: removed_share(cat) for cat in ("other", "spam", "planted")}
    for cat, original in copies.items():  # a copy counts as caught unless both survive
        offset = 0 if cat == "exact" else 40
        pairs = [(f"{cat}-{n}", original.format(n + offset)) for n in range(40)]
        figures[cat] = sum(not (a in kept and b in kept) for a, b in pairs) / len(pairs)
    copied = {f"clean-{n}" for n in range(80)}
    singles = [i for i in ids["clean"] if i not in copied]
    figures["clean_kept"] = sum(i in kept for i in singles) / len(singles)
    figures["planted_by_decontamination"] = sum(
        removed_by.get(i, "").startswith("decontaminate") for i in ids["planted"]
    ) / len(ids["planted"])
    figures["removed_by"] = removed_by
    figures["ids"] = ids
    figures["kept"] = kept
    figures["stats"] = json.loads((out / "stats.json").read_text(encoding="utf-8"))
    return figures


def add_checkable_recall(figures: dict, questions: list[str], language: str, n: int) -> None:
    """Recall over the planted questions at least one n-gram long: a shorter one cannot be
    matched by n-gram decontamination at all (stats.json counts them per benchmark)."""
    from datatrove.utils.text import TextNormConfig, simplify_text

    from lowlm.data.prepare.languages import check_language, word_tokenizer

    tokenizer, _ = word_tokenizer(check_language(language))
    long_enough = [
        f"planted-{i}"
        for i, q in enumerate(questions)
        if len(tokenizer.word_tokenize(simplify_text(q, TextNormConfig()))) >= n
    ]
    figures["planted_checkable"] = sum(i not in figures["kept"] for i in long_enough) / len(
        long_enough
    )
    figures["planted_too_short"] = float(len(questions) - len(long_enough))


OFF = {"whole_min_chars": 20}  # no string is both shorter than 20 characters and this long


def _report(name: str, figures: dict) -> None:
    shown = {k: round(v, 3) for k, v in figures.items() if isinstance(v, float)}
    print(f"\nrecall ({name}): {json.dumps(shown)}")


@pytest.mark.slow
def test_recall_on_a_noisy_zh_tw_corpus(write_config, tmp_path):
    lines = [line for line in ZH if line.strip()]
    clean = _blocks(lines[:1500], 5)
    reference = _blocks(lines[1500:2400], 5)
    planted_base = _blocks(lines[2400:2700], 5)
    questions = [line for line in lines[2700:] if len(line) >= 30][:30]
    mc = tmp_path / "quiz.jsonl"
    mc.write_text(
        "".join(
            json.dumps(
                {"question": q, "A": "是", "B": "否", "C": "都是", "D": "都不是", "answer": 0}
            )
            + "\n"
            for q in questions
        ),
        encoding="utf-8",
    )
    extra = {}
    simplified_dir = ASSETS / "corpus" / "zh-CN"
    if simplified_dir.is_dir():
        simplified = (simplified_dir / "libreoffice-help-zh-cn.txt").read_text(encoding="utf-8")
        extra["simplified"] = _blocks(simplified.splitlines()[:2000], 5)[:100]
    docs = build_corpus(clean, _blocks(EN, 4)[:80], planted_base, questions, SPAM_ZH, extra=extra)
    tasks = [{"name": "mc", "path": str(mc)}]
    figures = measure(tmp_path, write_config, docs, "cmn_Hant", reference, tasks)
    if extra:
        ids = figures["ids"]
        figures["simplified_removed"] = sum(
            i not in figures["kept"] for i in ids["simplified"]
        ) / len(ids["simplified"])
        removed_by = figures["removed_by"]
        figures["simplified_removed_by_script_check"] = sum(
            removed_by.get(i, "").startswith("script") for i in ids["simplified"]
        ) / len(ids["simplified"])
        by_script = [i for i in ids["clean"] if removed_by.get(i, "").startswith("script")]
        figures["traditional_kept_by_script_check"] = 1 - len(by_script) / len(ids["clean"])
    uncalibrated = measure(tmp_path, write_config, docs, "cmn_Hant", reference, [], False)
    figures["clean_kept_fineweb2_thresholds"] = uncalibrated["clean_kept"]
    # Questions shorter than one n-gram (3 of the 30) matched whole, or (min = the n-gram) not.
    n_grams_only = measure(tmp_path, write_config, docs, "cmn_Hant", reference, tasks, True, OFF)
    for name in ("planted", "clean_kept"):
        figures[f"{name}_n_grams_only"] = n_grams_only[name]
    add_checkable_recall(figures, questions, "cmn_Hant", 20)
    _report("zh-TW", figures)
    assert figures["other"] >= 0.95
    assert figures["exact"] == 1.0
    assert figures["near"] >= 0.9
    assert figures["spam"] >= 0.8
    assert figures["planted_too_short"] == 3 and figures["planted_n_grams_only"] < 1.0
    assert figures["planted"] >= 0.95 and figures["planted_by_decontamination"] >= 0.95
    assert figures["clean_kept"] >= 0.85
    if extra:
        assert figures["simplified_removed"] >= 0.9
        assert figures["traditional_kept_by_script_check"] >= 0.95


@pytest.mark.slow
def test_recall_on_a_noisy_pt_br_corpus(write_config, tmp_path):
    folder = ASSETS / "corpus" / "pt-BR"
    mmlu = ASSETS / "bench" / "mmlu" / "data"
    if not folder.is_dir() or not mmlu.is_dir():
        pytest.skip(f"the real-text assets are not in {ASSETS}")
    lines = (folder / "libreoffice-help-pt-br.txt").read_text(encoding="utf-8").splitlines()
    lines = [line for line in lines if line.strip()]
    clean = _blocks(lines[:2000], 5)
    reference = _blocks(lines[2000:4000], 5)
    planted_base = _blocks(lines[4000:4200], 5)
    questions = [line for line in lines[4200:5000] if len(line.split()) >= 15][:30]
    mc = _mc_file(tmp_path / "prova.jsonl", questions, ["sim", "não", "ambos", "nenhum"])
    # MMLU (the native release layout) is indexed too: its questions are English, so copies of
    # them in a pt-BR crawl would leave with the language filter first.
    mmlu_task = {"name": "mmlu", "path": str(mmlu), "subjects": ["high_school_us_history"]}
    tasks = [{"name": "mc", "path": str(mc)}, mmlu_task]
    other = _blocks(EN, 4)[:40] + _blocks(ZH, 5)[:40]
    docs = build_corpus(clean, other, planted_base, questions, SPAM_PT)
    figures = measure(tmp_path, write_config, docs, "por_Latn", reference, tasks)
    assert set(figures["stats"]["decontamination"]["index_ngrams"]) == {"mc-prova", "mmlu"}
    uncalibrated = measure(tmp_path, write_config, docs, "por_Latn", reference, [], False)
    figures["clean_kept_fineweb2_thresholds"] = uncalibrated["clean_kept"]
    add_checkable_recall(figures, questions, "por_Latn", 13)
    _report("pt-BR", figures)
    assert figures["other"] >= 0.95
    assert figures["exact"] == 1.0
    assert figures["near"] >= 0.9
    assert figures["spam"] >= 0.8
    assert figures["planted_checkable"] >= 0.95
    assert figures["clean_kept"] >= 0.85
