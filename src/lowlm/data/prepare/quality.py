"""Quality thresholds (FineWeb-2's per language, or datatrove's defaults), calibration on clean
reference text, and the three filters FineWeb-2 applies: Gopher repetition, FineWeb quality,
Gopher quality.

Calibration loosens, never tightens: each threshold moves to where at most
`calibrate_percentile` % of the clean reference documents would fail it (a percentile of the
reference text's own statistic), if it was stricter than that. The statistics are computed as
the filters compute them (datatrove's filters return pass / fail, not the value), with
datatrove's own helpers.
"""

from __future__ import annotations

import inspect
import re
from collections import Counter

import numpy as np
from datatrove.pipeline.filters import (
    FineWebQualityFilter,
    GopherQualityFilter,
    GopherRepetitionFilter,
)
from datatrove.pipeline.filters.gopher_repetition_filter import (
    find_all_duplicate,
    find_duplicates,
    find_top_duplicate,
    get_n_grams,
)
from datatrove.utils.text import PUNCTUATION_SET, TERMINAL_PUNCTUATION

# Bounds of each calibrated figure: "min" thresholds fail documents below them, "max" above.
_LOWER = {"language_score", "line_punct_thr", "min_doc_words", "min_avg_word_length"}
_LOWER |= {"max_non_alpha_words_ratio", "min_stop_words"}  # Gopher's name: a least alpha ratio


def base_thresholds(fineweb2: dict, language_score: float | None, english: bool) -> dict:
    """Per-filter keyword arguments from a FineWeb-2 language configuration, as FineWeb-2's
    pipeline passes them; datatrove's defaults where the configuration is empty."""
    # FineWeb-2's score for the language, else datatrove's LanguageFilter default
    score = language_score if language_score is not None else fineweb2.get("language_score", 0.65)
    thresholds = {
        "language_score": float(score),
        "repetition": {"dup_para_frac": 0, "dup_line_char_frac": 0, "dup_para_char_frac": 0},
        "fineweb": {"short_line_thr": 999, "char_duplicates_ratio": 0.1},
        "gopher": {"min_stop_words": 2},
    }
    if not fineweb2:
        if not english:  # datatrove's default stop words are English ones
            thresholds["gopher"]["min_stop_words"] = None
        return thresholds
    thresholds["repetition"].update(
        dup_line_frac=fineweb2["dup_line_frac"],
        top_n_grams=[tuple(pair) for pair in fineweb2["top_n_grams"]],
        dup_n_grams=[tuple(pair) for pair in fineweb2["dup_n_grams"]],
    )
    thresholds["fineweb"].update(
        line_punct_thr=fineweb2["line_punct_thr"], new_line_ratio=fineweb2["new_line_ratio"]
    )
    thresholds["gopher"].update(
        max_avg_word_length=fineweb2["max_avg_word_length"],
        min_avg_word_length=fineweb2["min_avg_word_length"],
        max_non_alpha_words_ratio=fineweb2["max_non_alpha_words_ratio"],
        stop_words=list(fineweb2["stopwords"]),
    )
    return thresholds


def _defaults(filter_class) -> dict:
    """A filter's default thresholds (its keyword defaults but the writer and language)."""
    return {
        name: p.default
        for name, p in inspect.signature(filter_class.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty and name not in {"exclusion_writer", "language"}
    }


def document_statistics(text: str, tokenizer, stop_words: set[str], repetition: dict) -> dict:
    """The figures each threshold is compared with, for one document."""
    words = tokenizer.word_tokenize(text)
    lines = [line for line in text.split("\n") if line.strip()]
    split_lines = re.split(r"\n+", text)  # as GopherRepetitionFilter splits lines
    if not words or not lines:
        return {}
    non_symbol = [w for w in words if any(ch not in PUNCTUATION_SET for ch in w)]
    figures = {
        "dup_line_frac": find_duplicates(split_lines)[0] / len(split_lines),
        "line_punct_thr": sum(line.endswith(tuple(TERMINAL_PUNCTUATION)) for line in lines)
        / len(lines),
        "char_duplicates_ratio": find_duplicates(lines)[1] / max(len(text.replace("\n", "")), 1),
        "new_line_ratio": text.count("\n") / len(words),
        "min_doc_words": len(non_symbol),
        "min_stop_words": len(stop_words.intersection(words)),
        "max_non_alpha_words_ratio": sum(any(c.isalpha() for c in w) for w in words) / len(words),
        "max_symbol_word_ratio": max(text.count("#"), text.count("...") + text.count("…"))
        / len(words),
    }
    if non_symbol:
        mean_length = float(np.mean([len(w) for w in non_symbol]))
        figures.update(min_avg_word_length=mean_length, max_avg_word_length=mean_length)
    for n, _ in repetition["top_n_grams"]:
        n_grams = get_n_grams(words, n)
        if n_grams:
            figures[f"top_{n}"] = find_top_duplicate(n_grams) / len(text)
    for n, _ in repetition["dup_n_grams"]:
        figures[f"dup_{n}"] = find_all_duplicate(words, n) / len(text)
    return figures


def calibrate(
    thresholds: dict, documents: list[tuple[str, float]], tokenizer, percentile: float
) -> tuple[dict, dict]:
    """(loosened thresholds, what changed) from clean (text, target-language score) pairs."""
    gopher = {**_defaults(GopherQualityFilter), **thresholds["gopher"]}
    repetition = {**_defaults(GopherRepetitionFilter), **thresholds["repetition"]}
    fineweb = {**_defaults(FineWebQualityFilter), **thresholds["fineweb"]}
    stop_words = set(gopher.get("stop_words") or [])
    figures: dict[str, list[float]] = {}
    word_counts: Counter = Counter()
    for text, score in documents:
        figures.setdefault("language_score", []).append(score)
        if not stop_words:
            word_counts.update(w for w in tokenizer.word_tokenize(text) if w.isalpha())
        for name, value in document_statistics(text, tokenizer, stop_words, repetition).items():
            figures.setdefault(name, []).append(value)
    if not figures:
        return thresholds, {}
    changed: dict = {}
    if not stop_words and word_counts:  # FineWeb-2's stop words are its most frequent words
        gopher.update(stop_words=[w for w, _ in word_counts.most_common(8)], min_stop_words=2)
        stop_words = set(gopher["stop_words"])
        figures["min_stop_words"] = [
            len(stop_words.intersection(tokenizer.word_tokenize(text))) for text, _ in documents
        ]
        changed["stop_words"] = gopher["stop_words"]

    def loosen(section: dict, name: str, figure: str, integer: bool = False) -> None:
        values, current = figures.get(figure), section.get(name)
        if not values or current is None:
            return
        if name in _LOWER:
            edge = float(np.percentile(values, percentile))
            new = min(current, int(np.floor(edge)) if integer else edge)
        else:
            new = max(current, float(np.percentile(values, 100 - percentile)))
        if new != current:
            changed[name] = {"from": current, "to": round(new, 4)}
            section[name] = new

    scores = {"language_score": thresholds["language_score"]}
    loosen(scores, "language_score", "language_score")
    loosen(repetition, "dup_line_frac", "dup_line_frac")
    for key, figure in (("top_n_grams", "top"), ("dup_n_grams", "dup")):
        pairs = []
        for n, limit in repetition[key]:
            pair = {f"{figure}_{n}": limit}
            loosen(pair, f"{figure}_{n}", f"{figure}_{n}")
            pairs.append((n, pair[f"{figure}_{n}"]))
        repetition[key] = pairs
    for name in ("line_punct_thr", "char_duplicates_ratio", "new_line_ratio"):
        loosen(fineweb, name, name)
    for name in ("min_avg_word_length", "max_avg_word_length", "max_non_alpha_words_ratio"):
        loosen(gopher, name, name)
    loosen(gopher, "max_symbol_word_ratio", "max_symbol_word_ratio")
    loosen(gopher, "min_doc_words", "min_doc_words", integer=True)
    loosen(gopher, "min_stop_words", "min_stop_words", integer=True)
    calibrated = {
        "language_score": scores["language_score"],
        "repetition": repetition,
        "fineweb": fineweb,
        "gopher": gopher,
    }
    return calibrated, changed


def quality_filters(thresholds: dict, tokenizer, exclusion_writer) -> list:
    """FineWeb-2's three filters, in its order, with the language's word tokenizer;
    `exclusion_writer(step)` gives each its writer of removed samples."""
    steps = (
        (GopherRepetitionFilter, "repetition"),
        (FineWebQualityFilter, "fineweb"),
        (GopherQualityFilter, "gopher"),
    )
    return [
        cls(**thresholds[key], language=tokenizer, exclusion_writer=exclusion_writer(key))
        for cls, key in steps
    ]
