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

from lowlm.config import LowlmConfig
from lowlm.data.heldout import with_heldout_text
from lowlm.errors import LowlmError
from lowlm.evaluation.runners import periodic_eval
from lowlm.execute import StageRun
from lowlm.graph import PRETRAIN_BY_FLAG, PRETRAIN_STAGES, folder
from lowlm.models.load import load_tokenizer
from lowlm.models.metrics import score_before_and_after
from lowlm.models.pretrain_setup import pretrain_model
from lowlm.training.loop import model_is_sharded, seed_everything
from lowlm.training.metrics import loss_text, training_flops
from lowlm.training.pretrain_corpus import packed_corpus, pretrain_tokenizer_folder, scored_texts
from lowlm.training.session import plan_from, run_training_stage, starting_model, train_and_save


def configured_stages(config: LowlmConfig) -> list[str]:
    cfg = config.pretrain
    return [s.flag for s in PRETRAIN_STAGES if getattr(cfg, s.section).steps > 0]


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
    parent = starting_model(
        run,
        f"pretrain stage {stage} has no model to start from; configure `resize` (model.base "
        "and tokenize.corpus) or `init` (init.size) and run it first.",
    )
    sources, tokenizer, train_data, eval_data = packed_corpus(run, parent, name, accelerator)

    seed_everything(config.run.seed)
    sharded = model_is_sharded(accelerator)
    model, after_backward, new_ids = pretrain_model(config, stage, parent, tokenizer, sharded)
    embedding_lr = getattr(section, "embedding_lr", None)  # stage 2's own lever
    plan = plan_from(cfg, section.steps, section.lr, config.run.seed, stage != "full", embedding_lr)
    texts = scored_texts(config, sources)
    heldout_loss = score_before_and_after(model, tokenizer, texts, accelerator)
    flops_per_token, flops_per_attended = training_flops(model, plan.frozen_base)

    kind = PRETRAIN_BY_FLAG[stage].writes
    result = train_and_save(
        run,
        accelerator,
        model,
        tokenizer,
        train_data,
        eval_data,
        plan,
        kind=kind,
        parent=parent if kind != "model" else None,
        after_backward=after_backward,
        final_metrics=heldout_loss,
        periodic=periodic_eval(
            with_heldout_text(cfg.eval_tasks, folder(config, "tokenize")), tokenizer
        ),
        new_token_ids=[new_ids[0], new_ids[-1] + 1] if new_ids else None,
        trained_from=parent,
    )
    metrics = result["metrics"]
    # The loop's own count (as its MFU): weights per token, attention per position attended.
    metrics["training_flops"] = metrics["tokens"] * (
        flops_per_token + flops_per_attended * cfg.block_size
    )
    if accelerator.is_main_process:
        accelerator.print(
            f"{name}: {section.steps} steps, loss {loss_text(metrics)}"
            + (f", held-out loss {metrics['eval_loss']:.4f}" if "eval_loss" in metrics else "")
            + f"; wrote {run.folder}"
        )
    return result


def stage_flops_per_token(config: LowlmConfig, stage: str) -> tuple[float, float]:
    """(FLOPs per trained token, per token and position attended) the loop counts for this
    stage's model as the stage would build it now (its parent must exist): what a benchmark
    needs to give several runs the same training FLOPs."""
    from lowlm.graph import Graph
    from lowlm.training.session import make_accelerator

    parent = Graph(config).plan(PRETRAIN_BY_FLAG[stage].name).model
    tokenizer = load_tokenizer(pretrain_tokenizer_folder(config, parent))
    accelerator = make_accelerator(config.model.dtype)
    model, _, _ = pretrain_model(config, stage, parent, tokenizer, model_is_sharded(accelerator))
    return training_flops(model, frozen_base=stage != "full")
