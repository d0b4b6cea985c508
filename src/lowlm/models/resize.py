"""Grow a model's embeddings for a merged tokenizer, with an explicit, logged initialisation."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowlm.errors import LowlmError


@dataclass
class ResizeResult:
    old_rows: int
    new_rows: int
    new_token_ids: list[int]
    tied: bool
    init: str
    subword_counts: dict[str, float]


def _tied(model) -> bool:
    output = model.get_output_embeddings()
    return output is not None and output.weight is model.get_input_embeddings().weight


def subword_pieces(base_tokenizer, tokenizer, token_id: int) -> list[int]:
    """The base ids that a new token's text splits into under the base tokenizer."""
    text = tokenizer.convert_tokens_to_string([tokenizer.convert_ids_to_tokens(token_id)])
    ids = base_tokenizer.encode(text, add_special_tokens=False)
    return [i for i in ids if i < len(base_tokenizer)]


def resize_embeddings(
    model, base_tokenizer, tokenizer, init: str, pad_to_multiple_of: int | None, seed: int
) -> ResizeResult:
    """Append rows for the tokenizer's new ids; rows of base tokens stay bit-identical.

    `subword_mean`: each new row is the mean of the base rows of the base tokenizer's
    encoding of the token's text (Chinese-LLaMA's fix for random rows); `mean`: the mean of
    all base rows; `random`: normal with the base rows' std. Padding rows get the mean.
    """
    base_vocab = len(base_tokenizer)
    old_rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) < base_vocab:
        raise LowlmError(
            f"the run's tokenizer has {len(tokenizer)} tokens, fewer than the base's {base_vocab}; "
            "it is not a merge of this base."
        )
    target = len(tokenizer)
    if pad_to_multiple_of:
        target = int(math.ceil(target / pad_to_multiple_of) * pad_to_multiple_of)
    target = max(target, old_rows)
    tied = _tied(model)
    input_old = model.get_input_embeddings().weight.detach().clone()
    output = model.get_output_embeddings()
    output_old = output.weight.detach().clone() if output is not None and not tied else None
    # Rows beyond the base tokenizer (model padding) were never trained: they are re-initialised.
    new_token_ids = list(range(base_vocab, len(tokenizer)))
    model.resize_token_embeddings(target, mean_resizing=False)

    generator = torch.Generator().manual_seed(seed)
    matrices = [(model.get_input_embeddings().weight, input_old)]
    if output_old is not None:
        matrices.append((model.get_output_embeddings().weight, output_old))
    counts: list[int] = []
    with torch.no_grad():
        for weight, old in matrices:
            base_rows = old[:base_vocab].float()
            mean = base_rows.mean(dim=0)
            fill = mean.expand(target - base_vocab, -1).clone()
            if init == "random":
                fill = torch.randn(fill.shape, generator=generator) * base_rows.std()
            elif init == "subword_mean":
                counts = []
                for row, token_id in enumerate(new_token_ids):
                    pieces = subword_pieces(base_tokenizer, tokenizer, token_id)
                    counts.append(len(pieces))
                    if pieces:
                        fill[row] = base_rows[pieces].mean(dim=0)
            weight[:base_vocab] = old[:base_vocab]
            weight[base_vocab:] = fill.to(weight.dtype)
    if tied:
        model.tie_weights()
    return ResizeResult(
        old_rows=old_rows,
        new_rows=target,
        new_token_ids=new_token_ids,
        tied=_tied(model),
        init=init,
        subword_counts={
            "mean_subwords_per_new_token": sum(counts) / len(counts) if counts else 0.0,
            "new_tokens_without_subwords": sum(1 for c in counts if c == 0),
        },
    )
