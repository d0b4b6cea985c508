"""DPO's loss and its held-out figures. The reference is the same model with the new adapter
disabled (peft's `disable_adapter`), so no second copy is held in memory. Written here rather
than taken from TRL to keep one training loop (checkpoints, resume, numeric guard, several
processes) for every stage and not to add TRL's dependency tree; the loss is a few lines."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowlm.data.sft_examples import IGNORE
from lowlm.training.batches import padding_mask, right_pad
from lowlm.training.loop import to_device


def collate_pairs(pad_id: int):
    """Chosen rows first, then rejected rows, right-padded, labels -100 outside the answers."""

    def collate(examples, device) -> dict[str, torch.Tensor]:
        rows = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
        labels = [e["chosen_labels"] for e in examples] + [e["rejected_labels"] for e in examples]
        return {
            "input_ids": to_device(right_pad(rows, pad_id), device),
            "attention_mask": to_device(padding_mask(rows), device),
            "labels": to_device(right_pad(labels, IGNORE), device),
        }

    return collate


def sequence_logps(model, batch: dict) -> torch.Tensor:
    """Summed log-probability of each row's labelled tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE
    log_probs = F.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = log_probs.gather(2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1)


def rewards(policy, reference) -> tuple[torch.Tensor, torch.Tensor]:
    """Implicit rewards (before beta) of the chosen and rejected halves of a batch."""
    half = policy.shape[0] // 2
    return policy[:half] - reference[:half], policy[half:] - reference[half:]


def dpo_loss(model_for_reference, beta: float):
    """The loss the training loop calls: policy log-probs with the adapter, reference ones with
    it disabled."""

    def loss(model, batch) -> torch.Tensor:
        policy = sequence_logps(model, batch)
        with torch.no_grad(), model_for_reference().disable_adapter():
            reference = sequence_logps(model, batch)
        chosen, rejected = rewards(policy, reference)
        return -F.logsigmoid(beta * (chosen - rejected)).mean()

    return loss


@torch.no_grad()
def heldout_metrics(model, pairs: list[dict], pad_id: int, beta: float, batch_size: int = 8):
    model.eval()
    device = next(model.parameters()).device
    collate = collate_pairs(pad_id)
    losses, margins, correct = [], [], 0
    for start in range(0, len(pairs), batch_size):
        batch = collate(pairs[start : start + batch_size], device)
        policy = sequence_logps(model, batch)
        with model.disable_adapter():
            reference = sequence_logps(model, batch)
        chosen, rejected = rewards(policy, reference)
        margin = beta * (chosen - rejected)
        losses.extend((-F.logsigmoid(margin)).tolist())
        margins.extend(margin.tolist())
        correct += int((chosen > rejected).sum())
    model.train()
    n = len(pairs)
    return {
        "heldout_pairs": n,
        "heldout_loss": sum(losses) / n,
        "heldout_reward_margin": sum(margins) / n,
        "heldout_reward_accuracy": correct / n,
    }
