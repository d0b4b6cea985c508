"""Everything `lowlm prepare` decides before datatrove runs, then the runs themselves.

`resolve` checks the configuration in the main process (language code, word tokenizer, LID
model and its label, inputs, thresholds and calibration, the decontamination index), so bad
input stops in one line before any task starts; `run_pipeline` runs the phases and writes the
kept documents, the removed samples and stats.json into the stage's (temporary) folder.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lowlm.config import LowlmConfig
from lowlm.data.prepare import (
    decontaminate,
    inputs,
    languages,
    lid,
    pipeline,
    quality,
    readers,
    summary,
)
from lowlm.errors import LowlmError


@dataclass
class Resolved:
    row: languages.LanguageRow
    tokenizer: object
    tokenizer_name: str
    lid_path: Path
    lid_label: str
    files: list[tuple[str, str]]
    datasets: list[str]
    thresholds: dict
    thresholds_source: str
    calibration: dict = field(default_factory=dict)
    decontamination: dict = field(default_factory=dict)
    n_grams: int = 13
    whole_min: int = 8  # units of the shortest string matched on its whole text


def resolve(config: LowlmConfig, work: Path, task_texts: Callable) -> Resolved:
    cfg = config.prepare
    row = languages.check_language(cfg.language)
    tokenizer, tokenizer_name = languages.word_tokenizer(row)
    lid_path = lid.model_file(cfg.lid.model)
    lid_label = lid.model_label(lid.load_model(lid_path), row, cfg.lid.model)
    files, datasets = inputs.resolve_inputs(cfg.inputs)
    _check_warc_extras(files)
    fineweb2, source = languages.fineweb2_config(row, cfg.language_config)
    thresholds = quality.base_thresholds(fineweb2, cfg.lid.threshold, row.code == "eng_Latn")
    resolved = Resolved(
        row, tokenizer, tokenizer_name, lid_path, lid_label, files, datasets, thresholds, source
    )
    if cfg.calibrate_from:
        _calibrate(config, resolved, work)
    by_chars = tokenizer_name == "characters"
    decont = cfg.decontaminate
    resolved.n_grams = decont.char_n_gram if by_chars else decont.n_gram
    resolved.whole_min = decont.whole_min_chars if by_chars else decont.whole_min_words
    if decont.enabled:
        texts, skipped = decontaminate.benchmark_texts(config, task_texts)
        index = (work / "decont-index", tokenizer, resolved.n_grams, resolved.whole_min)
        counts, short = decontaminate.write_index(texts, *index)
        unit = "characters" if by_chars else "words"
        resolved.decontamination = decontaminate.describe(
            counts, short, skipped, resolved.n_grams, resolved.whole_min, unit
        )
    return resolved


def _check_warc_extras(files: list[tuple[str, str]]) -> None:
    missing = [m for m in ("warcio", "trafilatura") if importlib.util.find_spec(m) is None]
    if missing and any(kind == "warc" for _, kind in files):
        raise LowlmError(
            f"WARC inputs need {' and '.join(missing)} (text extraction as FineWeb does): "
            "pip install 'datatrove[io,processing]'."
        )


def _calibrate(config: LowlmConfig, resolved: Resolved, work: Path) -> None:
    cfg = config.prepare
    files, datasets = inputs.resolve_inputs(cfg.calibrate_from)
    if datasets:
        raise LowlmError("prepare.calibrate_from takes local files, not dataset names.")
    reader = readers.InputReader(files, cfg.text_field, cfg.documents, str(work / "calib-bad"))
    language = lid.TargetLanguageFilter(
        str(resolved.lid_path), resolved.lid_label, resolved.thresholds["language_score"]
    )
    documents = []
    for doc in reader.run(None, 0, 1):
        language.filter(doc)
        documents.append((doc.text, doc.metadata["target_language_score"]))
        if len(documents) >= 20_000:
            break
    bad = readers.read_bad_files(work / "calib-bad")
    if bad:
        raise LowlmError(f"prepare.calibrate_from: {bad[0]['file']}: {bad[0]['reason']}.")
    if not documents:
        raise LowlmError("prepare.calibrate_from holds no document; point it at clean text.")
    resolved.thresholds, changed = quality.calibrate(
        resolved.thresholds, documents, resolved.tokenizer, cfg.calibrate_percentile
    )
    resolved.calibration = {
        "documents": len(documents),
        "percentile": cfg.calibrate_percentile,
        "changed": changed,
    }


def _filter_steps(config: LowlmConfig, resolved: Resolved, work: Path, writer) -> list:
    cfg = config.prepare
    steps: list = [
        readers.InputReader(resolved.files, cfg.text_field, cfg.documents, str(work / "bad-files")),
        *readers.hf_readers(resolved.datasets, cfg.text_field, cfg.hf_split),
        lid.TargetLanguageFilter(
            str(resolved.lid_path),
            resolved.lid_label,
            resolved.thresholds["language_score"],
            writer("language"),
        ),
    ]
    script = lid.script_variant(resolved.row)
    if script:
        steps.append(lid.HanScriptFilter(script, cfg.lid.script_threshold, writer("script")))
    if cfg.decontaminate.enabled and resolved.decontamination.get("index_ngrams"):
        steps.append(
            decontaminate.DecontaminationFilter(
                work / "decont-index",
                resolved.tokenizer,
                resolved.n_grams,
                resolved.whole_min,
                writer("decontaminate"),
            )
        )
    if cfg.quality:
        steps += quality.quality_filters(resolved.thresholds, resolved.tokenizer, writer)
    return steps


def run_pipeline(
    config: LowlmConfig, resolved: Resolved, work: Path, out: Path, say: Callable[[str], None]
) -> dict:
    """Run every phase; write out/*.parquet, out/removed/<reason>.jsonl, out/stats.json."""
    cfg = config.prepare
    runner = pipeline.Runner(cfg.executor, work)
    removed = work / "removed"

    def writer(step: str):
        if not cfg.removed_samples:
            return None
        return pipeline.RemovedSamples(str(removed / step), step, cfg.removed_samples)

    filtered = work / "filtered"
    steps = _filter_steps(config, resolved, work, writer)
    steps.append(pipeline.JsonlWriter(str(filtered), output_filename="${rank}.jsonl.gz"))
    tasks = cfg.executor.tasks or max(len(resolved.files) + len(resolved.datasets), 1)
    sizes = [os.path.getsize(path) for path, _ in resolved.files]
    task_bytes = [sum(sizes[rank::tasks]) for rank in range(tasks)]  # InputReader's sharding
    phase = runner.run("filter", steps, tasks, task_bytes)
    say(summary.progress_line(phase, "read and filtered", sum(sizes)))
    bad_files = readers.read_bad_files(work / "bad-files")
    summary.check_bad_files(bad_files, cfg.bad_files)
    shards = pipeline.shard_count(filtered)
    if shards == 0:
        raise LowlmError(summary.everything_removed(runner.phases))
    dedup_filters = pipeline.dedup_phases(runner, filtered, work, resolved.tokenizer, cfg.dedup)
    final = [pipeline.shard_reader(filtered), *(make(writer) for make in dedup_filters)]
    final += pipeline.final_touches(cfg.pii)
    data = config.data
    final.append(pipeline.MarkHeldOut(config.run.seed, data.heldout_fraction, data.nfkc))
    if cfg.dedup.rehydrate:
        final.append(pipeline.Rehydrate(cfg.dedup.max_copies))
    final.append(pipeline.CountWritten())
    final.append(pipeline.output_writer(work / "output"))  # moved into `out` once complete
    phase = runner.run("write", final, shards)
    say(summary.progress_line(phase, "deduplicated and written"))
    for shard in sorted((work / "output").glob("*.parquet")):
        shard.replace(out / shard.name)
    stats = summary.build_stats(config, resolved, runner.phases, out, bad_files)
    if stats["kept"]["documents"] == 0:
        raise LowlmError(summary.everything_removed(runner.phases))
    summary.write_removed_samples(removed, out / "removed", cfg.removed_samples)
    stats["seconds"] = round(sum(p.seconds for p in runner.phases), 2)
    stats["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    return stats
