"""Loss per character: comparable across tokenizers, unlike loss per token."""

from __future__ import annotations

from pathlib import Path

import torch

from lowlm.data.heldout import read_heldout


def heldout_lines(tokenizer_folder: Path | None, limit: int) -> list[str]:
    """The first `limit` lines the tokenize stage held out of training (none without one)."""
    return read_heldout(tokenizer_folder)[:limit] if limit else []


@torch.no_grad()
def text_nll(model, tokenizer, lines: list[str], max_tokens: int = 512) -> tuple[float, int, int]:
    """(summed next-token NLL in nats, characters scored, tokens scored) over the lines.

    Each line is scored alone after one start token (BOS, or EOS as a document separator
    when the tokenizer has no BOS), so every token of the text is predicted. A line longer
    than `max_tokens` counts only the characters its first `max_tokens` tokens cover.
    """
    model.eval()
    device = next(model.parameters()).device
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    total_nll, total_chars, total_tokens = 0.0, 0, 0
    for line in lines:
        encoded = tokenizer(
            line,
            add_special_tokens=False,
            truncation=True,
            max_length=max_tokens,
            return_offsets_mapping=True,
        )
        if not encoded["input_ids"]:
            continue
        ids = torch.tensor([[start, *encoded["input_ids"]]], device=device)
        logits = model(input_ids=ids).logits.float()
        total_nll += torch.nn.functional.cross_entropy(
            logits[0, :-1], ids[0, 1:], reduction="sum"
        ).item()
        truncated = len(encoded["input_ids"]) >= max_tokens
        total_chars += encoded["offset_mapping"][-1][1] if truncated else len(line)
        total_tokens += len(encoded["input_ids"])
    return total_nll, total_chars, total_tokens


def loss_per_char(model, tokenizer, lines: list[str], max_tokens: int = 512) -> float:
    """Summed next-token NLL (nats) of every text token, divided by the characters scored."""
    nll, chars, _ = text_nll(model, tokenizer, lines, max_tokens)
    return nll / chars if chars else float("nan")
