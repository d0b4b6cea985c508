"""The loop's FLOP count (its MFU, and the training_flops every pretrain stage records) on a
peft model whose embedding rows train beside LoRA."""

from __future__ import annotations

import pytest
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from lowlm.training.metrics import training_flops


@pytest.mark.parametrize("tied", [True, False])
def test_trainable_token_rows_leave_the_count_of_the_lora_model_unchanged(tied):
    """peft's trainable-token wrapper hides the tie (and adds a delta that is copied into the
    weight, not multiplied): the count must be the plain LoRA model's."""
    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=tied,
    )
    lora = {"r": 2, "target_modules": ["q_proj"]}
    plain = get_peft_model(LlamaForCausalLM(config), LoraConfig(**lora))
    rows = {"embed_tokens": list(range(900, 1000))}
    if not tied:
        rows["lm_head"] = list(range(900, 1000))
    with_rows = get_peft_model(
        LlamaForCausalLM(config), LoraConfig(**lora, trainable_token_indices=rows)
    )
    assert training_flops(with_rows, frozen_base=True) == training_flops(plain, frozen_base=True)
    untouched = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    lora_weights = sum(p.numel() for n, p in plain.named_parameters() if "lora_" in n)
    counted = untouched + lora_weights - (0 if tied else 1000 * 32)
    assert training_flops(plain, frozen_base=True)[0] == 4 * counted


def test_embedding_lr_moves_the_new_rows_at_their_own_rate():
    """pretrain.stage2.embedding_lr: the trainable-token rows form their own AdamW group, and
    one step moves them by about that rate (Adam's first step is lr x sign), LoRA by its own."""
    import torch

    from lowlm.training.loop import _param_groups

    config = LlamaConfig(
        vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    rows = {"embed_tokens": list(range(90, 100))}
    model = get_peft_model(
        LlamaForCausalLM(config),
        LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=rows),
    )
    assert len(_param_groups(model, 0.0)) == 2  # no embedding_lr: decay / no-decay only
    groups = _param_groups(model, 0.0, embedding_lr=1e-2)
    (delta,) = groups[-1]["params"]
    assert groups[-1]["lr"] == 1e-2 and "trainable_tokens_delta" in [
        n.split(".")[-2] for n, p in model.named_parameters() if p is delta
    ]
    optimizer = torch.optim.AdamW(groups, lr=1e-5)
    ids = torch.randint(90, 100, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    before = delta.detach().clone()
    optimizer.step()
    moved = (delta.detach() - before).abs()
    assert 5e-3 < moved[moved > 0].mean() <= 1.01e-2


def test_stage2_on_a_model_without_new_rows_says_to_set_train_embeddings():
    """train_embeddings defaults to new: a run without a merge must say none (or all)."""
    from lowlm.config import LowlmConfig
    from lowlm.errors import LowlmError
    from lowlm.models.pretrain_setup import _prepare_stage2

    config = LlamaConfig(
        vocab_size=100,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    with pytest.raises(LowlmError, match="no new rows.*set it to none for LoRA alone"):
        _prepare_stage2(LlamaForCausalLM(config), LowlmConfig(), new_ids=[])
