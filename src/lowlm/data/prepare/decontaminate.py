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
"""

from __future__ import annotations

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


def write_index(
    texts: dict[str, dict], folder: Path, tokenizer, n_grams: int
) -> tuple[dict[str, int], dict[str, int]]:
    """Write `<benchmark>.index.hashes` per benchmark; returns the n-gram count of each and,
    per benchmark, how many questions are shorter than one n-gram (they cannot be matched)."""
    config = NGramsDecontConfig(n_grams=n_grams)
    hash_func = create_hash_func(config.hash_config)
    folder.mkdir(parents=True, exist_ok=True)
    counts, too_short = {}, {}
    for name, entry in texts.items():
        hashes = set()
        too_short[name] = 0
        for kind, strings in entry.items():
            for text in strings:
                words = tokenizer.word_tokenize(simplify_text(text, config.norm_config))
                too_short[name] += kind == "questions" and len(words) < n_grams
                hashes.update(hash_func(" ".join(gram)) for gram in ngrams(words, n_grams))
        if not hashes:
            continue
        array = np.array(sorted(hashes), dtype=config.hash_config.np_descr)
        array.tofile(folder / f"{name}.index.hashes")
        counts[name] = len(hashes)
    if texts and not counts:
        raise LowlmError(
            f"no eval question or SFT test text is {n_grams} units long, so nothing can be "
            "checked; lower prepare.decontaminate.n_gram / char_n_gram or turn it off."
        )
    return counts, too_short


def decontamination_filter(folder: Path, tokenizer, n_grams: int, exclusion_writer):
    return NGramsDecontFilter(
        str(folder),
        NGramsDecontConfig(n_grams=n_grams),
        exclusion_writer=exclusion_writer,
        language=tokenizer,
    )


def describe(
    counts: dict[str, int], too_short: dict[str, int], skipped: list[str], n_grams: int, unit: str
) -> dict:
    return {
        "n_gram": n_grams,
        "unit": unit,
        "index_ngrams": counts,
        "questions_shorter_than_n_gram": too_short,
        "not_checked": skipped,
    }
