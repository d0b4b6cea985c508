"""What every training stage does around the loop: the accelerator, the plan, energy, live
trackers, and saving the result into its run folder (with log.jsonl and checkpoints)
atomically."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lowlm.config import TrainingSection
from lowlm.errors import LowlmError, StageInterrupted
from lowlm.models.load import model_identity, model_record, save_model_folder, set_attention
from lowlm.rundir import atomic_dir
from lowlm.training.energy import track_energy
from lowlm.training.loop import TrainPlan, latest_checkpoint, train

if TYPE_CHECKING:
    from lowlm.execute import StageRun

TRACKING_FOLDER = "tracking"  # <run>/tracking/<stage>/ for trackers that write files


def make_accelerator(dtype: str, compile: bool = False):
    """bf16 / fp16 autocast from model.dtype (auto: bf16 on a GPU that has it, else fp32);
    `compile`: accelerate compiles the model in prepare (inductor)."""
    from accelerate import Accelerator

    if dtype == "fp16" and not torch.cuda.is_available():
        raise LowlmError(
            "model.dtype fp16 needs a CUDA GPU (fp16 training scales gradients there); use bf16 "
            "or fp32 on this machine."
        )
    if dtype == "auto":
        cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        precision = "bf16" if cuda_bf16 else "no"
    else:
        precision = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[dtype]
    from accelerate.state import AcceleratorState

    shared = AcceleratorState._shared_state
    plugin = shared.get("dynamo_plugin")
    compiled = plugin is not None and str(plugin.backend.value).lower() != "no"
    if shared and (
        str(shared.get("_mixed_precision", precision)) != precision or compiled != compile
    ):
        # One process running several stages (lowlm run, tests) with different precisions or
        # compile settings: accelerate keeps its state per process, so start it afresh.
        AcceleratorState._reset_state()
    # cpu=True without CUDA: otherwise accelerate ignores torchrun's ranks on such a machine.
    # dynamo_backend None leaves an `accelerate config` choice in force.
    accelerator = Accelerator(
        mixed_precision=precision,
        cpu=not torch.cuda.is_available(),
        dynamo_backend="inductor" if compile else None,
    )
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # accelerate's DeepSpeed backward steps the engine's optimizer itself, on every
        # micro-step unless its own accumulation is configured: past lowlm's gradient
        # accumulation, loss normalisation and non-finite-step guard, so its figures would not
        # be the run's. Not supported until that path is built and run on GPUs.
        raise LowlmError(
            "lowlm's training loop does not support DeepSpeed yet (its engine steps the "
            "optimizer inside backward, past lowlm's accumulation and numeric guard); launch "
            "with configs/accelerate/fsdp.yaml (FSDP2 shards parameters, gradients and "
            "optimizer state, as ZeRO-3) or configs/accelerate/multi-gpu.yaml."
        )
    return accelerator


def check_trackers(report_to: list[str]) -> None:
    """Stop, before any training, when a tracker named in run.report_to is not installed
    (accelerate would only warn and train without it)."""
    import accelerate.utils

    missing = [n for n in report_to if not getattr(accelerate.utils, f"is_{n}_available")()]
    if missing:
        names = " ".join(missing)
        raise LowlmError(
            f"run.report_to names {', '.join(missing)}, which is not installed; "
            f"pip install {names} (or pip install 'lowlm[tracking]'), or remove it from "
            "run.report_to."
        )


def start_tracking(
    accelerator, report_to: list[str], run_dir: Path, stage: str, plan: TrainPlan, fresh: bool
) -> None:
    """Open accelerate's trackers for one stage: the project is the run, each tracker's run is
    the stage, and TensorBoard writes to <run>/tracking/<stage>/ (emptied when the stage starts
    over, as log.jsonl is). accelerate opens and feeds them on the main process only."""
    if not report_to:
        return
    check_trackers(report_to)
    from accelerate.tracking import TensorBoardTracker, filter_trackers

    folder = run_dir / TRACKING_FOLDER
    if fresh and accelerator.is_main_process:
        shutil.rmtree(folder / stage, ignore_errors=True)
    # The stages build the accelerator before the run's config reaches this point; accelerate
    # reads `log_with` only in init_trackers, so setting it here equals passing it to
    # Accelerator(). TensorBoard goes in as an instance: its folder is then the stage's while
    # the other trackers' project is the run.
    chosen = [TensorBoardTracker(stage, folder) if n == "tensorboard" else n for n in report_to]
    accelerator.log_with = filter_trackers(chosen, str(folder))
    hyperparameters = {  # trackers take plain values only
        k: v for k, v in dataclasses.asdict(plan).items() if isinstance(v, bool | int | float | str)
    }
    accelerator.init_trackers(
        run_dir.name,
        config={"stage": stage, **hyperparameters},
        init_kwargs={
            "wandb": {"name": stage},
            "trackio": {"name": stage},
            "mlflow": {"run_name": stage},
        },
    )


def stop_tracking(accelerator) -> None:
    """Close the stage's trackers. Not accelerator.end_training(): that also destroys the
    process group, which the barriers after training and the next stage of `lowlm run` need."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers.clear()


# The loop settings a stage's config section holds under the plan's own names.
_PLAN_FROM_SECTION = (
    "batch_size",
    "grad_accum",
    "warmup_steps",
    "min_lr_ratio",
    "weight_decay",
    "max_grad_norm",
    "log_every",
    "eval_every",
    "save_every",
    "keep_checkpoints",
    "max_eval_blocks",
    "peak_tflops",
    "max_skipped_steps",
)


def plan_from(
    section: TrainingSection,
    steps: int,
    lr: float,
    seed: int,
    frozen_base: bool,
    embedding_lr: float | None = None,
) -> TrainPlan:
    """The loop's plan: `steps` at peak `lr`, the rest from the stage's config section."""
    from_section = {name: getattr(section, name) for name in _PLAN_FROM_SECTION}
    return TrainPlan(
        steps=steps,
        lr=lr,
        seed=seed,
        frozen_base=frozen_base,
        embedding_lr=embedding_lr,
        **from_section,
    )


def train_and_save(
    run: StageRun,
    accelerator,
    model,
    tokenizer,
    train_data,
    eval_data,
    plan: TrainPlan,
    *,
    kind: str,
    parent: str | None,
    after_backward: Callable[[], None] | None = None,
    final_metrics: Callable[[object], dict] | None = None,
    collate: Callable | None = None,
    loss_fn: Callable | None = None,
    files: Callable[[], dict[str, str]] | None = None,
    periodic: Callable[[object], dict] | None = None,
    **card: object,
) -> dict:
    """Train, then (main process) write the stage's folder: the weights of `kind`, the
    tokenizer, the card, the stage's own `files`, log.jsonl and checkpoints. Returns the
    stage's result: {"metrics", "record": the model's record (main rank) and energy}.

    The run gives the rest: its folder, whether to resume, its config section (speed switches,
    energy), run.report_to (the trackers the loop's scalars also go to),
    model.attn_implementation, and the keys the card records (the stage's and its model's)."""
    config, folder, section_name = run.config, run.folder, _config_section(run.plan.name)
    section = getattr(config, section_name)
    card.update(stage_key=run.key, parent_key=model_identity(run.plan.model))
    speed_switches(model, section, config.model.attn_implementation)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    work = folder.with_name(f".{folder.name}.train")  # checkpoints and log while training
    fresh = not (run.resume and latest_checkpoint(work) is not None)  # as train() decides
    start_tracking(accelerator, config.run.report_to, folder.parent, folder.name, plan, fresh)
    try:
        with (
            _interrupted_at(work, plan),
            track_energy(
                section.energy.enabled and accelerator.is_main_process,
                section.energy.country_iso_code,
                section_name,
            ) as energy,
        ):
            metrics, prepared = train(
                accelerator,
                model,
                train_data,
                eval_data,
                plan,
                work,
                resume=run.resume,
                after_backward=after_backward,
                collate=collate,
                loss_fn=loss_fn,
                periodic=periodic,
            )
    finally:
        stop_tracking(accelerator)
    metrics["trainable_parameters"] = trainable
    unwrapped = accelerator.unwrap_model(prepared)
    if final_metrics is not None:
        # Every rank scores the same texts (a sharded model's forward is collective); the
        # figures are the same on each, the main process records them.
        with accelerator.autocast():
            metrics.update(final_metrics(unwrapped))
    # The whole state, gathered from every rank's shard under FSDP (every rank takes part);
    # the model as it is under one process or DDP.
    state = accelerator.get_state_dict(prepared)
    saved = None
    if accelerator.is_main_process:
        written = files() if files is not None else {}
        saved = _save(unwrapped, tokenizer, folder, work, state, written, kind, parent, card)
    accelerator.wait_for_everyone()
    record = model_record(saved) if saved is not None else {}
    return {"metrics": metrics, "record": {**record, "energy": energy}}


def _save(model, tokenizer, folder: Path, work: Path, state, files, kind, parent, card) -> dict:
    """Write the stage's folder atomically: the model as `kind` with its card, the stage's own
    files (e.g. its results), and the log and checkpoints from the training folder."""
    with atomic_dir(folder) as out:
        saved = save_model_folder(model, tokenizer, out, kind, parent, state_dict=state, **card)
        for name, text in files.items():
            (out / name).write_text(text, encoding="utf-8")
        for item in ("log.jsonl", "checkpoints"):
            if (work / item).exists():
                (work / item).rename(out / item)
    shutil.rmtree(work, ignore_errors=True)
    return saved


@contextlib.contextmanager
def _interrupted_at(work: Path, plan: TrainPlan):
    """Ctrl-C in the loop becomes StageInterrupted saying where the stage stopped: its last
    logged step and the checkpoint the next run resumes from."""
    try:
        yield
    except KeyboardInterrupt:
        logged = [json.loads(line) for line in _lines(work / "log.jsonl")]
        last = max((entry.get("step", 0) for entry in logged), default=0)
        checkpoint = latest_checkpoint(work)
        resumes = (
            f"the next run resumes from the checkpoint at step {checkpoint.name.split('-')[1]}"
            if checkpoint is not None
            else f"no checkpoint yet (every {plan.save_every} steps): the next run starts over"
        )
        raise StageInterrupted(
            f"interrupted (Ctrl-C) after step {last} of {plan.steps} (the last logged); {resumes}."
        ) from None


def _lines(path: Path) -> list[str]:
    try:
        return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError:
        return []


def speed_switches(model, section: TrainingSection, attn_implementation: str | None) -> None:
    """The attention kernel (model.attn_implementation), gradient checkpointing and Liger's
    kernels, set on the model before training; each refuses in one line where this machine or
    model cannot honour it (instead of training silently without it)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if attn_implementation is not None:
        set_attention(base, attn_implementation)
    if section.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if section.liger_kernel:
        if not torch.cuda.is_available():
            raise LowlmError(
                "liger_kernel needs a CUDA GPU (its kernels are Triton); turn it off here."
            )
        try:
            from liger_kernel.transformers import _apply_liger_kernel_to_instance
        except ImportError:
            raise LowlmError(
                "liger_kernel is on but the liger-kernel package is not installed; pip install "
                "liger-kernel, or turn it off."
            ) from None
        # transformers' own Trainer calls the same function for use_liger_kernel.
        _apply_liger_kernel_to_instance(model=base)


def _config_section(stage: str) -> str:
    """The config section holding a training stage's loop settings (the graph declares it)."""
    from lowlm.graph import STAGES

    declared = STAGES.get(stage)
    return declared.section if declared is not None and declared.section else "pretrain"


def run_training_stage(config, name: str, work, force: bool = False, resume: bool = True):
    """A training stage through the stage skeleton: its accelerator (precision from
    model.dtype, compile from the stage's section) built first, every rank working,
    `work(run, accelerator)` doing the stage."""
    from lowlm.execute import execute

    section = getattr(config, _config_section(name))
    accelerator = make_accelerator(config.model.dtype, section.compile)
    return execute(
        config,
        name,
        lambda run: work(run, accelerator),
        force=force,
        resume=resume,
        say=accelerator.print,
        accelerator=accelerator,
    )


def starting_model(run: StageRun, missing: str) -> str:
    """The model the stage starts from (its plan's); without one, stops saying `missing`."""
    if not run.plan.model:
        raise LowlmError(missing)
    return run.plan.model
