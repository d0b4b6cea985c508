"""Llama configurations for models trained from scratch (TeenyTinyLlama sizes, and a tiny one)."""

from __future__ import annotations

from lowlm.config import InitConfig
from lowlm.errors import LowlmError

_COLUMNS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "tie_word_embeddings",
)
# One row a size, in the order of _COLUMNS. tiny is for tests and the demo (thousands of
# tokens/s on a laptop CPU); ttl-160m and ttl-460m are TeenyTinyLlama's.
_ROWS = {
    "tiny": (64, 256, 2, 4, 4, 512, True),
    "ttl-160m": (768, 3072, 12, 12, 12, 2048, False),
    "ttl-460m": (1024, 4096, 24, 16, 16, 2048, False),
}
SIZES: dict[str, dict[str, int | bool]] = {
    name: dict(zip(_COLUMNS, row, strict=True)) for name, row in _ROWS.items()
}


def llama_config(init: InitConfig, tokenizer):
    """A LlamaConfig for the named size (fields set in the config override it) and tokenizer."""
    from transformers import LlamaConfig

    if init.size is None:
        raise LowlmError("init.size is not set; choose tiny, ttl-160m, ttl-460m or custom.")
    fields = dict(SIZES.get(init.size, {}))
    overrides = init.model_dump(exclude={"size"}, exclude_none=True)
    fields.update(overrides)
    required = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"]
    missing = [name for name in required if name not in fields]
    if missing:
        raise LowlmError(f"init.size: custom needs {', '.join('init.' + m for m in missing)}.")
    fields.setdefault("num_key_value_heads", fields["num_attention_heads"])
    fields.setdefault("max_position_embeddings", 2048)
    if fields["hidden_size"] % fields["num_attention_heads"]:
        raise LowlmError(
            f"init.hidden_size {fields['hidden_size']} is not a multiple of "
            f"init.num_attention_heads {fields['num_attention_heads']}."
        )
    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    return LlamaConfig(vocab_size=len(tokenizer), **fields, **special)
