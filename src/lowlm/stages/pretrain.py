"""`lowlm pretrain`: continued pre-training in two stages, or full training from scratch.

- stage 1: only the embedding matrices train (input and output rows; optionally only
  the new tokens' rows). Writes `pretrain-stage1/` with `embeddings.safetensors`.
- stage 2: LoRA on the target modules plus trainable embedding rows (all, new or none);
  continues from stage 1 when it ran. Writes a peft adapter in `pretrain-stage2/`.
- full: every weight trains. Writes an HF model in `pretrain-full/`.

Each reads the packed-block cache of the corpus (built once, keyed by content), trains
with the shared loop (checkpoints in `<stage>/checkpoints/`, `log.jsonl`), and records
metrics and energy in the manifest. Run under `accelerate launch` for several processes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lowlm.config import LowlmConfig
from lowlm.data.blocks import BlockDataset, build_cache, cache_key
from lowlm.data.corpus import iter_documents, read_lines, resolve_sources
from lowlm.data.heldout import heldout_document_lines, with_heldout_text
from lowlm.errors import LowlmError
from lowlm.evaluation.runners import periodic_eval
from lowlm.execute import StageRun
from lowlm.graph import (
    PRETRAIN_BY_FLAG,
    PRETRAIN_STAGES,
    corpus_patterns,
    folder,
    tokenizer_folder,
)
from lowlm.models.load import (
    check_vocab,
    load_base_for_lora,
    load_tokenizer,
    model_identity,
    model_record,
    read_card,
    resolve_load_dtype,
    tokenizer_hash,
)
from lowlm.models.metrics import heldout_lines, loss_per_char
from lowlm.tokenization.base import resolve_base_tokenizer
from lowlm.training.loop import document_positions, model_is_sharded, seed_everything
from lowlm.training.metrics import loss_text, training_flops
from lowlm.training.session import apply_lora, plan_from, run_training_stage, train_and_save


class Blocks:
    """Packed blocks as training examples: labels are the inputs (the model shifts them).
    With `eos` (pretrain.isolate_documents), each block also carries position ids that
    restart after every EOS, so that its documents are kept apart."""

    def __init__(self, blocks: BlockDataset, eos: int | None = None):
        self.blocks, self.eos = blocks, eos

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict:
        ids = self.blocks[index]
        if self.eos is None:
            return {"input_ids": ids, "labels": ids}
        positions, labels = document_positions(ids, ids, self.eos)
        return {"input_ids": ids, "labels": labels, "position_ids": positions}


def configured_stages(config: LowlmConfig) -> list[str]:
    cfg = config.pretrain
    return [s.flag for s in PRETRAIN_STAGES if getattr(cfg, s.section).steps > 0]


def _tokenizer_folder(config: LowlmConfig, parent: str) -> Path:
    """The run's tokenizer, else the parent's, else the base's (hub ids and .gguf included)."""
    run_tokenizer = tokenizer_folder(config)
    if run_tokenizer is not None and (run_tokenizer / "tokenizer.json").exists():
        return run_tokenizer
    if (Path(parent) / "tokenizer.json").exists():
        return Path(parent)
    if config.model.base or config.model.tokenizer:
        base = resolve_base_tokenizer(config.model)
        if base.folder is not None and (base.folder / "tokenizer.json").exists():
            return base.folder
    raise LowlmError(
        "no tokenizer found for pre-training; run `lowlm tokenize` first, or set model.base "
        "to a model that ships a tokenizer.json."
    )


def _embedding_module_names(model) -> tuple[str, str | None]:
    names = {id(m): n.split(".")[-1] for n, m in model.named_modules()}
    output = model.get_output_embeddings()
    return names[id(model.get_input_embeddings())], names.get(
        id(output)
    ) if output is not None else None


def _tied(model) -> bool:
    output = model.get_output_embeddings()
    return output is not None and output.weight is model.get_input_embeddings().weight


def _new_token_ids(parent: str, tokenizer) -> list[int]:
    card = read_card(Path(parent)) if Path(parent).is_dir() else None
    start, end = (card or {}).get("new_token_ids", [len(tokenizer), len(tokenizer)])
    return list(range(start, end))


def _prepare_stage1(model, new_ids: list[int], new_rows_only: bool):
    """Freeze everything but the embedding matrices; optionally mask the old rows' gradients."""
    for param in model.parameters():
        param.requires_grad_(False)
    # The modules, not their weights, are kept for the mask: FSDP2 (accelerator.prepare)
    # replaces the parameters of the same module objects with sharded ones.
    modules = [model.get_input_embeddings()]
    if not _tied(model) and model.get_output_embeddings() is not None:
        modules.append(model.get_output_embeddings())
    for module in modules:
        module.weight.requires_grad_(True)
    if not new_rows_only:
        return model, None
    if not new_ids:
        raise LowlmError("pretrain.stage1.new_rows_only is set but the model has no new rows.")
    first_new = new_ids[0]

    def mask_old_rows() -> None:
        for module in modules:
            grad = module.weight.grad
            if grad is None:
                continue
            if hasattr(grad, "to_local"):  # a DTensor sharded by rows: this rank's rows
                from torch.distributed.tensor._utils import (
                    compute_local_shape_and_global_offset,
                )

                _, offset = compute_local_shape_and_global_offset(
                    grad.shape, grad.device_mesh, grad.placements
                )
                grad.to_local()[: max(0, first_new - offset[0])] = 0
            else:
                grad[:first_new] = 0

    return model, mask_old_rows


def _prepare_stage2(model, config: LowlmConfig, new_ids: list[int], sharded: bool = False):
    cfg = config.pretrain.stage2
    input_name, output_name = _embedding_module_names(model)
    extra: dict = {}
    if sharded and _tied(model) and cfg.train_embeddings != "none":
        # peft's trainable-token wrapper hides the tie from accelerate's FSDP preparation,
        # which then fails on the shared weight.
        raise LowlmError(
            f"pretrain.stage2.train_embeddings: {cfg.train_embeddings} cannot run under FSDP on "
            "a model whose input and output embeddings are tied; set it to none, or launch "
            "without FSDP (DDP: configs/accelerate/multi-gpu.yaml)."
        )
    if cfg.train_embeddings == "new":
        if not new_ids:
            raise LowlmError(
                "pretrain.stage2.train_embeddings is 'new' but the model has no new rows."
            )
        extra["trainable_token_indices"] = (
            {input_name: new_ids} if _tied(model) else {input_name: new_ids, output_name: new_ids}
        )
    elif cfg.train_embeddings == "all":
        if _tied(model):
            # modules_to_save would untie them (peft 0.21); trainable tokens keep the tie.
            rows = list(range(model.get_input_embeddings().weight.shape[0]))
            extra["trainable_token_indices"] = {input_name: rows}
        else:
            extra["modules_to_save"] = [input_name, output_name]
    return apply_lora(model, cfg.lora, **extra)


def run_stage(config: LowlmConfig, stage: str, force: bool = False, resume: bool = True) -> dict:
    """Run one pre-training stage ('1', '2' or 'full') under the current accelerate setup."""
    if stage not in PRETRAIN_BY_FLAG:
        raise LowlmError(f"unknown pretrain stage '{stage}'; use 1, 2 or full.")
    cfg = config.pretrain
    steps = getattr(cfg, PRETRAIN_BY_FLAG[stage].section).steps
    if steps == 0:
        raise LowlmError(
            f"pretrain stage {stage} has 0 steps; set "
            f"pretrain.{PRETRAIN_BY_FLAG[stage].section}.steps."
        )
    work = lambda run, accelerator: _work(run, stage, accelerator)  # noqa: E731
    return run_training_stage(config, PRETRAIN_BY_FLAG[stage].name, work, force, resume)


def _work(run: StageRun, stage: str, accelerator) -> dict:
    config, cfg = run.config, run.config.pretrain
    name = PRETRAIN_BY_FLAG[stage].name
    section = getattr(cfg, PRETRAIN_BY_FLAG[stage].section)
    steps, lr = section.steps, section.lr
    parent = run.plan.model
    if parent is None:
        raise LowlmError(
            f"pretrain stage {stage} has no model to start from; configure `resize` (model.base "
            "and tokenize.corpus) or `init` (init.size) and run it first."
        )
    sources, tokenizer, train_data, eval_data = _packed_corpus(run, parent, name, accelerator)

    seed_everything(config.run.seed)
    model, after_backward, new_ids = _stage_model(config, stage, parent, tokenizer, accelerator)
    embedding_lr = getattr(section, "embedding_lr", None)  # stage 2's own lever
    plan = plan_from(cfg, steps, lr, config.run.seed, stage != "full", embedding_lr)
    texts = scored_texts(config, sources)
    heldout_loss = _before_and_after(model, tokenizer, texts, accelerator)
    flops_per_token, flops_per_attended = training_flops(model, plan.frozen_base)

    kind = PRETRAIN_BY_FLAG[stage].writes
    metrics, energy, card = train_and_save(
        accelerator,
        model,
        tokenizer,
        train_data,
        eval_data,
        plan,
        cfg,
        run.folder,
        kind=kind,
        parent=parent if kind != "model" else None,
        resume=run.resume,
        after_backward=after_backward,
        final_metrics=heldout_loss,
        new_token_ids=[new_ids[0], new_ids[-1] + 1] if new_ids else None,
        trained_from=parent,
        stage_key=run.key,
        report_to=config.run.report_to,
        attn_implementation=config.model.attn_implementation,
        periodic=periodic_eval(
            with_heldout_text(cfg.eval_tasks, folder(config, "tokenize")), tokenizer
        ),
        parent_key=model_identity(parent),
    )
    # The loop's own count (as its MFU): weights per token, attention per position attended.
    metrics["training_flops"] = metrics["tokens"] * (
        flops_per_token + flops_per_attended * cfg.block_size
    )
    if accelerator.is_main_process:
        accelerator.print(
            f"{name}: {steps} steps, loss {loss_text(metrics)}"
            + (f", held-out loss {metrics['eval_loss']:.4f}" if "eval_loss" in metrics else "")
            + f"; wrote {run.folder}"
        )
    record = model_record(card) if card else {}
    return {"metrics": metrics, "record": {**record, "energy": energy}}


def _packed_corpus(run: StageRun, parent: str, name: str, accelerator):
    """(corpus sources, tokenizer, training blocks, held-out blocks or None): the corpus packed
    into the content-keyed cache (built, or reused when its key matches) with the tokenizer
    the parent model was built for."""
    config, cfg = run.config, run.config.pretrain
    tokenizer_dir = _tokenizer_folder(config, parent)
    corpus_hashes = {
        label.removeprefix("corpus:"): value
        for label, value in run.plan.inputs.items()
        if label.startswith("corpus:")
    }
    if not corpus_hashes and "parent:prepare" in run.plan.inputs:  # the prepared corpus
        corpus_hashes = {"prepare": run.plan.inputs["parent:prepare"]}
    field = (
        "pretrain.corpus" if cfg.corpus else "tokenize.corpus" if config.tokenize.corpus else None
    )
    sources = resolve_sources(corpus_patterns(config, "pretrain"), field or "prepare's corpus/")
    tokenizer_id = tokenizer_hash(tokenizer_dir)
    parent_card = read_card(Path(parent)) if Path(parent).is_dir() else None
    if parent_card is not None and parent_card["tokenizer_hash"] != tokenizer_id:
        raise LowlmError(
            f"{parent} was built for another tokenizer (hash {parent_card['tokenizer_hash'][:12]}) "
            f"than the run's {tokenizer_dir} (hash {tokenizer_id[:12]}); rerun "
            "`lowlm resize` or `lowlm init` after `lowlm tokenize`."
        )
    corpus_key = cache_key(
        tokenizer_id, cfg.block_size, corpus_hashes, config.data, config.run.seed
    )
    cache = run.run_dir.path / "cache" / f"blocks-{corpus_key}"
    # Every rank calls it: over several processes each encodes a share of the corpus (and
    # ranks on several nodes need the run directory on a filesystem they all share).
    meta = build_cache(
        cache,
        tokenizer_dir,
        sources,
        config.data,
        cfg.block_size,
        config.run.seed,
        cfg.num_proc,
    )
    accelerator.print(
        f"{name}: {meta['train_blocks']} training blocks of {cfg.block_size} tokens and "
        f"{meta['eval_blocks']} held-out ones in {cache}"
    )
    accelerator.wait_for_everyone()
    tokenizer = load_tokenizer(tokenizer_dir)
    eos = tokenizer.eos_token_id if cfg.isolate_documents else None
    train_data = Blocks(BlockDataset(cache, "train"), eos)
    eval_blocks = BlockDataset(cache, "eval")
    eval_data = Blocks(eval_blocks, eos) if len(eval_blocks) else None
    return sources, tokenizer, train_data, eval_data


def _before_and_after(model, tokenizer, texts: dict[str, list[str]], accelerator):
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


def _stage_model(config: LowlmConfig, stage: str, parent: str, tokenizer, accelerator):
    """The parent loaded and prepared for the stage: (model, after_backward hook, new ids)."""
    cfg = config.pretrain
    dtype = torch.float32 if stage == "full" else resolve_load_dtype(config.model.dtype)
    # An adapter parent is folded in first; stage 2 may load the base quantized (QLoRA).
    quantize = cfg.stage2.quantize_base if stage == "2" else "none"
    model = load_base_for_lora(parent, config.model, quantize, dtype)
    check_vocab(model, tokenizer, parent)
    new_ids = _new_token_ids(parent, tokenizer)
    after_backward = None
    if stage == "1":
        model, after_backward = _prepare_stage1(model, new_ids, cfg.stage1.new_rows_only)
    elif stage == "2":
        model = _prepare_stage2(model, config, new_ids, model_is_sharded(accelerator))
    else:  # every weight trains (a merged adapter parent leaves them frozen)
        for param in model.parameters():
            param.requires_grad_(True)
    return model, after_backward, new_ids


def scored_texts(config: LowlmConfig, sources) -> dict[str, list[str]]:
    """What each stage scores before and after training: the run's held-out lines (a run
    without a tokenize stage takes them from its corpus by the same rule) and up to
    eval_lines of each tokenize.eval_texts file (the base language's drift)."""
    limit = config.pretrain.eval_lines
    lines = heldout_lines(tokenizer_folder(config), limit)
    if not lines and tokenizer_folder(config) is None and limit and config.data.heldout_fraction:
        lines = heldout_document_lines(
            iter_documents(sources, config.data),
            config.run.seed,
            config.data.heldout_fraction,
            min(limit, config.tokenize.holdout_lines),
        )
    texts = {"heldout": lines} if lines else {}
    for label, path in config.tokenize.eval_texts.items():
        if not Path(path).is_file():
            raise LowlmError(f"tokenize.eval_texts.{label}: file '{path}' does not exist.")
        texts[label] = read_lines(path, config.data)[:limit]
    return texts


def score_texts(model, tokenizer, texts: dict[str, list[str]]) -> dict[str, float]:
    return {label: loss_per_char(model, tokenizer, lines) for label, lines in texts.items()}


def stage_flops_per_token(config: LowlmConfig, stage: str) -> tuple[float, float]:
    """(FLOPs per trained token, per token and position attended) the loop counts for this
    stage's model as the stage would build it now (its parent must exist): what a benchmark
    needs to give several runs the same training FLOPs."""
    from lowlm.graph import Graph
    from lowlm.training.session import make_accelerator

    parent = Graph(config).plan(PRETRAIN_BY_FLAG[stage].name).model
    tokenizer = load_tokenizer(_tokenizer_folder(config, parent))
    accelerator = make_accelerator(config.model.dtype)
    model, _, _ = _stage_model(config, stage, parent, tokenizer, accelerator)
    return training_flops(model, frozen_base=stage != "full")


def run(
    config: LowlmConfig, stage: str | None = None, force: bool = False, resume: bool = True
) -> dict:
    """Run one stage, or every stage with steps > 0 in order (1, 2, full)."""
    stages = [stage] if stage else configured_stages(config)
    if not stages:
        raise LowlmError("no pretrain stage has steps; set pretrain.stage1/stage2/full.steps.")
    results = {}
    for name in stages:
        results[name] = run_stage(config, name, force=force, resume=resume)
    return results
