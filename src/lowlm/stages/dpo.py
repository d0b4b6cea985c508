"""`lowlm dpo`: preference tuning with Direct Preference Optimization (Rafailov et al., 2023).

Reads `dpo` ({prompt, chosen, rejected} records, beta, LoRA, training) and the run's sft
adapter (or `dpo.model`); writes a peft adapter in `dpo/` over that model, whose card keeps
the template, so `generate`, `chat` and `eval` take it like any other stage's.

Each pair is built with the SFT template: the prompt's ids, then the answer's (so what
`generate` sends is a prefix of what was tuned). The loss is DPO's,
-log sigmoid(beta * ((log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected)))),
summed log-probabilities over the answer tokens. The reference is the same model with the
new adapter disabled (peft's `disable_adapter`), so no second copy is held in memory; the
loss is lowlm's own (training/preference.py says why not TRL's). Held-out pairs report the
loss, the reward margin and the reward accuracy (the share where the chosen answer's reward
beats the rejected one's).
"""

from __future__ import annotations

from pathlib import Path

from lowlm.config import LowlmConfig
from lowlm.data.preferences import encode_pairs, read_pairs, split_pairs
from lowlm.data.templates import template_from_card
from lowlm.errors import LowlmError
from lowlm.execute import StageRun
from lowlm.models.load import pad_id, read_card, tokenizer_for
from lowlm.models.setup import apply_lora, load_for_training
from lowlm.training.loop import seed_everything
from lowlm.training.preference import collate_pairs, dpo_loss, heldout_metrics
from lowlm.training.session import plan_from, run_training_stage, starting_model, train_and_save

STAGE = "dpo"


def run(config: LowlmConfig, force: bool = False, resume: bool = True) -> dict:
    return run_training_stage(config, STAGE, _work, force, resume)


def _work(run: StageRun, accelerator) -> dict:
    config, cfg = run.config, run.config.dpo
    source = starting_model(
        run, "there is no model to align; set dpo.model or model.base, or run sft."
    )
    card = (read_card(Path(source)) if Path(source).is_dir() else None) or {}
    tokenizer = tokenizer_for(source, config.model)
    template = template_from_card(card, tokenizer, cfg.template)
    if template is None:
        raise LowlmError(
            f"{source} was not tuned with a template; set dpo.template (alpaca, chatml, ...)."
        )
    encoded, dropped = encode_pairs(read_pairs(config), template, cfg.max_length)
    if not encoded:
        raise LowlmError(f"every pair was dropped by dpo.max_length={cfg.max_length}; raise it.")
    train_pairs, held_pairs = split_pairs(encoded, cfg.eval_fraction, config.run.seed)
    if not train_pairs:
        raise LowlmError("every pair was held out; lower dpo.eval_fraction or add pairs.")
    pad = pad_id(tokenizer)
    accelerator.print(
        f"dpo: {len(train_pairs)} training and {len(held_pairs)} held-out pairs "
        f"({dropped} dropped by max_length), template {template.spec}, beta {cfg.beta}"
    )
    seed_everything(config.run.seed)
    # the sft adapter folded in (the reference weights), or a quantized exported model (QLoRA)
    model = load_for_training(source, config.model, tokenizer, cfg.quantize_base)
    model = apply_lora(model, cfg.lora)
    plan = plan_from(cfg, cfg.steps, cfg.lr, config.run.seed, frozen_base=True)
    unwrapped = {"model": model}

    def heldout(trained) -> dict:
        return heldout_metrics(trained, held_pairs, pad, cfg.beta) if held_pairs else {}

    before = heldout(model)
    result = train_and_save(
        run,
        accelerator,
        model,
        tokenizer,
        train_pairs,
        None,
        plan,
        kind="adapter",
        parent=source,
        collate=collate_pairs(pad),
        loss_fn=dpo_loss(lambda: unwrapped["model"], cfg.beta),
        final_metrics=heldout,
        template=template.spec,
        system=template.system,
        append_input=bool(card.get("append_input", False)),
        beta=cfg.beta,
    )
    metrics = result["metrics"]
    if before:
        metrics["heldout_reward_accuracy_before"] = before["heldout_reward_accuracy"]
    metrics.update(pairs=len(encoded), dropped_pairs=dropped)
    if accelerator.is_main_process and "heldout_reward_accuracy" in metrics:
        accelerator.print(
            f"dpo: held-out reward accuracy {metrics['heldout_reward_accuracy']:.3f} "
            f"(before {metrics.get('heldout_reward_accuracy_before', float('nan')):.3f}), "
            f"margin {metrics['heldout_reward_margin']:.4f}; wrote {run.folder}"
        )
    return result
