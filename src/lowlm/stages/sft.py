"""`lowlm sft`: instruction tuning with LoRA (attention and MLP by default).

Reads `sft` (data, template, lengths, LoRA, training) and the run's newest model (or
`sft.model`, or `model.base`); writes a peft adapter in `sft/` whose card records the
template, and a report of the data (valid / invalid records, truncated / dropped examples)
in the manifest. Training, checkpoints, resume, energy and multi-process runs are the
shared ones of `lowlm pretrain`.
"""

from __future__ import annotations

import dataclasses

from lowlm.config import LowlmConfig
from lowlm.data.heldout import hash_split, heldout_set, with_heldout_text
from lowlm.data.instructions import describe, read_conversations
from lowlm.data.sft_examples import build_examples, pack
from lowlm.data.templates import Template
from lowlm.errors import LowlmError
from lowlm.evaluation.runners import periodic_eval
from lowlm.execute import StageRun
from lowlm.graph import folder, tokenizer_folder
from lowlm.models.load import tokenizer_for
from lowlm.models.setup import apply_lora, load_for_training
from lowlm.training.loop import seed_everything
from lowlm.training.metrics import loss_text
from lowlm.training.session import plan_from, run_training_stage, starting_model, train_and_save

STAGE = "sft"


def _split(examples: list[dict], fraction: float, seed: int) -> tuple[list, list]:
    """Hold out a stable share of examples (by content) for validation loss."""
    if fraction == 0 or len(examples) < 20:
        return examples, []
    return hash_split(
        examples, lambda example: f"{seed}".encode() + example["input_ids"].tobytes(), fraction
    )


def _without_heldout(conversations: list, heldout: frozenset[str]) -> tuple[list, int]:
    """Drop conversations that contain a line of the run's held-out text (as a whole line of any
    message), so that no held-out figure measured after sft is on text sft trained on."""
    if not heldout:
        return conversations, 0
    kept = [
        messages
        for messages in conversations
        if not any(
            line.strip() in heldout
            for message in messages
            for text in (message.get("content") or "", message.get("input") or "")
            for line in text.split("\n")
        )
    ]
    return kept, len(conversations) - len(kept)


def run(config: LowlmConfig, force: bool = False, resume: bool = True) -> dict:
    return run_training_stage(config, STAGE, _work, force, resume)


def _work(run: StageRun, accelerator) -> dict:
    config, cfg = run.config, run.config.sft
    source = starting_model(
        run,
        "there is no model to tune; set sft.model or model.base, or configure a stage that "
        "writes one.",
    )
    conversations, read_report = read_conversations(cfg.data, cfg.fields, cfg.hf_split)
    conversations, excluded = _without_heldout(conversations, heldout_set(tokenizer_folder(config)))
    tokenizer = tokenizer_for(source, config.model)
    template = Template(cfg.template, tokenizer, cfg.system, cfg.append_input)
    examples, encode_report = build_examples(
        conversations, template, cfg.max_length, cfg.train_on_inputs
    )
    if not examples:
        raise LowlmError(f"every example was dropped by sft.max_length={cfg.max_length}; raise it.")
    train_examples, eval_examples = _split(examples, cfg.eval_fraction, config.run.seed)
    if cfg.packing:
        train_examples = pack(train_examples, cfg.max_length)
        encode_report.packed_blocks = len(train_examples)
    accelerator.print(
        f"sft: {describe(read_report)}; {encode_report.examples} examples "
        f"({encode_report.truncated} truncated, {encode_report.dropped} dropped, {excluded} "
        f"left out for holding held-out text), {len(eval_examples)} kept for validation, "
        f"template {cfg.template}"
    )
    seed_everything(config.run.seed)
    # tune on top of a merged adapter, or on a quantized base (QLoRA)
    model = load_for_training(source, config.model, tokenizer, cfg.quantize_base)
    extra = {"modules_to_save": list(cfg.modules_to_save)} if cfg.modules_to_save else {}
    model = apply_lora(model, cfg.lora, **extra)
    plan = plan_from(cfg, cfg.steps, cfg.lr, config.run.seed, frozen_base=True)
    result = train_and_save(
        run,
        accelerator,
        model,
        tokenizer,
        train_examples,
        eval_examples or None,
        plan,
        kind="adapter",
        parent=source,
        periodic=periodic_eval(
            with_heldout_text(cfg.eval_tasks, folder(config, "tokenize")), tokenizer
        ),
        template=cfg.template,
        system=cfg.system,
        append_input=cfg.append_input,
    )
    metrics = result["metrics"]
    metrics.update(
        records=read_report.records,
        invalid_records=read_report.invalid,
        invalid_examples=read_report.problems,
        heldout_text_excluded=excluded,
        **dataclasses.asdict(encode_report),  # examples, truncated, dropped, tokens, blocks
        validation_examples=len(eval_examples),
    )
    if accelerator.is_main_process:
        accelerator.print(f"sft: {cfg.steps} steps, loss {loss_text(metrics)}; wrote {run.folder}")
    return result
