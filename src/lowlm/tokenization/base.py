"""Find the base tokenizer (a folder, a tokenizer.model, a .gguf file or a hub id) and its kind."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lowlm.config import ModelConfig
from lowlm.errors import LowlmError
from lowlm.hub import unreachable_note
from lowlm.rundir import atomic_dir, sha256_file, sha256_text

# Files of an HF tokenizer folder that describe behaviour (special tokens, BOS/EOS, chat
# template) and stay valid when the vocabulary grows. vocab.json / merges.txt do not.
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
HUB_PATTERNS = [*CONFIG_FILES, "tokenizer.json", "tokenizer.model", "config.json"]
GGUF_CACHE = Path.home() / ".cache" / "lowlm" / "gguf-tokenizers"


@dataclass
class BaseTokenizer:
    """Where the base tokenizer lives and which merge applies to it."""

    kind: Literal["sentencepiece", "byte_bpe"]
    source: str  # as the user wrote it
    folder: Path | None  # HF tokenizer folder with the config files, if any
    sp_model: Path | None  # tokenizer.model for SentencePiece bases

    def load_hf(self, trust_remote_code: bool = False):
        """The base as a transformers fast tokenizer, loaded the same way as the merged one."""
        from transformers import AutoTokenizer, LlamaTokenizer

        if self.folder is not None and (self.folder / "tokenizer.json").exists():
            return AutoTokenizer.from_pretrained(self.folder, trust_remote_code=trust_remote_code)
        assert self.sp_model is not None
        # A bare tokenizer.model: the concrete class keeps the leading "▁" (AutoTokenizer on
        # a bare tokenizer.model builds a generic backend that drops it), and
        # BOS is added as in every SentencePiece Llama-family model (transformers 5 would not).
        return LlamaTokenizer.from_pretrained(
            str(self.folder or self.sp_model), **bare_sentencepiece_options(self.folder)
        )


def _gguf_tokenizer_folder(gguf: Path) -> Path:
    """Convert a GGUF file's tokenizer once (it can take 30 s) and cache the folder by content."""
    from transformers import AutoTokenizer

    folder = GGUF_CACHE / sha256_file(gguf)[:16]
    if (folder / "tokenizer.json").exists():
        return folder
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as exc:  # gguf / transformers raise many kinds for unsupported files
        raise LowlmError(f"cannot read the tokenizer of {gguf}: {exc}") from None
    with atomic_dir(folder) as tmp:
        tokenizer.save_pretrained(tmp)
    return folder


def _hub_folder(name: str) -> Path:
    note = unreachable_note()  # before huggingface_hub: fail at once offline
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # offline, gated, missing: all mean "not available"
        raise LowlmError(
            f"tokenizer '{name}' is not a local file or folder and could not be downloaded "
            f"from the Hugging Face Hub ({type(exc).__name__}){note}; check the path or the name."
        ) from None


def resolve_base_tokenizer(model: ModelConfig) -> BaseTokenizer:
    spec = model.tokenizer or model.base
    if not spec:
        raise LowlmError(
            "tokenize.merge is true but no base is configured; set model.base or "
            "model.tokenizer, or set tokenize.merge: false."
        )
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        path = _gguf_tokenizer_folder(path)
    elif path.is_file():
        return BaseTokenizer("sentencepiece", spec, None, path)
    elif not path.exists():
        if path.suffix in {".gguf", ".model", ".json"} or spec.startswith((".", "/", "~")):
            raise LowlmError(f"base tokenizer '{spec}' does not exist; check model.tokenizer.")
        path = _hub_folder(spec)
    if (path / "tokenizer.model").exists():
        return BaseTokenizer("sentencepiece", spec, path, path / "tokenizer.model")
    if (path / "tokenizer.json").exists():
        try:
            tokenizer_json = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise LowlmError(f"{path / 'tokenizer.json'} is not valid JSON ({exc}).") from None
        from lowlm.tokenization.byte_bpe_merge import is_byte_level_bpe

        if is_byte_level_bpe(tokenizer_json):
            return BaseTokenizer("byte_bpe", spec, path, None)
        model_type = (tokenizer_json.get("model") or {}).get("type")
        raise LowlmError(
            f"the base tokenizer '{spec}' is a {model_type} tokenizer.json without a "
            "tokenizer.model; lowlm merges into SentencePiece BPE bases (tokenizer.model) and "
            "byte-level BPE tokenizer.json bases (GPT-2, SmolLM2, Qwen, Llama-3)."
        )
    raise LowlmError(
        f"'{spec}' holds neither tokenizer.model nor tokenizer.json; point model.tokenizer at "
        "a SentencePiece model or an HF tokenizer folder."
    )


def bare_sentencepiece_options(folder: Path | None) -> dict:
    """Options for loading a SentencePiece model that has no tokenizer_config.json beside it."""
    if folder is not None and (Path(folder) / "tokenizer_config.json").exists():
        return {}
    return {"add_bos_token": True}


def tokenizer_hash(folder: Path) -> str:
    """sha256 of what decides token ids: tokenizer.json without its runtime truncation and
    padding settings (which transformers writes back after a call with truncation=True)."""
    path = Path(folder) / "tokenizer.json"
    if not path.exists():
        raise LowlmError(f"{folder} has no tokenizer.json; run `lowlm tokenize` first.")
    data = json.loads(path.read_text(encoding="utf-8"))
    data.pop("truncation", None)
    data.pop("padding", None)
    return sha256_text(json.dumps(data, sort_keys=True, ensure_ascii=False))


def copy_config_files(source: Path | None, target: Path) -> None:
    """Copy the base's behaviour files (special tokens, BOS/EOS flags, chat template)."""
    if source is None:
        return
    for name in CONFIG_FILES:
        if (source / name).exists():
            shutil.copyfile(source / name, target / name)
