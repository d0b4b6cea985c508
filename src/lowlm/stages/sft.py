"""`lowlm sft`: instruction tuning with LoRA (attention and MLP by default).

Reads `sft` (data, template, lengths, LoRA, training) and the run's newest model (or
`sft.model`, or `model.base`); writes a peft adapter in `sft/` whose card records the
template, and a report of the data (valid / invalid records, truncated / dropped examples)
in the manifest. Training, checkpoints, resume, energy and multi-process runs are the
shared ones of `lowlm pretrain`.
"""

from __future__ import annotations

import hashlib
import time
from contextlib import nullcontext
from pathlib import Path

from lowlm.config import LowlmConfig
from lowlm.data.corpus import resolve_sources, source_hashes
from lowlm.data.instructions import describe, read_conversations
from lowlm.data.sft_examples import build_examples, pack
from lowlm.data.templates import Template
from lowlm.errors import LowlmError
from lowlm.models.load import check_vocab, load_model, load_tokenizer, resolve_load_dtype
from lowlm.rundir import RunDir, fingerprint
from lowlm.training.loop import seed_everything
from lowlm.training.session import apply_lora, make_accelerator, plan_from, train_and_save

STAGE = "sft"
SOURCES = ["export", "pretrain-full", "pretrain-stage2", "pretrain-stage1", "resize", "init"]


def source_model(config: LowlmConfig, run_dir: RunDir) -> str:
    """sft.model, else the run's newest model, else model.base."""
    if config.sft.model:
        return config.sft.model
    folder = run_dir.newest(SOURCES)
    if folder is not None:
        return str(folder)
    if config.model.base:
        return config.model.base
    raise LowlmError("there is no model to tune; set sft.model or model.base, or run pretrain.")


def _tokenizer_folder(config: LowlmConfig, source: str) -> Path:
    if (Path(source) / "tokenizer.json").exists():
        return Path(source)
    from lowlm.tokenization.base import resolve_base_tokenizer

    base = resolve_base_tokenizer(config.model)
    if base.folder is None or not (base.folder / "tokenizer.json").exists():
        raise LowlmError(f"no tokenizer.json for {source}; set model.tokenizer to its folder.")
    return base.folder


def _split(examples: list[dict], fraction: float, seed: int) -> tuple[list, list]:
    """Hold out a stable share of examples (by content) for validation loss."""
    if fraction == 0 or len(examples) < 20:
        return examples, []
    train, held = [], []
    for example in examples:
        digest = hashlib.blake2b(f"{seed}".encode() + example["input_ids"].tobytes(), digest_size=8)
        (held if int.from_bytes(digest.digest(), "little") / 2**64 < fraction else train).append(
            example
        )
    return train, held


def run(config: LowlmConfig, force: bool = False, resume: bool = True) -> dict:
    cfg = config.sft
    run_dir = RunDir(config)
    accelerator = make_accelerator(config.model.dtype)
    source = source_model(config, run_dir)
    tokenizer_folder = _tokenizer_folder(config, source)
    conversations, read_report = read_conversations(cfg.data, cfg.fields, cfg.hf_split)
    inputs = source_hashes(resolve_sources(cfg.data))
    inputs["source"] = source
    key = fingerprint(
        cfg.model_dump(
            exclude={
                "energy",
                "log_every",
                "save_every",
                "eval_every",
                "keep_checkpoints",
                "peak_tflops",
            }
        ),
        config.model.model_dump(),
        config.run.seed,
        inputs,
        accelerator.num_processes,
    )
    if run_dir.skip_done(STAGE, key, force, say=accelerator.print):
        return run_dir.stage_record(STAGE)["metrics"]
    record = run_dir.stage_record(STAGE) or {}
    resume = resume and not force and record.get("fingerprint") == key
    started = time.time()
    context = (
        run_dir.recording(STAGE, inputs, key) if accelerator.is_main_process else nullcontext()
    )
    with context:
        tokenizer = load_tokenizer(tokenizer_folder, config.model.trust_remote_code)
        template = Template(cfg.template, tokenizer, cfg.system, cfg.append_input)
        examples, encode_report = build_examples(
            conversations, template, tokenizer, cfg.max_length, cfg.train_on_inputs
        )
        if not examples:
            raise LowlmError(
                f"every example was dropped by sft.max_length={cfg.max_length}; raise it."
            )
        train_examples, eval_examples = _split(examples, cfg.eval_fraction, config.run.seed)
        if cfg.packing:
            train_examples = pack(train_examples, cfg.max_length)
            encode_report.packed_blocks = len(train_examples)
        accelerator.print(
            f"sft: {describe(read_report)}; {encode_report.examples} examples "
            f"({encode_report.truncated} truncated, {encode_report.dropped} dropped), "
            f"{len(eval_examples)} held out, template {cfg.template}"
        )
        seed_everything(config.run.seed)
        model = load_model(
            source, config.model.trust_remote_code, resolve_load_dtype(config.model.dtype)
        )
        if hasattr(model, "merge_and_unload"):  # tune on top of a merged adapter
            model = model.merge_and_unload()
        check_vocab(model, tokenizer, source)
        extra = {"modules_to_save": list(cfg.modules_to_save)} if cfg.modules_to_save else {}
        model = apply_lora(model, cfg.lora, **extra)
        plan = plan_from(cfg, cfg.steps, cfg.lr, config.run.seed, frozen_base=True)
        metrics, energy, card = train_and_save(
            accelerator,
            model,
            tokenizer,
            train_examples,
            eval_examples or None,
            plan,
            cfg,
            run_dir.folder(STAGE),
            kind="adapter",
            parent=source,
            resume=resume,
            template=cfg.template,
            system=cfg.system,
            append_input=cfg.append_input,
        )
    if accelerator.is_main_process:
        metrics.update(
            records=read_report.records,
            invalid_records=read_report.invalid,
            invalid_examples=read_report.problems,
            examples=encode_report.examples,
            truncated=encode_report.truncated,
            dropped=encode_report.dropped,
            trained_tokens=encode_report.trained_tokens,
            packed_blocks=encode_report.packed_blocks,
            heldout_examples=len(eval_examples),
        )
        run_dir.finish_model(STAGE, card, metrics, started, energy=energy)
        accelerator.print(
            f"sft: {cfg.steps} steps, loss {metrics.get('loss', float('nan')):.4f}; "
            f"wrote {run_dir.folder(STAGE)}"
        )
    return metrics
