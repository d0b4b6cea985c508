"""`lowlm dpo`: preference tuning with Direct Preference Optimization (Rafailov et al., 2023).

Reads `dpo` ({prompt, chosen, rejected} records, beta, LoRA, training) and the run's sft
adapter (or `dpo.model`); writes a peft adapter in `dpo/` over that model, whose card keeps
the template, so `generate`, `chat` and `eval` take it like any other stage's.

Each pair is built with the SFT template: the prompt's ids, then the answer's (so what
`generate` sends is a prefix of what was tuned). The loss is DPO's,
-log sigmoid(beta * ((log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected)))),
summed log-probabilities over the answer tokens. The reference is the same model with the
new adapter disabled (peft's `disable_adapter`), so no second copy is held in memory. It is
written here rather than taken from TRL to keep one training loop (checkpoints, resume,
numeric guard, several processes) for every stage and not to add TRL's dependency tree;
the loss is a few lines. Held-out pairs report the loss, the reward margin and the reward
accuracy (the share where the chosen answer's reward beats the rejected one's).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lowlm.config import LowlmConfig
from lowlm.data.heldout import hash_split
from lowlm.data.records import read_records
from lowlm.data.sft_examples import IGNORE, truncate
from lowlm.data.templates import Template, template_from_card
from lowlm.errors import LowlmError
from lowlm.execute import StageRun
from lowlm.models.load import (
    check_vocab,
    load_base_for_lora,
    model_identity,
    model_record,
    pad_id,
    read_card,
    tokenizer_for,
)
from lowlm.training.loop import seed_everything, to_device
from lowlm.training.session import apply_lora, plan_from, run_training_stage, train_and_save

STAGE = "dpo"


def read_pairs(config: LowlmConfig) -> list[tuple[str, str, str, str]]:
    """(where, prompt, chosen, rejected) of every record; a bad record stops with its place."""
    cfg = config.dpo
    if not cfg.data:
        raise LowlmError("dpo.data is not set; list the preference files (JSONL).")
    pairs = []
    for pattern in cfg.data:
        for where, record in read_records(pattern, cfg.hf_split, "dpo.data"):
            values = []
            for field in (cfg.prompt_field, cfg.chosen_field, cfg.rejected_field):
                value = record.get(field)
                if not isinstance(value, str) or not value.strip():
                    raise LowlmError(
                        f"{where}: no text in field '{field}'; set dpo.prompt_field, "
                        "chosen_field and rejected_field to the record's fields."
                    )
                values.append(value)
            if values[1] == values[2]:
                raise LowlmError(f"{where}: chosen and rejected are the same text.")
            pairs.append((where, *values))
    if not pairs:
        raise LowlmError(f"{', '.join(cfg.data)} holds no preference pair.")
    return pairs


def encode_pair(template: Template, prompt: str, answer: str, max_length: int):
    """(ids, labels) of prompt + answer, or None when the prompt alone leaves no answer room."""
    ids, labels = template.encode(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    )
    ids, labels, outcome = truncate(ids, labels, max_length)
    return None if outcome == "dropped" else (ids, labels)


def collate_pairs(pad_id: int):
    """Chosen rows first, then rejected rows, right-padded, labels -100 outside the answers."""

    def collate(examples, device) -> dict[str, torch.Tensor]:
        rows = [(e["chosen_ids"], e["chosen_labels"]) for e in examples]
        rows += [(e["rejected_ids"], e["rejected_labels"]) for e in examples]
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (row_ids, row_labels) in enumerate(rows):
            ids[i, : len(row_ids)] = torch.as_tensor(row_ids)
            labels[i, : len(row_labels)] = torch.as_tensor(row_labels)
            mask[i, : len(row_ids)] = 1
        return {
            "input_ids": to_device(ids, device),
            "attention_mask": to_device(mask, device),
            "labels": to_device(labels, device),
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


def _split(pairs: list[dict], fraction: float, seed: int) -> tuple[list, list]:
    """Held-out pairs chosen by the run's held-out rule over each pair's text."""
    if fraction <= 0:
        return pairs, []
    return hash_split(pairs, lambda pair: f"{seed}\0{pair['key']}".encode(), fraction)


def run(config: LowlmConfig, force: bool = False, resume: bool = True) -> dict:
    return run_training_stage(config, STAGE, _work, force, resume)


def _work(run: StageRun, accelerator) -> dict:
    config, cfg = run.config, run.config.dpo
    source = run.plan.model
    if not source:
        raise LowlmError("there is no model to align; set dpo.model or model.base, or run sft.")
    card = (read_card(Path(source)) if Path(source).is_dir() else None) or {}
    tokenizer = tokenizer_for(source, config.model)
    template = template_from_card(card, tokenizer, cfg.template)
    if template is None:
        raise LowlmError(
            f"{source} was not tuned with a template; set dpo.template (alpaca, chatml, ...)."
        )
    template_name, system = template.spec, template.system
    encoded, dropped = [], 0
    for _where, prompt, chosen, rejected in read_pairs(config):
        c = encode_pair(template, prompt, chosen, cfg.max_length)
        r = encode_pair(template, prompt, rejected, cfg.max_length)
        if c is None or r is None:
            dropped += 1
            continue
        encoded.append(
            {
                "key": f"{prompt}\0{chosen}\0{rejected}",
                "chosen_ids": np.asarray(c[0]),
                "chosen_labels": np.asarray(c[1]),
                "rejected_ids": np.asarray(r[0]),
                "rejected_labels": np.asarray(r[1]),
            }
        )
    if not encoded:
        raise LowlmError(f"every pair was dropped by dpo.max_length={cfg.max_length}; raise it.")
    train_pairs, held_pairs = _split(encoded, cfg.eval_fraction, config.run.seed)
    if not train_pairs:
        raise LowlmError("every pair was held out; lower dpo.eval_fraction or add pairs.")
    pad = pad_id(tokenizer)
    accelerator.print(
        f"dpo: {len(train_pairs)} training and {len(held_pairs)} held-out pairs "
        f"({dropped} dropped by max_length), template {template_name}, beta {cfg.beta}"
    )
    seed_everything(config.run.seed)
    # the sft adapter folded in (the reference weights), or a quantized exported model (QLoRA)
    model = load_base_for_lora(source, config.model, cfg.quantize_base)
    check_vocab(model, tokenizer, source)
    model = apply_lora(model, cfg.lora)
    plan = plan_from(cfg, cfg.steps, cfg.lr, config.run.seed, frozen_base=True)
    unwrapped = {"model": model}
    before = heldout_metrics(model, held_pairs, pad, cfg.beta) if held_pairs else {}
    metrics, energy, saved = train_and_save(
        accelerator,
        model,
        tokenizer,
        train_pairs,
        None,
        plan,
        cfg,
        run.folder,
        kind="adapter",
        parent=source,
        resume=run.resume,
        collate=collate_pairs(pad),
        loss_fn=dpo_loss(lambda: unwrapped["model"], cfg.beta),
        final_metrics=lambda trained: (
            heldout_metrics(trained, held_pairs, pad, cfg.beta) if held_pairs else {}
        ),
        template=template_name,
        system=system,
        append_input=bool(card.get("append_input", False)),
        beta=cfg.beta,
        stage_key=run.key,
        report_to=config.run.report_to,
        attn_implementation=config.model.attn_implementation,
        parent_key=model_identity(source),
    )
    if before:
        metrics["heldout_reward_accuracy_before"] = before["heldout_reward_accuracy"]
    metrics.update(pairs=len(encoded), dropped_pairs=dropped)
    if accelerator.is_main_process and "heldout_reward_accuracy" in metrics:
        accelerator.print(
            f"dpo: held-out reward accuracy {metrics['heldout_reward_accuracy']:.3f} "
            f"(before {metrics.get('heldout_reward_accuracy_before', float('nan')):.3f}), "
            f"margin {metrics['heldout_reward_margin']:.4f}; wrote {run.folder}"
        )
    record = model_record(saved) if saved else {}
    return {"metrics": metrics, "record": {**record, "energy": energy}}
