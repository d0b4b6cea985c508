"""Loading and saving models the way every stage needs them.

Each model lowlm writes is a folder with its tokenizer and a `lowlm_model.json` card
recording the tokenizer's hash and vocabulary size (a vocabulary/checkpoint mismatch,
49953 vs 49954 rows, is the most common user problem in this field), what kind of
artifact it is, and its parent:

- `model`: a full HF model folder (safetensors);
- `embeddings`: only the embedding matrices (`embeddings.safetensors`) over a parent model;
- `adapter`: a peft adapter over a parent (a model, or embeddings over a model).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from lowlm.errors import LowlmError
from lowlm.hub import unreachable_note
from lowlm.rundir import atomic_dir, atomic_write_json
from lowlm.tokenization.base import tokenizer_hash

MODEL_CARD = "lowlm_model.json"
EMBEDDINGS_FILE = "embeddings.safetensors"


def pad_id(tokenizer) -> int | None:
    """The id that pads batches: the tokenizer's pad token, else its EOS (Llama-style
    tokenizers have no pad token; padded positions are masked, so the choice does not matter
    as long as it is a real id)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def start_id(tokenizer) -> int | None:
    """The id a text starts from when scored alone: the tokenizer's BOS, else its EOS (as a
    document separator), so that every token of the text is predicted."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def load_tokenizer(folder: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise LowlmError(f"cannot load the tokenizer in {folder}: {exc}") from None


def read_card(folder: Path) -> dict | None:
    path = Path(folder) / MODEL_CARD
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise LowlmError(f"{path} is corrupt ({exc}); rerun the stage that wrote it.") from None


def write_card(folder: Path, kind: str, parent: str | Path | None, **extra: Any) -> dict:
    """Record kind, parent (relative when beside it in the run), tokenizer hash and vocab size."""
    folder = Path(folder)
    if parent is not None and Path(parent).exists():
        parent = os.path.relpath(Path(parent).resolve(), folder.resolve())
    if extra.get("stage_key"):
        # This build of the stage: a forced rebuild with the same key is still a new model.
        extra["build"] = uuid.uuid4().hex
    card = {
        "kind": kind,
        "parent": str(parent) if parent is not None else None,
        "tokenizer_hash": tokenizer_hash(folder),
        "vocab_size": len(load_tokenizer(folder)),
        **extra,
    }
    atomic_write_json(folder / MODEL_CARD, card)
    return card


def parent_path(folder: Path, card: dict) -> str:
    """The parent as written (relative to the folder when it lives there, else an id or path)."""
    parent = card.get("parent")
    if not parent:
        raise LowlmError(f"{folder / MODEL_CARD} names no parent; rerun the stage that wrote it.")
    beside = (Path(folder) / parent).resolve()
    return str(beside) if beside.exists() else parent


def resolve_load_dtype(name: str) -> torch.dtype:
    """Weights dtype: auto is bf16 on a GPU that has it, else fp32 (always safe on CPU)."""
    if name == "auto":
        return (
            torch.bfloat16
            if torch.cuda.is_available() and torch.cuda.is_bf16_supported()
            else torch.float32
        )
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def load_pretrained(
    source: str, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32
):
    """A causal LM from an HF id, a local HF folder or a local .gguf file (dequantised)."""
    from transformers import AutoModelForCausalLM

    path = Path(source).expanduser()
    note = "" if path.exists() else unreachable_note()  # a Hub name: fail at once offline
    try:
        if path.is_file() and path.suffix == ".gguf":
            model = AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, dtype=dtype
            )
            if getattr(model, "hf_quantizer", None) is not None:
                # GGUF weights are dequantised already; the quantizer only blocks saving.
                model.hf_quantizer.remove_quantization_config(model)
            return model
        return AutoModelForCausalLM.from_pretrained(
            source, trust_remote_code=trust_remote_code, dtype=dtype
        )
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise LowlmError(
                f"model '{source}' ships its own code; set model.trust_remote_code: true if you "
                "trust it."
            ) from None
        raise LowlmError(f"cannot load model '{source}': {exc}") from None
    except OSError as exc:
        raise LowlmError(
            f"cannot load model '{source}' (not a local folder or .gguf file, and not available "
            f"from the Hugging Face Hub{note}): {str(exc).splitlines()[0]}"
        ) from None


def embedding_rows(model) -> int:
    return model.get_input_embeddings().weight.shape[0]


def check_vocab(model, tokenizer, where: str) -> None:
    rows = embedding_rows(model)
    if rows < len(tokenizer):
        raise LowlmError(
            f"{where}: the model has {rows} embedding rows but its tokenizer has {len(tokenizer)} "
            "tokens; run `lowlm resize` so that the model matches the tokenizer."
        )


def load_model(
    source: str | Path, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32
):
    """Any model lowlm wrote (following parents), or any HF id / folder / .gguf file.

    Adapters come back as a peft model (not merged); everything else as a plain model.
    """
    folder = Path(source)
    card = read_card(folder) if folder.is_dir() else None
    if card is None or card["kind"] == "model":
        return load_pretrained(str(source), trust_remote_code, dtype)
    parent = parent_path(folder, card)
    check_parent(folder, card, parent)
    model = load_model(parent, trust_remote_code, dtype)
    if card["kind"] == "embeddings":
        apply_embeddings(model, folder / EMBEDDINGS_FILE)
        return model
    if card["kind"] == "adapter":
        from peft import PeftModel

        parent_card = read_card(Path(parent)) if Path(parent).is_dir() else None
        check_same_tokenizer(card, parent_card, folder, parent)
        if isinstance(model, PeftModel):  # an adapter over an adapter: fold the parent in first
            model = model.merge_and_unload()
        return PeftModel.from_pretrained(model, folder)
    raise LowlmError(f"{folder / MODEL_CARD} has unknown kind '{card['kind']}'.")


def load_merged(source: str | Path, model_config, dtype: torch.dtype | None = None):
    """load_model with any adapter folded into the weights (a plain model to train on)."""
    model = load_model(
        source,
        model_config.trust_remote_code,
        dtype if dtype is not None else resolve_load_dtype(model_config.dtype),
    )
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def load_base_for_lora(source: str | Path, model_config, quantize: str, dtype=None):
    """The frozen model a LoRA stage trains on: load_merged, or with `quantize` 4bit / 8bit
    the whole model quantized by bitsandbytes (QLoRA: NF4 with double quantization, compute
    in model.dtype), prepared with peft's prepare_model_for_kbit_training."""
    if quantize == "none":
        return load_merged(source, model_config, dtype)
    if not torch.cuda.is_available():
        raise LowlmError(
            f"quantize_base {quantize} needs a CUDA GPU (bitsandbytes' kernels); set it to none "
            "on this machine."
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise LowlmError(
            f"quantize_base {quantize} needs the bitsandbytes package; pip install "
            "bitsandbytes, or set it to none."
        ) from None
    folder = Path(source)
    card = read_card(folder) if folder.is_dir() else None
    if (card is not None and card["kind"] != "model") or folder.suffix == ".gguf":
        what = f"a {card['kind']} over another model" if card else "a GGUF file"
        raise LowlmError(
            f"{source} is {what}; a quantized base must be a whole model in safetensors: run "
            "`lowlm export` first (it writes the merged model), or set quantize_base: none."
        )
    from accelerate import PartialState
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    compute = dtype if dtype is not None else resolve_load_dtype(model_config.dtype)
    if quantize == "4bit":
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        )
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    model = AutoModelForCausalLM.from_pretrained(
        str(source),
        quantization_config=config,
        dtype=compute,
        device_map={"": PartialState().local_process_index},
        trust_remote_code=model_config.trust_remote_code,
    )
    # Gradient checkpointing is the stage's own switch (training.session.speed_switches).
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def check_same_tokenizer(card: dict, other: dict | None, folder, other_folder) -> None:
    """Refuse to combine artifacts built for different tokenizers, saying which two differ."""
    if other is None:
        return
    if (
        card["vocab_size"] != other["vocab_size"]
        or card["tokenizer_hash"] != other["tokenizer_hash"]
    ):
        raise LowlmError(
            f"{folder} was trained with a tokenizer of {card['vocab_size']} tokens "
            f"(hash {card['tokenizer_hash'][:12]}) but {other_folder} has {other['vocab_size']} "
            f"tokens (hash {other['tokenizer_hash'][:12]}); combine artifacts of the same run."
        )


def save_embeddings(model, folder: Path, state_dict: dict | None = None) -> None:
    """The input (and untied output) embedding matrices; from `state_dict` when given (the
    gathered state of a sharded model, whose own parameters are shards)."""
    from safetensors.torch import save_file

    names = {id(module): name for name, module in model.named_modules()}

    def weight(module) -> torch.Tensor:
        if state_dict is not None:
            return state_dict[f"{names[id(module)]}.weight"]
        return module.weight

    inputs, output = model.get_input_embeddings(), model.get_output_embeddings()
    tensors = {"input": weight(inputs).detach().float().contiguous().cpu()}
    if output is not None and output.weight is not inputs.weight:
        tensors["output"] = weight(output).detach().float().contiguous().cpu()
    save_file(tensors, str(Path(folder) / EMBEDDINGS_FILE))


def apply_embeddings(model, path: Path) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    embedding = model.get_input_embeddings().weight
    if tensors["input"].shape != embedding.shape:
        raise LowlmError(
            f"{path} holds {tensors['input'].shape[0]} embedding rows but the parent model has "
            f"{embedding.shape[0]}; the stage-1 output belongs to another model."
        )
    with torch.no_grad():
        embedding.copy_(tensors["input"].to(embedding.dtype))
        if "output" in tensors:
            model.get_output_embeddings().weight.copy_(tensors["output"].to(embedding.dtype))


def save_model_folder(
    model, tokenizer, folder: Path, kind: str, parent, state_dict: dict | None = None, **extra: Any
) -> dict:
    """Write model (or adapter / embeddings), tokenizer and card into an existing folder.
    `state_dict`: the model's whole state when its parameters are shards (FSDP, ZeRO-3)."""
    if kind == "embeddings":
        save_embeddings(model, folder, state_dict)
    elif state_dict is not None:
        # A gathered state (FSDP) holds tied weights as two equal tensors, not one shared
        # storage, so save_pretrained would write both: keep the one the model ties to.
        tied = getattr(model, "all_tied_weights_keys", None) or {}
        state_dict = {
            key: value
            for key, value in state_dict.items()
            if not (key in tied and tied[key] in state_dict)
        }
        model.save_pretrained(folder, state_dict=state_dict)
    else:
        model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    # transformers 5 does not write tokenizer.model; SentencePiece-based runs need it (merges,
    # llama.cpp conversion), so it travels with every model.
    sp_model = getattr(tokenizer, "vocab_file", None)
    if sp_model and Path(sp_model).is_file() and not (Path(folder) / "tokenizer.model").exists():
        shutil.copyfile(sp_model, Path(folder) / "tokenizer.model")
    return write_card(folder, kind, parent, **extra)


def save_whole_model(folder: Path, model, tokenizer, stage_key: str, **extra: Any) -> dict:
    """Write a whole model with no parent (init, resize, export) and its card atomically into
    `folder`; returns the manifest's record of it."""
    with atomic_dir(folder) as out:
        card = save_model_folder(model, tokenizer, out, "model", None, stage_key=stage_key, **extra)
    return model_record(card)


def model_identity(source: str | Path) -> str:
    """What an adapter or embeddings file records about the model it was trained on: the key
    of the lowlm stage that wrote that model, else the model's content (or hub id)."""
    from lowlm.rundir import content_id

    card = read_card(Path(source)) if Path(source).is_dir() else None
    if card and card.get("stage_key"):
        return f"{card['stage_key']}:{card.get('build', '')}"
    return content_id(source)


def check_parent(folder: Path, card: dict, parent: str) -> None:
    """Refuse an adapter (or stage-1 embeddings) over a model other than the one it was
    trained on: same path, different contents (a rebuilt stage, a replaced base)."""
    expected = card.get("parent_key")
    if expected and model_identity(parent) != expected:
        raise LowlmError(
            f"{folder} was trained on another version of {parent} (it was rebuilt or changed "
            f"since); rerun the stage that wrote {Path(folder).name} (`lowlm run CONFIG` "
            "rebuilds what is stale), or load it over the model it was trained on."
        )


def model_record(card: dict) -> dict:
    """What the manifest records about a model folder a stage wrote."""
    return {"tokenizer_hash": card["tokenizer_hash"], "vocab_size": card["vocab_size"]}


def tokenizer_for(source: str | Path, model_config):
    """The tokenizer of a model: its folder's, else the base's (model.tokenizer or model.base:
    hub ids, .gguf files and bare tokenizer.model files included)."""
    from lowlm.tokenization.base import resolve_base_tokenizer

    folder = Path(source)
    if folder.is_dir() and (folder / "tokenizer.json").exists():
        return load_tokenizer(folder, model_config.trust_remote_code)
    return resolve_base_tokenizer(model_config).load_hf(model_config.trust_remote_code)


def set_attention(model, name: str) -> None:
    """Switch a loaded model's attention kernel (transformers' set_attn_implementation), or
    stop in one line: the kernel is not installed / not supported here, or the model's own
    attention code cannot switch."""
    if model.config._attn_implementation == name:
        return
    if not model._can_set_attn_implementation():
        raise LowlmError(
            f"this model ({type(model).__name__}) has attention code of its own and cannot use "
            f"model.attn_implementation {name}; leave it unset."
        )
    try:
        model.set_attn_implementation(name)
    except (ImportError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0]
        raise LowlmError(
            f"model.attn_implementation {name} cannot be used here: {reason}"
        ) from None


def load_for_inference(source: str, model_config, checkpoint: Path | None = None):
    """(model, tokenizer, card) ready to generate or score: adapters merged, on the GPU when
    there is one (in model.dtype, bf16 by default there), in eval mode. The tokenizer is the
    folder's, else the base's (model.tokenizer or model.base). `checkpoint`: a training
    checkpoint of the stage that wrote `source`, whose weights replace the saved ones."""
    folder = Path(source)
    tokenizer = tokenizer_for(source, model_config)
    model = load_model(
        source, model_config.trust_remote_code, resolve_load_dtype(model_config.dtype)
    )
    if checkpoint is not None:
        _apply_checkpoint(model, checkpoint / "model.safetensors")
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    if model_config.attn_implementation is not None:
        set_attention(model, model_config.attn_implementation)
    check_vocab(model, tokenizer, str(source))
    if torch.cuda.is_available():
        model = model.to("cuda")
    model.eval()
    card = read_card(folder) if folder.is_dir() else None
    return model, tokenizer, card or {}


def _apply_checkpoint(model, path: Path) -> None:
    """Load a training checkpoint's weights (the ones that stage trained) into its model, every
    name checked: weights the model does not have stop the load instead of being skipped."""
    from safetensors.torch import load_file

    weights = load_file(str(path))
    own = model.state_dict()
    foreign = [name for name in weights if name not in own]
    if foreign:
        raise LowlmError(
            f"{path}: {len(foreign)} of its {len(weights)} weights are not this model's "
            f"(e.g. {foreign[0]}); it belongs to another stage or model."
        )
    try:
        model.load_state_dict(weights, strict=False)
    except RuntimeError as exc:
        raise LowlmError(f"{path} does not fit this model: {str(exc)[:200]}") from None
