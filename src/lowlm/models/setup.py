"""The model a training stage tunes: its parent loaded (an adapter or embeddings folded in, or
the base quantized for QLoRA) with its vocabulary checked, and a fresh LoRA adapter on it."""

from __future__ import annotations

from lowlm.config import LoraSection
from lowlm.errors import LowlmError
from lowlm.models.load import check_vocab, load_base_for_lora


def load_for_training(source: str, model_config, tokenizer, quantize: str = "none", dtype=None):
    """`source` as the frozen model a stage trains on (load_base_for_lora), refused when it has
    fewer embedding rows than `tokenizer` has tokens."""
    model = load_base_for_lora(source, model_config, quantize, dtype)
    check_vocab(model, tokenizer, source)
    return model


def apply_lora(model, lora: LoraSection, task_type: str = "CAUSAL_LM", **extra):
    """Wrap the model with a fresh LoRA adapter (extra: modules_to_save, trainable tokens).
    task_type SEQ_CLS (classifiers) also trains the new classification head in full."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type=task_type,
        **extra,
    )
    try:
        return get_peft_model(model, config)
    except (ValueError, AttributeError) as exc:  # peft raises both for models it cannot wrap
        raise LowlmError(f"cannot apply LoRA to this model: {exc}") from None
