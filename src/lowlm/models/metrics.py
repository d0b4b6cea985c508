"""Loss per character: comparable across tokenizers, unlike loss per token."""

from __future__ import annotations

from pathlib import Path

import torch

from lowlm.data.heldout import read_heldout
from lowlm.models.load import start_id


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
    start = start_id(tokenizer)
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


def score_texts(model, tokenizer, texts: dict[str, list[str]]) -> dict[str, float]:
    """Loss per character of each labelled list of lines."""
    return {label: loss_per_char(model, tokenizer, lines) for label, lines in texts.items()}


def score_before_and_after(model, tokenizer, texts: dict[str, list[str]], accelerator):
    """Scores `texts` now (loss per character) and returns the function that gives the stage's
    figures once trained: before and after on each text, comparable with resize's figures and
    with the stage's own "before": did it help the target language, what did the base lose?"""
    with accelerator.autocast():
        before = score_texts(model, tokenizer, texts)
    model.train()

    def figures(model) -> dict:
        after = score_texts(model, tokenizer, texts)
        result = {"loss_per_char_before": before, "loss_per_char_after": after}
        if "heldout" in after:
            result["heldout_loss_per_char"] = after["heldout"]
            # How much text a training token carries, estimated on the held-out lines: what
            # the report turns tokens seen into characters seen with.
            ids = tokenizer(texts["heldout"], add_special_tokens=False)["input_ids"]
            result["heldout_chars_per_token"] = sum(map(len, texts["heldout"])) / max(
                1, sum(map(len, ids))
            )
        return result

    return figures
