"""datatrove's per-step stats turned into stats.json: the funnel, removals per reason,
contamination per benchmark, the language-score histogram, and the one-line refusals."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from lowlm.config import LowlmConfig
from lowlm.data.prepare.lid import SCORE_BINS
from lowlm.data.prepare.pipeline import CountWritten
from lowlm.errors import LowlmError
from lowlm.rundir import atomic_write_text

# datatrove step name -> the funnel's name for it
STEP_NAMES = {
    "📄 lowlm inputs": "read",
    "🤗 HuggingFace": "read-hf",
    "🌍 Language ID": "language",
    "🈶 Han script": "script",
    "💥 N-grams decontaminate": "decontaminate",
    "👯 Gopher Repetition": "repetition",
    "🍷 FineWeb Quality": "fineweb",
    "🥇 Gopher Quality": "gopher",
    "💥 exact-deduplication stage 3": "exact",
    "🎯 MinHash stage 4": "minhash",
    "💥 sentence-deduplication stage 3": "sentences",
}
_FUNNEL_PHASES = ("filter", "write")


def _steps(phase) -> dict[str, dict]:
    """The phase's stats by funnel name; every reader's counts summed under `read`."""
    found: dict[str, dict] = {}
    for stat in phase.stats:
        short = STEP_NAMES.get(stat["name"].split(": ", 1)[-1])
        if short and short.startswith("read"):
            read = found.setdefault("read", Counter())
            read["documents"] += _count(stat["stats"], "documents")
            read["characters"] += int(stat["stats"].get("doc_len", {}).get("total", 0))
            read["invalid_utf8_lines"] += _count(stat["stats"], "invalid_utf8_lines")
        elif short:
            found[short] = stat["stats"]
    return found


def _count(stats: dict, key: str) -> int:
    value = stats.get(key, 0)
    return int(value["total"] if isinstance(value, dict) else value)


def funnel(phases) -> list[dict]:
    """Documents (and characters, where datatrove counts them) after each step, in order."""
    rows = []
    for phase in phases:
        if phase.name not in _FUNNEL_PHASES:
            continue
        for step, stats in _steps(phase).items():
            if step == "read":
                chars = stats.get("doc_len", {}).get("total", 0)
                rows.append(
                    {
                        "step": "read",
                        "documents": _count(stats, "documents"),
                        "characters": int(chars),
                    }
                )
                continue
            reasons = {
                k.removeprefix("dropped_"): _count(stats, k)
                for k in stats
                if k.startswith("dropped_")
            }
            rows.append(
                {
                    "step": step,
                    "in": _count(stats, "total"),
                    "removed": _count(stats, "dropped"),
                    "documents": _count(stats, "forwarded"),
                    "reasons": reasons,
                }
            )
    return rows


def progress_line(phase, verb: str, input_bytes: int = 0) -> str:
    """What a phase did: documents, input MB (local files, as stored) and MB/s, or documents
    per second where it read no input file."""
    steps = _steps(phase)
    read = steps.get("read") or next(iter(phase.stats), {}).get("stats", {})
    documents = _count(read, "documents") if "documents" in read else _count(read, "total")
    seconds = max(phase.seconds, 1e-9)
    if input_bytes:
        rate = f"{input_bytes / 1e6:.1f} MB of input files, {input_bytes / 1e6 / seconds:.2f} MB/s"
    else:
        rate = f"{documents / seconds:,.0f} documents/s"
    return (
        f"prepare: {phase.name}: {documents:,} documents {verb} in {phase.seconds:.1f} s "
        f"({rate}; {phase.tasks} tasks)"
    )


def everything_removed(phases) -> str:
    rows = [r for r in funnel(phases) if r["step"] != "read"]
    if not rows:
        return "prepare read no document from its inputs; check prepare.inputs and text_field."
    worst = max(rows, key=lambda r: r["removed"])
    why = max(worst["reasons"].items(), key=lambda kv: kv[1])[0] if worst["reasons"] else ""
    because = f" (mostly '{why}')" if why else ""
    return (
        f"every document was removed; the '{worst['step']}' step removed most: "
        f"{worst['removed']:,} of {worst['in']:,}{because}. Check prepare.language and the "
        "inputs, or loosen that step (prepare.lid.threshold, calibrate_from)."
    )


def check_bad_files(bad: list[dict], mode: str) -> None:
    if bad and mode == "error":
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise LowlmError(
            f"input {bad[0]['file']} cannot be read: {bad[0]['reason']}{more}; fix or remove "
            "it, or set prepare.bad_files: skip to prepare the rest."
        )


def _kept(phases, out: Path) -> dict:
    """What the write phase wrote (its CountWritten step's counts)."""
    write = next(p for p in phases if p.name == "write")
    name = CountWritten.name
    stats = next((s["stats"] for s in write.stats if s["name"].endswith(f": {name}")), {})
    return {
        "documents": _count(stats, "written_documents"),
        "characters": _count(stats, "written_characters"),
        "bytes": _count(stats, "written_bytes"),
        "heldout_documents": _count(stats, "written_heldout"),
        "shards": len(list(out.glob("*.parquet"))),
    }


def build_stats(config: LowlmConfig, resolved, phases, out: Path, bad_files: list) -> dict:
    filter_phase = next(p for p in phases if p.name == "filter")
    steps = _steps(filter_phase)
    read = steps.get("read", {})
    language = steps.get("language", {})
    decontaminate = steps.get("decontaminate", {})
    contamination = {
        k.removeprefix("contaminated_"): _count(decontaminate, k)
        for k in decontaminate
        if k.startswith("contaminated_")
    }
    histogram = [_count(language, f"language_score_bin_{k}") for k in range(SCORE_BINS)]
    return {
        "language": resolved.row.code,
        "lid": {
            "model": config.prepare.lid.model,
            "label": resolved.lid_label,
            "threshold": resolved.thresholds["language_score"],
            "score_histogram": {"bins": SCORE_BINS, "counts": histogram},
        },
        "word_tokenizer": resolved.tokenizer_name,
        "thresholds_source": resolved.thresholds_source,
        "thresholds": resolved.thresholds,
        "calibration": resolved.calibration,
        "decontamination": {**resolved.decontamination, "removed": contamination},
        "inputs": {
            "files": len(resolved.files),
            "datasets": resolved.datasets,
            "invalid_utf8_lines": _count(read, "invalid_utf8_lines"),
            "bad_files": bad_files,
        },
        "funnel": funnel(phases),
        "sentence_dedup": sentence_dedup(phases, config.prepare.dedup),
        "kept": _kept(phases, out),
        "phases": {p.name: {"seconds": round(p.seconds, 2), "tasks": p.tasks} for p in phases},
    }


def sentence_dedup(phases, dedup) -> dict:
    """What sentence dedup cut (the documents it removed are in the funnel)."""
    if not dedup.sentences:
        return {"enabled": False}
    write = next(p for p in phases if p.name == "write")
    stats = _steps(write).get("sentences", {})
    return {
        "enabled": True,
        "sentence_span": dedup.sentence_span,
        "min_words": dedup.sentence_min_words,
        "sentences_removed": _count(stats, "removed_sentences"),
        "documents_cut": _count(stats, "documents_cut"),
        "characters_cut_from_kept_documents": _count(stats, "characters_removed"),
    }


def write_removed_samples(removed: Path, folder: Path, limit: int) -> dict[str, int]:
    """Up to `limit` removed documents per reason into folder/<step>-<reason>.jsonl."""
    kept: dict[str, list[str]] = {}
    for file in sorted(removed.rglob("*.jsonl")) if removed.is_dir() else []:
        for line in file.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            reason = record.get("metadata", {}).get("removed_by", "removed")
            bucket = kept.setdefault(reason, [])
            if len(bucket) < limit:
                bucket.append(line)
    folder.mkdir(parents=True, exist_ok=True)
    for reason, lines in kept.items():
        name = reason.replace(":", "-").replace("/", "_")
        atomic_write_text(folder / f"{name}.jsonl", "".join(f"{line}\n" for line in lines))
    return dict(Counter({reason: len(lines) for reason, lines in kept.items()}))
