"""Language codes, FineWeb-2's per-language thresholds, and the word tokenizer of each language.

Codes are FineWeb-2's (`por_Latn`, `cmn_Hani`): every row of datatrove's
tokenizer_assignment.csv, plus `cmn_Hant` / `cmn_Hans` (Mandarin kept in one script).
Word splitting decides what the quality filters, MinHash and decontamination call a word, so
a language written without spaces is never split on whitespace: Han and kana scripts by
character (what FineWeb-2's spaCy tokenizer does for Chinese), Thai, Khmer, Lao, Burmese and
Tibetan by datatrove's segmenters, which need their package; a missing one is refused.
"""

from __future__ import annotations

import csv
import difflib
import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import regex
import yaml
from datatrove.utils._import_utils import ASSETS_PATH
from datatrove.utils.word_tokenizers import WordTokenizer, load_word_tokenizer

from lowlm.errors import LowlmError

SHIPPED_CONFIGS = Path(__file__).with_name("fineweb2")
# Mandarin in one script: LID and thresholds of cmn_Hani, then a document-level script check.
SCRIPT_VARIANTS = {"cmn_Hant": "cmn_Hani", "cmn_Hans": "cmn_Hani"}
_CHARACTER_SCRIPTS = {"Hani", "Hans", "Hant", "Jpan", "Hira", "Kana", "Yiii"}
# datatrove segmenter class -> (module it imports, pip package that provides it)
_SEGMENTERS = {
    "ThaiTokenizer": ("pythainlp", "pythainlp"),
    "KhmerTokenizer": ("khmernltk", "khmer-nltk"),
    "LaoTokenizer": ("laonlp", "laonlp"),
    "BurmeseTokenizer": ("pyidaungsu", "pyidaungsu"),
    "TibetanTokenizer": ("botok", "botok"),
    "KiwiTokenizer": ("kiwipiepy", "kiwipiepy"),
    "IndicNLPTokenizer": ("indicnlp", "indic-nlp-library"),
}


@dataclass(frozen=True)
class LanguageRow:
    code: str  # code_3 + "_" + script
    iso1: str  # ISO 639-1 where the language has one (fastText lid.176 labels)
    script: str
    name: str
    tokenizer: str  # datatrove's WordTokenizer class for it


@lru_cache(maxsize=1)
def language_table() -> dict[str, LanguageRow]:
    rows: dict[str, LanguageRow] = {}
    with open(Path(ASSETS_PATH) / "tokenizer_assignment.csv", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            code = f"{row['code_3']}_{row['script']}"
            rows.setdefault(
                code, LanguageRow(code, row["code_1"], row["script"], row["name"], row["type"])
            )
    for variant, base in SCRIPT_VARIANTS.items():
        mandarin = rows[base]
        rows[variant] = LanguageRow(
            variant, mandarin.iso1, variant[-4:], mandarin.name, mandarin.tokenizer
        )
    return rows


def check_language(code: str | None) -> LanguageRow:
    """The row of a FineWeb-2 code; an unknown one is refused with the nearest valid codes."""
    if not code:
        raise LowlmError(
            "prepare.language is not set; give the target language as a FineWeb-2 code such as "
            "por_Latn, swh_Latn or cmn_Hant."
        )
    table = language_table()
    if code in table:
        return table[code]
    by_name = [r.code for r in table.values() if r.name.lower() == code.lower()]
    prefix = regex.split(r"[-_]", code)[0].lower()
    by_prefix = [r.code for r in table.values() if prefix in (r.code.split("_")[0], r.iso1)]
    close = by_name + by_prefix[:4] + difflib.get_close_matches(code, list(table), n=4, cutoff=0.5)
    hint = ", ".join(dict.fromkeys(close)) or "por_Latn, swh_Latn, cmn_Hant"
    raise LowlmError(
        f"prepare.language '{code}' is not a FineWeb-2 language code (language_Script); "
        f"did you mean {hint}?"
    )


def fineweb2_config(row: LanguageRow, path: str | None) -> tuple[dict, str]:
    """(thresholds, where they come from): the file the user names, else the one shipped for
    the language (cmn_Hant / cmn_Hans use cmn_Hani's), else {} (datatrove's defaults)."""
    if path is None:
        shipped = SHIPPED_CONFIGS / f"{SCRIPT_VARIANTS.get(row.code, row.code)}.yml"
        if not shipped.is_file():
            return {}, "datatrove defaults (no FineWeb-2 configuration shipped for the language)"
        path = str(shipped)
    try:
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise LowlmError(f"prepare.language_config {path} cannot be read ({exc}).") from None
    if not isinstance(loaded, dict) or "stopwords" not in loaded:
        raise LowlmError(
            f"prepare.language_config {path} is not a FineWeb-2 language configuration "
            "(a mapping with language_score, stopwords, dup_line_frac, ...)."
        )
    return loaded, f"FineWeb-2 {Path(path).name}"


class CharacterTokenizer(WordTokenizer):
    """Han / kana text by character, Latin words and numbers whole, punctuation apart.

    Ours because datatrove's Chinese and Japanese tokenizers need spaCy (a 72-package extra);
    spaCy's default Chinese segmentation is by character too, which FineWeb-2's cmn_Hani
    thresholds were measured with."""

    _TOKEN = regex.compile(
        r"[\p{Han}\p{Hiragana}\p{Katakana}\p{Yi}]|[\p{L}\p{M}\p{N}_]+|[^\s\p{L}\p{M}\p{N}_]"
    )
    # a sentence ends after 。！？ (with any closing quotes or brackets), or at a line end
    _SENTENCE_END = regex.compile(r"[。！？!?]+[」』”’）)]*|\n")

    def word_tokenize(self, text: str) -> list[str]:
        return self._TOKEN.findall(text)

    def sent_tokenize(self, text: str) -> list[str]:
        return [text[start:end] for start, end in self.span_tokenize(text)]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        """Sentence spans (datatrove's meaning: what sentence dedup cuts), without the
        whitespace around them."""
        spans, start = [], 0
        ends = [m.end() for m in self._SENTENCE_END.finditer(text)] + [len(text)]
        for end in ends:
            piece = text[start:end]
            if piece.strip():
                left = start + len(piece) - len(piece.lstrip())
                spans.append((left, start + len(piece.rstrip())))
            start = end
        return spans


class RegexWordTokenizer(CharacterTokenizer):
    """Letters-and-digits runs as words, each punctuation mark apart (spaCy-like) for languages
    written with spaces. Ours because datatrove's tokenizers for them need spaCy or Stanza."""

    _TOKEN = regex.compile(r"[\p{L}\p{M}\p{N}_]+(?:['’][\p{L}]+)*|[^\s\p{L}\p{M}\p{N}_]")
    # . ! ? … (with closing quotes or brackets) before a space, or a line end; like spaCy's
    # sentencizer but without its abbreviation exceptions ("Sr. Silva" is split)
    _SENTENCE_END = regex.compile(r"[.!?…]+[\"'”’»)\]]*(?=\s)|\n")


def word_tokenizer(row: LanguageRow):
    """The WordTokenizer the filters, MinHash and decontamination use for this language, and
    its name; a segmenter whose package is missing is refused, naming the package."""
    if row.script in _CHARACTER_SCRIPTS:
        return CharacterTokenizer(row.code), "characters"
    if row.tokenizer in _SEGMENTERS:
        module, package = _SEGMENTERS[row.tokenizer]
        if importlib.util.find_spec(module) is None:
            raise LowlmError(
                f"{row.code} ({row.name}) is written without spaces between words and needs "
                f"datatrove's {row.tokenizer}: pip install {package}"
            )
        return load_word_tokenizer(row.code), row.tokenizer
    if row.tokenizer == "SpaCyTokenizer" and importlib.util.find_spec("spacy") is not None:
        return load_word_tokenizer(row.code), "spaCy"
    return RegexWordTokenizer(row.code), "regex words"
