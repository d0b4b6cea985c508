"""Llama configurations for models trained from scratch (TeenyTinyLlama sizes, and a tiny one)."""

from __future__ import annotations

from lowlm.config import InitConfig
from lowlm.errors import LowlmError

SIZES: dict[str, dict[str, int | bool]] = {
    # For tests and the demo: trains at thousands of tokens/s on a laptop CPU.
    "tiny": dict(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    ),
    "ttl-160m": dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=12,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    ),
    "ttl-460m": dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    ),
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
