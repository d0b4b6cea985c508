"""Benchmark decontamination: the n-gram index of the run's eval questions and SFT test data.

datatrove's NGramsDecontIndexer takes its questions from lighteval's task registry (the Hub);
lowlm's benchmarks are the local files its eval tasks name (MMLU / C-Eval / CMMLU / TMMLU+
release folders, `mc` files) and the SFT test files. So the index is written here in the
indexer's format (per benchmark, `<name>.index.hashes`: the uint64 hashes of every n-gram,
text simplified and split exactly as the filter will), and datatrove's NGramsDecontFilter does
the removing and counts hits per benchmark (stat `contaminated_<name>`).

Each question is indexed alone, each choice alone, and the question followed by its choices
(an n-gram of a copied exam item can span both). Words for languages written with spaces
(`n_gram`, 13 by default), characters for Han and kana (`char_n_gram`, 20: a Chinese word is
about 1.5 characters).

A string shorter than one n-gram has no n-gram to find; one at least `whole_min` units long
(8 words, GPT-3's floor for its per-benchmark n-gram; 12 characters) is matched on its whole
text instead: `whole-texts.json` in the index folder, which `DecontaminationFilter` (datatrove's
filter, then this check on the documents it keeps) reads. Shorter ones are too common to
remove documents for, and are counted as unchecked.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
from datatrove.pipeline.decont import NGramsDecontConfig, NGramsDecontFilter
from datatrove.utils.hashing import create_hash_func
from datatrove.utils.text import ngrams, simplify_text

from lowlm.config import EvalTask, LowlmConfig
from lowlm.errors import LowlmError

BENCHMARK_TASKS = {"mmlu", "ceval", "cmmlu", "tmmluplus"}


def _record_strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _record_strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _record_strings(v)]
    return []


def benchmark_texts(
    config: LowlmConfig, task_texts: Callable[[EvalTask], dict[str, list[str]]]
) -> tuple[dict[str, dict], list[str]]:
    """({benchmark name: {"questions": [...], "other": [choices, question + choices, SFT
    strings]}}, [tasks not checked, with why]) for the eval tasks the config names (eval,
    pretrain and sft eval_tasks) and prepare.decontaminate.sft_test. `task_texts` reads one
    eval task's questions (evaluation's reader, handed in by the stage: data sits below
    evaluation and does not import it)."""
    from lowlm.data.records import read_records

    tasks = [*config.eval.tasks, *config.pretrain.eval_tasks, *config.sft.eval_tasks]
    texts: dict[str, dict] = {}
    skipped: list[str] = []
    seen = set()
    for task in tasks:
        if task.name == "ppl" or (task.name, task.path) in seen:
            continue  # ppl texts are the run's own held-out documents, not a benchmark
        seen.add((task.name, task.path))
        if task.name in BENCHMARK_TASKS and not task.path:
            skipped.append(f"{task.name} (no local path; the Hub copy is not read offline)")
            continue
        name = task.name if task.name != "mc" else f"mc-{Path(task.path or '').stem}"
        entry = texts.setdefault(_safe(name), {"questions": [], "other": []})
        for kind, found in task_texts(task).items():
            entry[kind] += found
    for pattern in config.prepare.decontaminate.sft_test:
        for where, record in read_records(pattern):
            name = _safe(f"sft_test-{Path(where.rsplit(':', 1)[0]).stem}")
            entry = texts.setdefault(name, {"questions": [], "other": []})
            entry["other"] += _record_strings(record)
    return texts, skipped


def _safe(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name)


WHOLE_TEXTS = "whole-texts.json"  # [[benchmark, [unit, ...]], ...]: matched on their whole text


def write_index(
    texts: dict[str, dict], folder: Path, tokenizer, n_grams: int, whole_min: int
) -> tuple[dict[str, int], dict[str, dict]]:
    """Write `<benchmark>.index.hashes` per benchmark and the strings shorter than one n-gram
    but at least `whole_min` units long (whole-texts.json); returns the n-gram count of each
    benchmark and, per benchmark, how many questions are shorter than one n-gram, how many of
    those are matched whole, and how many strings of any kind are matched whole."""
    config = NGramsDecontConfig(n_grams=n_grams)
    hash_func = create_hash_func(config.hash_config)
    folder.mkdir(parents=True, exist_ok=True)
    counts, short, whole = {}, {}, {}
    for name, entry in texts.items():
        hashes: set[int] = set()
        wholes: set[tuple[str, ...]] = set()
        short[name] = {"questions": 0, "questions_matched_whole": 0}
        for kind, strings in entry.items():
            for text in strings:
                words = tokenizer.word_tokenize(simplify_text(text, config.norm_config))
                if whole_min <= len(words) < n_grams:
                    wholes.add(tuple(words))
                if kind == "questions" and len(words) < n_grams:
                    short[name]["questions"] += 1
                    short[name]["questions_matched_whole"] += len(words) >= whole_min
                hashes.update(hash_func(" ".join(gram)) for gram in ngrams(words, n_grams))
        short[name]["strings_matched_whole"] = len(wholes)
        if hashes:
            array = np.array(sorted(hashes), dtype=config.hash_config.np_descr)
            array.tofile(folder / f"{name}.index.hashes")
        if hashes or wholes:
            counts[name] = len(hashes)
            whole[name] = sorted(wholes)
    if texts and not counts:
        raise LowlmError(
            f"no eval question or SFT test text is {whole_min} units long, so nothing can be "
            "checked; lower prepare.decontaminate.n_gram / char_n_gram and its whole-text "
            "minimum, or turn it off."
        )
    listed = [[name, list(words)] for name, strings in whole.items() for words in strings]
    (folder / WHOLE_TEXTS).write_text(json.dumps(listed, ensure_ascii=False), encoding="utf-8")
    return counts, short


class DecontaminationFilter(NGramsDecontFilter):
    """datatrove's n-gram filter; a document it keeps is then searched for the strings shorter
    than one n-gram (whole-texts.json), each found only as a whole run of units."""

    def __init__(self, folder: Path, tokenizer, n_grams: int, whole_min: int, exclusion_writer):
        config = NGramsDecontConfig(n_grams=n_grams)
        super().__init__(str(folder), config, exclusion_writer=exclusion_writer, language=tokenizer)
        self.whole_path, self.whole_min = folder / WHOLE_TEXTS, whole_min
        self._whole: dict[tuple[str, ...], list[tuple[tuple[str, ...], str]]] | None = None

    def filter(self, doc) -> bool | tuple[bool, str]:
        kept = super().filter(doc)
        if kept is not True:
            return kept
        if self._whole is None:  # keyed by their first whole_min units
            self._whole = {}
            for name, words in json.loads(self.whole_path.read_text(encoding="utf-8")):
                self._whole.setdefault(tuple(words[: self.whole_min]), []).append(
                    (tuple(words), name)
                )
        if not self._whole:
            return True
        units = self.tokenizer.word_tokenize(simplify_text(doc.text, self.config.norm_config))
        for start in range(len(units) - self.whole_min + 1):
            for words, name in self._whole.get(tuple(units[start : start + self.whole_min]), ()):
                if tuple(units[start : start + len(words)]) == words:
                    doc.metadata["contaminated_ngram"] = " ".join(words)
                    doc.metadata["contaminated_task"] = name
                    self.stat_update(f"contaminated_{name}")
                    return False, "contaminated"
        return True


def describe(
    counts: dict[str, int],
    short: dict[str, dict],
    skipped: list[str],
    n_grams: int,
    whole_min: int,
    unit: str,
) -> dict:
    return {
        "n_gram": n_grams,
        "unit": unit,
        "whole_text_min": whole_min,
        "index_ngrams": counts,
        "questions_shorter_than_n_gram": {k: v["questions"] for k, v in short.items()},
        "questions_matched_whole": {k: v["questions_matched_whole"] for k, v in short.items()},
        "strings_matched_whole": {k: v["strings_matched_whole"] for k, v in short.items()},
        "not_checked": skipped,
    }
