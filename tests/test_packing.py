"""Packed batches keep their documents apart: a document's loss is the same packed or alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowlm.data.sft_examples import pack
from lowlm.errors import LowlmError
from lowlm.training.loop import _collate, check_isolation, document_positions


def _tiny_model(attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        attn_implementation=attn,
    )
    return LlamaForCausalLM(config).eval()


def _loss_sum(model, batch) -> float:
    batch = dict(batch)
    batch.pop("num_tokens")
    labels = batch.pop("labels")
    logits = model(**batch, use_cache=False).logits.float()
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]),
        labels[:, 1:].reshape(-1),
        ignore_index=-100,
        reduction="sum",
    ).item()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_each_example_scores_the_same_packed_or_alone(attn):
    rng = np.random.default_rng(0)
    examples = []
    for length in (9, 14, 5, 11, 20, 7):
        ids = rng.integers(3, 64, length)
        labels = ids.copy()
        labels[: length // 3] = -100  # a prompt
        examples.append({"input_ids": ids, "labels": labels})
    model = _tiny_model(attn)
    with torch.no_grad():
        alone = sum(_loss_sum(model, _collate([e], "cpu")) for e in examples)
        blocks = pack(examples, 32)
        assert len(blocks) < len(examples)
        batch = _collate(blocks, "cpu")  # unequal lengths: padding is a document of its own
        assert "attention_mask" not in batch and "position_ids" in batch
        assert batch["num_tokens"] == sum(len(e["input_ids"]) for e in examples)
        packed = _loss_sum(model, batch)
        # Without isolation (the same rows, one sequence each) the sum differs.
        leaked = dict(batch)
        leaked.pop("position_ids")
        leaking = _loss_sum(model, leaked)
    assert packed == pytest.approx(alone, rel=1e-5)
    assert abs(leaking - alone) > 1e-3


def test_pretraining_documents_restart_after_eos():
    eos = 2
    ids = np.array([1, 5, 6, 2, 1, 7, 2, 1, 8, 9])
    positions, labels = document_positions(ids, ids, eos)
    assert positions.tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1, 2]
    assert labels.tolist() == [1, 5, 6, 2, -100, 7, 2, -100, 8, 9]
    assert ids.tolist() == [1, 5, 6, 2, 1, 7, 2, 1, 8, 9]  # not modified in place
    model = _tiny_model("sdpa")
    with torch.no_grad():
        whole = _collate([{"input_ids": ids, "labels": labels, "position_ids": positions}], "cpu")
        alone = sum(
            _loss_sum(model, _collate([{"input_ids": d, "labels": d}], "cpu"))
            for d in (ids[:4], ids[4:7], ids[7:])
        )
        assert _loss_sum(model, whole) == pytest.approx(alone, rel=1e-5)


def test_a_model_that_ignores_position_ids_is_refused():
    model = _tiny_model("sdpa")
    check_isolation(model, 64, "cpu", precise=True)  # a transformers Llama keeps them apart
    forward = model.forward

    def leaky(*args, position_ids=None, **kwargs):  # attention code of its own
        return forward(*args, **kwargs)

    model.forward = leaky
    with pytest.raises(LowlmError, match="does not keep packed examples apart"):
        check_isolation(model, 64, "cpu", precise=True)
