"""The run config: one YAML file, one typed section per stage (the contract in CONFIG.md).

Every section is a pydantic model that forbids unknown keys; `load_config` turns
pydantic's errors into one sentence per problem, naming the key and, for a typo,
the closest valid key.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lowlm.errors import LowlmError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(Section):
    name: str = Field("lowlm-run", description="Artifacts go to <root>/<name>/.")
    root: str = Field("runs", description="Folder that holds run directories.")
    seed: int = Field(1234, description="Seed for sampling, shuffling and initialisation.")


class ModelConfig(Section):
    base: str | None = Field(
        None, description="Base model: HF id, local HF folder, or a local .gguf file."
    )
    tokenizer: str | None = Field(
        None,
        description="Base tokenizer: folder, SentencePiece tokenizer.model, or HF id "
        "(default: the base model's).",
    )
    trust_remote_code: bool = Field(False, description="Allow models that ship their own code.")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="Weights dtype for loading and training."
    )


class DataConfig(Section):
    text_field: str = Field("text", description="Field holding the text in .jsonl/.parquet/HF rows.")
    hf_split: str = Field("train", description="Split used for Hugging Face dataset names.")
    nfkc: bool = Field(False, description="Apply Unicode NFKC normalisation to every line.")
    dedup: bool = Field(False, description="Drop exact duplicate lines (after normalisation).")
    min_chars: int = Field(1, ge=1, description="Drop lines shorter than this many characters.")
    invalid_utf8: Literal["error", "replace"] = Field(
        "error", description="On invalid UTF-8: stop with file and byte offset, or replace."
    )


class TokenizeConfig(Section):
    corpus: list[str] = Field(
        default_factory=list,
        description="Files, directories, globs, .jsonl/.parquet/.gz, or HF dataset names.",
    )
    eval_texts: dict[str, str] = Field(
        default_factory=dict, description="Extra held-out files reported before/after, by label."
    )
    model_type: Literal["bpe", "unigram"] = Field("bpe", description="SentencePiece model type.")
    vocab_size: int = Field(20000, ge=16, description="Size of the trained target-language model.")
    merge: bool = Field(True, description="Merge into the base tokenizer; false keeps it alone.")
    scripts: list[str] = Field(
        default_factory=lambda: ["Han"],
        description="New pieces must contain a character of one of these Unicode scripts.",
    )
    character_coverage: float = Field(
        0.9995, gt=0, le=1, description="Share of characters the trained model must cover."
    )
    byte_fallback: bool = Field(True, description="Fall back to bytes for unknown characters.")
    split_digits: bool = Field(True, description="Split numbers into single digits.")
    max_sentence_length: int = Field(
        16384, ge=1, description="Longest line (bytes) used in training; longer are skipped."
    )
    input_sentence_size: int = Field(
        2_000_000, ge=0, description="Lines sampled for training (0: all)."
    )
    shuffle_input_sentence: bool = Field(True, description="Sample lines at random, not the first.")
    num_threads: int = Field(0, ge=0, description="Training threads (0: all cores).")
    user_defined_symbols: list[str] = Field(
        default_factory=list, description="Pieces always kept whole."
    )
    holdout_lines: int = Field(
        500, ge=0, description="Corpus lines held out of training for the report."
    )
    min_frequency: int = Field(
        2, ge=1, description="Byte-level bases: least count for a new merge."
    )


class LowlmConfig(Section):
    run: RunConfig = Field(default_factory=RunConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    tokenize: TokenizeConfig = Field(default_factory=TokenizeConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.root) / self.run.name


_TYPE_WORDS = {
    "int_parsing": "an integer",
    "int_type": "an integer",
    "float_parsing": "a number",
    "float_type": "a number",
    "bool_parsing": "true or false",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "literal_error": None,
}


def _section_model(loc: tuple) -> type[BaseModel]:
    model: type[BaseModel] = LowlmConfig
    for part in loc:
        field = model.model_fields.get(str(part)) if isinstance(part, str) else None
        annotation = getattr(field, "annotation", None) if field else None
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            break
    return model


def _describe(error: dict) -> str:
    loc = tuple(error["loc"])
    where = ".".join(str(p) for p in loc)
    kind = error["type"]
    if kind == "extra_forbidden":
        parent = _section_model(loc[:-1])
        valid = list(parent.model_fields)
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(valid)}."
        return f"unknown key '{where}' in the config; {hint}"
    value = error.get("input")
    if kind == "literal_error":
        return f"'{where}' must be {error['ctx']['expected']}, got {value!r}."
    expected = _TYPE_WORDS.get(kind)
    if expected:
        return f"'{where}' must be {expected}, got {value!r}."
    return f"'{where}': {error['msg']} (got {value!r})."


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text) if text.strip() else ""


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` overrides (values parsed as YAML) to a raw config dict."""
    for item in overrides:
        if "=" not in item:
            raise LowlmError(f"--set '{item}' is not of the form section.key=value.")
        dotted, value = item.split("=", 1)
        parts = [p for p in dotted.strip().split(".") if p]
        if not parts:
            raise LowlmError(f"--set '{item}' names no key.")
        node = raw
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise LowlmError(f"--set '{item}': '{part}' is not a section.")
            node = child
        node[parts[-1]] = _parse_value(value)
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> LowlmConfig:
    """Read, override and validate a config; every problem becomes one readable sentence."""
    path = Path(path)
    if not path.is_file():
        raise LowlmError(f"config file {path} does not exist; pass the path of a YAML config.")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise LowlmError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise LowlmError(f"config file {path} must be a mapping of sections, not {type(raw).__name__}.")
    raw = apply_overrides(raw, overrides or [])
    try:
        return LowlmConfig.model_validate(raw)
    except ValidationError as exc:
        problems = [_describe(e) for e in exc.errors()]
        raise LowlmError(" ".join(problems)) from None


def config_to_yaml(config: LowlmConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
