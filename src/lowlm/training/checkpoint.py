"""Checkpoints of a training run: accelerate's save_state / load_state in a folder per step,
and the refusal of a checkpoint this run cannot continue (another layout, launch, compile
setting or set of trainable weights, or files that only unpickling code could restore)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import torch

from lowlm.errors import LowlmError
from lowlm.rundir import atomic_write_json

CHECKPOINT_FORMAT = 2  # accelerate's save_state layout; any other is refused


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint (state.json is written last)."""
    done = [p for p in (folder / "checkpoints").glob("step-*") if (p / "state.json").exists()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def model_is_sharded(accelerator) -> bool:
    """Whether each rank holds only shards of the model (FSDP): its forward, save and load
    then need every rank, in FSDP's own formats."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


class Checkpointer:
    """Saves and restores the run in `folder`/checkpoints: model and optimizer as the
    distributed setup needs them (gathered for DDP, sharded for FSDP), GradScaler, every
    rank's RNG, the scheduler and state.json (written last: a checkpoint is complete when it
    exists). A checkpoint holds the weights that train, not a copy of the frozen base."""

    def __init__(self, accelerator, model, scheduler, folder: Path, keep: int):
        self.accelerator, self.model, self.scheduler = accelerator, model, scheduler
        self.folder, self.keep = folder, keep
        self.hook = accelerator.register_save_state_pre_hook(_keep_trainable)

    def resume(self, wanted: bool) -> dict | None:
        """The state of the newest checkpoint, restored, when `wanted` and there is one;
        otherwise None, and the checkpoints of an earlier run are removed."""
        accelerator = self.accelerator
        checkpoint = latest_checkpoint(self.folder) if wanted else None
        if wanted and checkpoint is None:
            where = self.folder / "checkpoints"
            accelerator.print(f"no checkpoint in {where}; starting from step 0.")
        if checkpoint is None:
            if accelerator.is_main_process:
                shutil.rmtree(self.folder / "checkpoints", ignore_errors=True)
            return None
        state = self._load(checkpoint)
        accelerator.print(f"resuming from {checkpoint} at step {state['step']}.")
        return state

    def save(self, step: int, extra: dict) -> None:
        """Write checkpoints/step-N in a temporary folder the main process then renames into
        place; keep the newest `keep`."""
        accelerator = self.accelerator
        checkpoints = self.folder / "checkpoints"
        tmp = checkpoints / f".step-{step}.tmp"
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            # The scheduler is not accelerate-prepared (its wrapper would step once per
            # process), so it is saved here; a LambdaLR's state is plain values.
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            state = {
                "step": step,
                "world_size": accelerator.num_processes,
                "distributed": str(accelerator.distributed_type),
                "compiled": _compiled(self.model),
                "format": CHECKPOINT_FORMAT,
                **extra,
            }
            atomic_write_json(tmp / "state.json", state)
            final = checkpoints / f"step-{step}"
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            done = sorted(
                (p for p in checkpoints.glob("step-*") if (p / "state.json").exists()),
                key=lambda p: int(p.name.split("-")[1]),
            )
            for old in done[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

    def close(self) -> None:
        self.hook.remove()

    def _load(self, checkpoint: Path) -> dict:
        accelerator = self.accelerator
        state = json.loads((checkpoint / "state.json").read_text())
        _refuse_other_runs(accelerator, self.model, checkpoint, state)
        options = {}
        if not model_is_sharded(accelerator):
            _refuse_other_weights(self.model, checkpoint)
            options["strict"] = False  # the frozen weights are not in it, on purpose
        # accelerate swallows an RNG file it cannot load; check it here so a tampered one stops.
        _load_plain(checkpoint / f"random_states_{accelerator.process_index}.pkl")
        try:  # accelerate loads with weights_only=True too
            accelerator.load_state(str(checkpoint), **options)
        except pickle.UnpicklingError as exc:
            raise _refuse_unpickling(checkpoint, exc) from None
        self.scheduler.load_state_dict(_load_plain(checkpoint / "scheduler.pt"))
        return state


def _refuse_other_runs(accelerator, model, checkpoint: Path, state: dict) -> None:
    """Stop unless the checkpoint's layout, launch and compile setting are this run's."""
    if state.get("format") != CHECKPOINT_FORMAT:
        raise LowlmError(
            f"{checkpoint} was written by an older lowlm in another layout; start the stage "
            "over with --no-resume."
        )
    if state["world_size"] != accelerator.num_processes or state["distributed"] != str(
        accelerator.distributed_type
    ):
        raise LowlmError(
            f"{checkpoint} was written by {state['world_size']} process(es) under "
            f"{state['distributed']}, this run has {accelerator.num_processes} under "
            f"{accelerator.distributed_type}; resume with the same launch configuration "
            "(the global batch and the sharded state depend on it), or --no-resume."
        )
    if state.get("compiled", False) != _compiled(model):
        was = "on" if state.get("compiled") else "off"
        raise LowlmError(
            f"{checkpoint} was written with compile {was} (its weight names differ); resume "
            f"with compile {was}, or --no-resume."
        )


def _refuse_other_weights(model, checkpoint: Path) -> None:
    """Stop unless the checkpoint holds exactly the weights this stage trains."""
    from safetensors import safe_open

    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as handle:
        saved = set(handle.keys())
    expected = _trainable_names(model)
    if saved != expected:
        raise LowlmError(
            f"{checkpoint} holds other trainable weights than this stage trains "
            f"({len(saved ^ expected)} differ, e.g. {sorted(saved ^ expected)[0]}); "
            "start the stage over with --no-resume."
        )


def _trainable_names(model) -> set[str]:
    return {name for name, param in model.named_parameters() if param.requires_grad}


def _keep_trainable(models, weights, output_dir) -> None:
    """accelerate save_state pre-hook: a checkpoint of a LoRA or embedding stage holds the
    weights that train, not a copy of the frozen base (a 7B base is 14 GB a checkpoint).
    `weights` holds the state dicts accelerate gathered for plain and DDP models; FSDP
    saves the model its own (sharded) way and leaves it empty."""
    for index, (model, state) in enumerate(zip(models, weights, strict=False)):
        names = _trainable_names(model)
        weights[index] = {key: value for key, value in state.items() if key in names}


def _compiled(model) -> bool:
    from accelerate.utils import is_compiled_module

    return is_compiled_module(model)


def _refuse_unpickling(path: Path, exc: Exception) -> LowlmError:
    return LowlmError(
        f"{path} holds objects that only unpickling code could restore ({str(exc)[:120]}); "
        "lowlm will not run it. Start the stage over with --no-resume."
    )


def _load_plain(path: Path):
    """torch.load with weights_only=True: tensors and plain values, never code. A checkpoint
    that needs unpickling beyond that (a copied or tampered run directory) is refused, not
    executed."""
    from accelerate.utils import load

    try:
        return load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, TypeError, AttributeError) as exc:
        raise _refuse_unpickling(path, exc) from None
