"""The training loop shared by every pre-training stage (and instruction tuning).

On accelerate: one process, or several through `accelerate launch` / `torchrun`.
Gradient accumulation, AdamW, warmup + cosine, clipping, bf16/fp16 autocast with the
trainable weights in fp32, optional gradient checkpointing. The data order is a pure
function of (seed, step), so a checkpoint needs only the step to resume exactly, and N
ranks see the same global batch as one process would.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lowlm.errors import LowlmError
from lowlm.rundir import atomic_write_json

# Peak dense bf16 throughput of common accelerators, for the MFU estimate.
GPU_PEAK_TFLOPS = {
    "H100": 989.0,
    "H200": 989.0,
    "A100": 312.0,
    "A10": 125.0,
    "L4": 121.0,
    "4090": 165.0,
    "3090": 71.0,
    "V100": 125.0,
    "T4": 65.0,
}


@dataclass
class TrainPlan:
    steps: int
    lr: float
    batch_size: int
    grad_accum: int = 1
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    log_every: int = 10
    eval_every: int = 200
    save_every: int = 500
    keep_checkpoints: int = 2
    max_eval_blocks: int = 64
    seed: int = 1234
    peak_tflops: float | None = None
    frozen_base: bool = False  # LoRA / embedding stages: no weight gradients for most of the model
    max_skipped_steps: int = 5  # non-finite steps in a row before the stage stops


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _Order:
    """The example at a global position: a fresh seeded permutation of the data every epoch."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch, self.perm = n, seed, -1, None

    def __call__(self, position: int) -> int:
        epoch, offset = divmod(position, self.n)
        if epoch != self.epoch:
            self.epoch, self.perm = (
                epoch,
                np.random.default_rng([self.seed, epoch]).permutation(self.n),
            )
        return int(self.perm[offset])


def cosine_lr(step: int, plan: TrainPlan) -> float:
    """Multiplier of the peak lr at a step: linear warmup, then cosine down to min_lr_ratio."""
    if plan.warmup_steps and step < plan.warmup_steps:
        return (step + 1) / plan.warmup_steps
    span = max(1, plan.steps - plan.warmup_steps)
    progress = min(1.0, (step - plan.warmup_steps) / span)
    return plan.min_lr_ratio + (1 - plan.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _param_groups(model, weight_decay: float) -> list[dict]:
    """No decay on embeddings, norms and biases: zero-gradient rows must not shrink."""
    embedding_ids = {id(model.get_input_embeddings().weight)}
    output = model.get_output_embeddings()
    if output is not None:
        embedding_ids.add(id(output.weight))
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        skip = param.ndim < 2 or id(param) in embedding_ids or "embed" in name or "lm_head" in name
        (no_decay if skip else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _peak_flops(device: torch.device, configured: float | None, dtype: torch.dtype) -> float:
    if configured:
        return configured * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in GPU_PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    # Measure: a few matmuls in the training precision (CPU, or a GPU the table does not know).
    size = 1024
    # Constant matrices: drawing random ones would move the global RNG after a resume restored
    # it (dropout would then differ from the uninterrupted run).
    a = torch.full((size, size), 0.5, device=device, dtype=dtype)
    b = torch.full((size, size), 0.25, device=device, dtype=dtype)
    a @ b
    started = time.perf_counter()
    for _ in range(4):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 4 * 2 * size**3 / (time.perf_counter() - started)


def _numel(param) -> int:
    """A weight's element count; a bitsandbytes 4-bit weight stores two per byte (its
    quant_state keeps the shape)."""
    shape = getattr(getattr(param, "quant_state", None), "shape", None)
    return math.prod(shape) if shape is not None else param.numel()


def _wrapped_weight(module):
    """A layer's weight, seen through peft's trainable-token wrapper (so a tie is still seen)."""
    return getattr(getattr(module, "token_adapter", None), "base_layer", module).weight


def training_flops(model, frozen_base: bool) -> tuple[float, float]:
    """(FLOPs per trained token for the weights, FLOPs per token and position it attends),
    the model FLOPs utilisation counts (as PaLM's MFU does): 2 per weight in the forward pass
    and 4 in the backward (2 where the weight is frozen: no weight gradient), the input
    embedding excluded unless it is the output layer's too (a lookup multiplies nothing);
    attention's score and value products add 4 x layers x width per position attended in
    the forward pass and twice that backward. Positions attended are counted per row as the
    kernel sees it (a packed row's full length; flash-attention's variable-length path
    computes less, so MFU is then understated)."""
    # peft's trainable-token rows are a delta copied into the weight, not a product of their own.
    weights = sum(
        _numel(p) for n, p in model.named_parameters() if "trainable_tokens_delta" not in n
    )
    embedding = _wrapped_weight(model.get_input_embeddings())
    output = model.get_output_embeddings()
    if output is None or _wrapped_weight(output) is not embedding:
        weights -= _numel(embedding)
    config = model.config.get_text_config()
    layers = getattr(config, "num_hidden_layers", 0) or 0
    heads = getattr(config, "num_attention_heads", 0) or 0
    head_dim = getattr(config, "head_dim", None) or (
        (getattr(config, "hidden_size", 0) or 0) // max(heads, 1)
    )
    return (4 if frozen_base else 6) * weights, 12 * layers * heads * head_dim


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint (state.json is written last)."""
    done = [p for p in (folder / "checkpoints").glob("step-*") if (p / "state.json").exists()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


CHECKPOINT_FORMAT = 2  # accelerate's save_state layout; 1 (lowlm's own files) is refused


def _trainable_names(model) -> set[str]:
    return {name for name, param in model.named_parameters() if param.requires_grad}


def sharded(accelerator) -> bool:
    """Whether each rank holds only shards of the model (FSDP): its forward, save and load
    then need every rank, in FSDP's own formats."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def _keep_trainable(models, weights, output_dir) -> None:
    """accelerate save_state pre-hook: a checkpoint of a LoRA or embedding stage holds the
    weights that train, not a copy of the frozen base (a 7B base is 14 GB a checkpoint).
    `weights` holds the state dicts accelerate gathered for plain and DDP models; FSDP and
    saves the model its own (sharded) way and leaves it empty."""
    for index, (model, state) in enumerate(zip(models, weights, strict=False)):
        names = _trainable_names(model)
        weights[index] = {key: value for key, value in state.items() if key in names}


def _save_checkpoint(
    accelerator, model, scheduler, step: int, folder: Path, keep: int, extra: dict
) -> None:
    """accelerate's save_state (model and optimizer as the distributed setup needs them:
    gathered for DDP, sharded for FSDP; GradScaler; every rank's RNG), plus the
    scheduler and state.json (written last: the checkpoint is complete when it exists), in a
    temporary folder the main process then renames into place."""
    checkpoints = folder / "checkpoints"
    tmp = checkpoints / f".step-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        # The scheduler is not accelerate-prepared (its wrapper would step once per process),
        # so it is saved here; a LambdaLR's state is plain values.
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_json(
            tmp / "state.json",
            {
                "step": step,
                "world_size": accelerator.num_processes,
                "distributed": str(accelerator.distributed_type),
                "compiled": _compiled(model),
                "format": CHECKPOINT_FORMAT,
                **extra,
            },
        )
        final = checkpoints / f"step-{step}"
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        done = sorted(
            (p for p in checkpoints.glob("step-*") if (p / "state.json").exists()),
            key=lambda p: int(p.name.split("-")[1]),
        )
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


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
    that needs unpickling beyond that (a copied or tampered run directory, or one written by
    an older lowlm) is refused, not executed."""
    from accelerate.utils import load

    try:
        return load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, TypeError, AttributeError) as exc:
        raise _refuse_unpickling(path, exc) from None


def _load_checkpoint(accelerator, model, scheduler, checkpoint: Path) -> dict:
    state = json.loads((checkpoint / "state.json").read_text())
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
    options = {}
    if not sharded(accelerator):
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
        options["strict"] = False  # the frozen weights are not in it, on purpose
    # accelerate swallows an RNG file it cannot load; check it here so a tampered one stops.
    _load_plain(checkpoint / f"random_states_{accelerator.process_index}.pkl")
    try:  # accelerate loads with weights_only=True too
        accelerator.load_state(str(checkpoint), **options)
    except pickle.UnpicklingError as exc:
        raise _refuse_unpickling(checkpoint, exc) from None
    scheduler.load_state_dict(_load_plain(checkpoint / "scheduler.pt"))
    return state


def to_device(data, device) -> torch.Tensor:
    """A host array or tensor on the training device. To a GPU it is copied from pinned memory
    without blocking: a copy from pageable memory waits until the GPU has finished the work
    queued before it, a host sync per batch."""
    tensor = torch.as_tensor(data)
    if torch.device(device).type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _collate(examples: Sequence[dict], device) -> dict[str, torch.Tensor]:
    """Stack examples; unequal lengths are right-padded (labels -100).

    Plain examples get an attention mask (0 on padding). Packed examples carry
    `position_ids` that restart at 0 at each document: then no attention mask is passed, so
    that transformers builds a mask that keeps the documents of a row apart (sdpa / eager from
    the position ids, flash-attention as variable-length sequences), and the padding is one
    more document of its own. `num_tokens` (popped by the loop) counts the real tokens.
    """
    length = max(len(e["input_ids"]) for e in examples)
    packed = "position_ids" in examples[0]
    keys = ("input_ids", "labels", "position_ids") if packed else ("input_ids", "labels")
    if all(len(e["input_ids"]) == length for e in examples):
        batch = {key: to_device(np.stack([e[key] for e in examples]), device) for key in keys}
        batch["num_tokens"] = len(examples) * length
        return batch
    input_ids = np.zeros((len(examples), length), dtype=np.int64)
    labels = np.full((len(examples), length), -100, dtype=np.int64)
    positions = np.tile(np.arange(length, dtype=np.int64), (len(examples), 1))
    attention = np.zeros((len(examples), length), dtype=np.int64)
    for row, example in enumerate(examples):
        size = len(example["input_ids"])
        input_ids[row, :size] = example["input_ids"]
        labels[row, :size] = example["labels"]
        attention[row, :size] = 1
        if packed:
            positions[row, :size] = example["position_ids"]
            positions[row, size:] = np.arange(length - size)
    batch = {
        "input_ids": to_device(input_ids, device),
        "labels": to_device(labels, device),
        "num_tokens": int(attention.sum()),
    }
    if packed:
        batch["position_ids"] = to_device(positions, device)
    else:
        batch["attention_mask"] = to_device(attention, device)
    return batch


def document_positions(ids: np.ndarray, labels: np.ndarray, eos: int) -> tuple:
    """(position_ids, labels) of a packed row of EOS-terminated documents: positions restart
    after every EOS, and the first token of each later document is not a target (it would be
    predicted from the document before it, which it cannot see)."""
    starts = np.flatnonzero(ids[:-1] == eos) + 1
    positions = np.arange(len(ids), dtype=np.int64)
    if len(starts):
        offsets = np.zeros(len(ids), dtype=np.int64)
        offsets[starts] = starts - np.concatenate(([0], starts[:-1]))
        positions -= np.cumsum(offsets)
        labels = labels.copy()
        labels[starts] = -100
    return positions, labels


@torch.no_grad()
def check_isolation(model, vocab: int, device, precise: bool) -> None:
    """Stop unless this model keeps packed documents apart when given restarting position ids
    and no attention mask (models with their own attention code may ignore them): the second
    of two packed random sequences must score as it does alone. Every rank runs it (a sharded
    model's forward is collective)."""
    generator = torch.Generator().manual_seed(0)
    first = torch.randint(0, vocab, (1, 7), generator=generator).to(device)
    second = torch.randint(0, vocab, (1, 5), generator=generator).to(device)
    was_training = model.training
    model.eval()
    try:
        alone = model(input_ids=second, use_cache=False).logits.float().log_softmax(-1)
        both = (
            model(
                input_ids=torch.cat([first, second], 1),
                use_cache=False,  # transformers reads packed documents only when there is no cache
                position_ids=torch.cat([torch.arange(7), torch.arange(5)]).unsqueeze(0).to(device),
            )
            .logits.float()[:, 7:]
            .log_softmax(-1)
        )
    finally:
        model.train(was_training)
    # fp32 agrees to rounding; bf16 / fp16 weights to their precision. A model that lets the
    # second sequence see the first differs by whole nats on random tokens.
    tolerance = 1e-3 if precise else 0.1
    difference = (alone - both).abs().max().item()
    if not difference <= tolerance:
        raise LowlmError(
            f"this model's attention does not keep packed examples apart (log-probabilities "
            f"differ by {difference:.3g} packed and alone; its attention code ignores restarting "
            "position ids); set packing off for this stage (sft.packing: false, "
            "pretrain.isolate_documents: false)."
        )


@torch.no_grad()
def evaluate(accelerator, model, eval_data, plan: TrainPlan) -> float | None:
    """Mean token loss over up to max_eval_blocks held-out examples, split across ranks."""
    n = min(len(eval_data), plan.max_eval_blocks) if eval_data is not None else 0
    if n == 0:
        return None
    model.eval()
    total = torch.zeros(2, device=accelerator.device)
    world, rank, size = accelerator.num_processes, accelerator.process_index, plan.batch_size
    # Every rank runs the same number of forward passes: a DDP forward syncs buffers and a
    # sharded one gathers weights, so a rank with nothing left scores a stand-in example
    # whose targets are all masked (it adds nothing).
    for round_start in range(0, n, size * world):
        start = round_start + rank * size
        examples = [eval_data[i] for i in range(start, min(n, start + size))]
        if not examples:
            stand_in = dict(eval_data[0])
            stand_in["labels"] = np.full_like(np.asarray(stand_in["labels"]), -100)
            examples = [stand_in]
        batch = _collate(examples, accelerator.device)
        labels = batch.pop("labels")
        batch.pop("num_tokens", None)
        with accelerator.autocast():
            logits = model(**batch).logits.float()
        labels = labels[:, 1:]
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),
            labels.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        total += torch.stack([losses, (labels != -100).sum().float()])
    total = accelerator.reduce(total, "sum")
    model.train()
    return (total[0] / total[1]).item() if total[1] > 0 else None


UPDATED, SKIPPED, OVERFLOW = 0, 1, 2  # what an optimizer step did


class _Ledger:
    """What the optimizer steps did, kept on the device and read back in one host sync at
    logging and checkpoint steps (every step only where the update itself needs the host to
    decide: fp16 loss scaling, devices without a fused AdamW).

    Each step records its outcome (UPDATED, SKIPPED by the numeric guard, or an fp16 loss-scale
    OVERFLOW), its loss (the mean over ranks) and its tokens; `read` turns them into the
    window's figures, writes a log line per skipped step, and stops the stage when
    max_skipped_steps steps in a row were skipped."""

    def __init__(self, device, plan: TrainPlan, folder: Path, main: bool, skipped: int):
        # loss, tokens, updated steps, token-positions attended; float64 keeps a window's
        # token count exact past 2**24
        wide = torch.float32 if torch.device(device).type == "mps" else torch.float64
        self.sums = torch.zeros(4, device=device, dtype=wide)
        self.pending: list[tuple[int, torch.Tensor]] = []
        self.plan, self.folder, self.main = plan, folder, main
        self.skipped, self.in_a_row, self.overflows = skipped, 0, 0
        self.tokens_seen = 0
        self.window_loss, self.window_tokens, self.window_steps = 0.0, 0, 0
        self.window_attended = 0.0

    def record(
        self, step: int, outcome: torch.Tensor, loss: torch.Tensor, tokens, attended
    ) -> None:
        updated = outcome == UPDATED
        figures = torch.stack([loss, tokens, torch.ones_like(loss), attended])
        figures = figures.to(self.sums.dtype)
        self.sums += torch.where(updated, figures, 0)
        self.pending.append((step, outcome))

    def read(self) -> None:
        if not self.pending:
            return
        outcomes = torch.stack([o for _, o in self.pending]).to(self.sums.dtype)
        values = torch.cat([self.sums, outcomes]).tolist()
        self.sums.zero_()
        self.window_loss += values[0]
        self.window_tokens += int(values[1])
        self.tokens_seen += int(values[1])
        self.window_steps += int(values[2])
        self.window_attended += values[3]
        steps = [step for step, _ in self.pending]
        self.pending = []
        for step, outcome in zip(steps, values[4:], strict=True):
            if outcome == OVERFLOW:  # routine while the fp16 loss scale settles
                self.overflows += 1
            elif outcome == SKIPPED:
                self.skipped += 1
                self.in_a_row += 1
                if self.main:
                    with (self.folder / "log.jsonl").open("a", encoding="utf-8") as handle:
                        handle.write(json.dumps({"step": step, "skipped": "non-finite"}) + "\n")
                if self.in_a_row >= self.plan.max_skipped_steps:
                    saved = latest_checkpoint(self.folder)
                    kept = (
                        f"the last good checkpoint is {saved}"
                        if saved
                        else "no checkpoint was written yet"
                    )
                    raise LowlmError(
                        f"the loss or gradient norm was non-finite for {self.in_a_row} steps in "
                        f"a row (steps {step - self.in_a_row + 1}-{step}, each skipped); {kept}. "
                        "Lower the learning rate, use bf16 or fp32 instead of fp16, or check the "
                        "data."
                    )
            else:
                self.in_a_row = 0

    def take_window(self) -> tuple[float | None, int, float]:
        """The mean loss of the window's updated steps (None when every step was skipped), its
        tokens and token-positions attended; starts the next window."""
        loss = self.window_loss / self.window_steps if self.window_steps else None
        tokens, attended = self.window_tokens, self.window_attended
        self.window_loss, self.window_tokens, self.window_steps = 0.0, 0, 0
        self.window_attended = 0.0
        return loss, tokens, attended


def _fused_adamw(accelerator) -> bool:
    """torch's fused AdamW, where the device has the kernel: one kernel per parameter group
    (on CPU about 4x faster than the foreach one), and it takes a `found_inf` flag that skips
    the update on the device."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        devices = _get_fused_kernels_supported_devices()
    except ImportError:  # a private helper: fall back to the devices every release supports
        devices = ["cpu", "cuda"]
    return accelerator.device.type in devices


def _match_fused(optimizer, fused: bool) -> None:
    """load_state_dict copies the saved param groups' flags in: a checkpoint of a lowlm that
    used the foreach AdamW would turn the fused one off. Set the flag back and put the step
    counters where that implementation keeps them."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    for group in inner.param_groups:
        if bool(group.get("fused")) == fused:
            continue
        group["fused"], group["foreach"] = fused, None
        for param in group["params"]:
            state = inner.state.get(param, {})
            if torch.is_tensor(state.get("step")):
                where = param.device if fused else "cpu"
                state["step"] = state["step"].to(where, torch.float32)


def train(
    accelerator,
    model,
    train_data,
    eval_data,
    plan: TrainPlan,
    folder: Path,
    resume: bool = False,
    after_backward: Callable[[], None] | None = None,
    collate: Callable[[Sequence[dict], object], dict] | None = None,
    loss_fn: Callable[[object, dict], torch.Tensor] | None = None,
    periodic: Callable[[object], dict] | None = None,
) -> tuple[dict, object]:
    """Train `model` (its trainable parameters) for plan.steps optimizer steps.

    `train_data[i]` returns {"input_ids", "labels"} arrays (labels -100 where no loss), or
    whatever `collate(examples, device)` turns into a batch; the loss is the model's own, or
    `loss_fn(model, batch)` (DPO). Every eval_every steps, `periodic(model)` adds its figures
    (benchmark scores) to the log. Writes checkpoints and log.jsonl into `folder`; returns
    the final metrics and the model as accelerate prepared it (wrapped for DDP / FSDP /
    what accelerator.get_state_dict takes).
    """
    collate = collate or _collate
    from tqdm.auto import tqdm

    if len(train_data) == 0:
        raise LowlmError("there is no training example; add text or lower the block size.")
    folder.mkdir(parents=True, exist_ok=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise LowlmError("the stage has no trainable parameter; check its configuration.")
    for param in trainable:  # trainable weights stay fp32 whatever the model's dtype
        param.data = param.data.float()
    fused = _fused_adamw(accelerator)
    optimizer = torch.optim.AdamW(
        _param_groups(model, plan.weight_decay),
        lr=plan.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
        fused=fused or None,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_lr(s, plan))
    precise = all(p.dtype == torch.float32 for p in model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    # Listed again: FSDP2's fully_shard replaces every parameter with a sharded one.
    trainable = [p for p in model.parameters() if p.requires_grad]
    hook = accelerator.register_save_state_pre_hook(_keep_trainable)
    model.train()
    config = accelerator.unwrap_model(model).config
    # Training needs no key/value cache, and transformers keeps packed documents apart only
    # without one; restored before the model is saved.
    use_cache, config.use_cache = getattr(config, "use_cache", None), False
    if "position_ids" in train_data[0]:
        vocab = getattr(config, "vocab_size", None) or getattr(
            config.get_text_config(), "vocab_size", 2
        )
        check_isolation(
            model, vocab, accelerator.device, precise and accelerator.mixed_precision == "no"
        )

    start_step, tokens_seen = 0, 0
    checkpoint = latest_checkpoint(folder) if resume else None
    if resume and checkpoint is None:
        accelerator.print(f"no checkpoint in {folder / 'checkpoints'}; starting from step 0.")
    if checkpoint is not None:
        restored = _load_checkpoint(accelerator, model, scheduler, checkpoint)
        _match_fused(optimizer, fused)
        start_step, tokens_seen = restored["step"], restored.get("tokens", 0)
        accelerator.print(f"resuming from {checkpoint} at step {start_step}.")
    elif accelerator.is_main_process:
        (folder / "log.jsonl").unlink(missing_ok=True)
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)

    world = accelerator.num_processes
    global_batch = plan.batch_size * plan.grad_accum * world
    order = _Order(len(train_data), plan.seed)
    unwrapped = accelerator.unwrap_model(model)
    flops_per_token, flops_per_attended = training_flops(unwrapped, plan.frozen_base)
    matmul_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
        str(accelerator.mixed_precision), torch.float32
    )
    peak = _peak_flops(accelerator.device, plan.peak_tflops, matmul_dtype) * world
    log_path = folder / "log.jsonl"

    window_start = time.perf_counter()
    last = {}
    if accelerator.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(accelerator.device)
    progress = tqdm(
        total=plan.steps,
        initial=start_step,
        disable=not accelerator.is_main_process,
        desc=folder.name.strip(".").removesuffix(".train"),
        dynamic_ncols=True,
    )
    ledger = _Ledger(
        accelerator.device,
        plan,
        folder,
        accelerator.is_main_process,
        restored.get("skipped", 0) if checkpoint is not None else 0,
    )
    ledger.tokens_seen = tokens_seen
    scaler = getattr(accelerator, "scaler", None)  # fp16 only
    # The numeric guard on the device: the fused AdamW skips the update when any rank's loss
    # or gradient norm is non-finite, so the host reads nothing until the next logging step.
    # The schedule then advances on a skipped step too (the lr follows the step number).
    # Under fp16's GradScaler (or without a fused kernel) the host decides: read every step.
    on_device = fused and scaler is None
    inner = getattr(optimizer, "optimizer", optimizer)
    for step in range(start_step, plan.steps):
        step_loss = torch.zeros((), device=accelerator.device)
        step_tokens = torch.zeros((), device=accelerator.device)
        step_attended = torch.zeros((), device=accelerator.device)  # tokens x row length
        batches = []
        for micro in range(plan.grad_accum):
            first = (
                step * global_batch + (micro * world + accelerator.process_index) * plan.batch_size
            )
            batches.append(
                collate(
                    [train_data[order(first + b)] for b in range(plan.batch_size)],
                    accelerator.device,
                )
            )
        if loss_fn is None and batches[0]["labels"].ndim == 2:  # next-token targets
            # The step's loss is the mean over every target token of the global batch, not a
            # mean of per-micro-batch means: batches of unequal target counts (SFT) then train
            # the same under any split over ranks and micro-steps. Each micro-batch's mean is
            # scaled by its share of the global count (times the ranks, which DDP averages).
            counts = [(b["labels"][:, 1:] != -100).sum() for b in batches]
            total = accelerator.reduce(torch.stack(counts).sum().float(), "sum").clamp(min=1)
            scales = [count * world / total for count in counts]
        else:
            scales = [1.0 / plan.grad_accum] * plan.grad_accum
        for micro, batch in enumerate(batches):
            real_tokens = batch.pop("num_tokens", None)
            if real_tokens is None:  # a stage's own collate (DPO, classifiers)
                mask = batch.get("attention_mask")
                real_tokens = mask.sum() if mask is not None else batch["input_ids"].numel()
            # Gradients are all-reduced only on the last micro-step of an optimizer step.
            last_micro = micro == plan.grad_accum - 1
            with contextlib.nullcontext() if last_micro else accelerator.no_sync(model):
                with accelerator.autocast():
                    loss = loss_fn(model, batch) if loss_fn else model(**batch).loss
                accelerator.backward(loss * scales[micro])
            step_loss += loss.detach() * scales[micro]
            step_tokens += real_tokens
            step_attended += real_tokens * batch["input_ids"].shape[-1]
        if after_backward is not None:
            after_backward()
        grad_norm = accelerator.clip_grad_norm_(trainable, plan.max_grad_norm)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: the norm of sharded gradients
            grad_norm = grad_norm.full_tensor()
        norm = torch.as_tensor(grad_norm if grad_norm is not None else 0.0).to(step_loss)
        # One reduction: loss, tokens, and whether any rank's loss or gradient norm is
        # non-finite (then every rank skips the update together).
        loss_sum, tokens, attended, bad_losses, bad_norms = accelerator.reduce(
            torch.stack(
                [
                    torch.nan_to_num(step_loss),
                    step_tokens.float(),
                    step_attended.float(),
                    (~torch.isfinite(step_loss)).float(),
                    (~torch.isfinite(norm)).float(),
                ]
            ),
            "sum",
        )
        done = step + 1
        progress.update(1)
        if on_device:
            outcome = ((bad_losses + bad_norms) > 0).long() * SKIPPED
            inner.found_inf = outcome.float()
            optimizer.step()
            scheduler.step()
        else:
            bad_loss, bad_norm = torch.stack([bad_losses, bad_norms]).tolist()  # a host sync
            if bad_loss == 0 and bad_norm > 0 and scaler is not None:
                # fp16 loss scaling overflowed. The wrapped optimizer's step lets the
                # GradScaler skip the update and lower the scale.
                optimizer.step()
                outcome = torch.tensor(OVERFLOW)
            elif bad_loss > 0 or bad_norm > 0:
                # Numeric guard: weights and optimizer state stay as they were.
                outcome = torch.tensor(SKIPPED)
            else:
                optimizer.step()
                scheduler.step()
                outcome = torch.tensor(UPDATED)
        optimizer.zero_grad(set_to_none=True)
        ledger.record(done, outcome.to(loss_sum.device), loss_sum / world, tokens, attended)
        log_now = done % plan.log_every == 0 or done == plan.steps
        if not on_device or log_now or done % plan.save_every == 0:
            ledger.read()  # the host sync

        if log_now:
            seconds = time.perf_counter() - window_start
            # loss is None when every step of the window was skipped by the numeric guard.
            window_loss, window_tokens, window_attended = ledger.take_window()
            tokens_per_s = window_tokens / seconds
            flops = flops_per_token * window_tokens + flops_per_attended * window_attended
            last = {
                "step": done,
                "loss": window_loss,
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": _finite_or_none(grad_norm),
                "skipped_steps": ledger.skipped,
                "tokens_per_s": tokens_per_s,
                "mfu": flops / seconds / peak,
            }
            if accelerator.device.type == "cuda":
                last["peak_gpu_memory_gb"] = (
                    torch.cuda.max_memory_allocated(accelerator.device) / 1e9
                )
            window_start = time.perf_counter()
            if done % plan.eval_every == 0 or done == plan.steps:
                eval_loss = evaluate(accelerator, model, eval_data, plan)
                if eval_loss is not None and math.isfinite(eval_loss):
                    last.update(eval_loss=eval_loss, eval_ppl=math.exp(min(eval_loss, 50)))
                last.update(_run_periodic(accelerator, model, periodic))
            if accelerator.is_main_process:
                with log_path.open("a", encoding="utf-8") as handle:
                    handle.write(json.dumps({**last, "time": round(time.time(), 3)}) + "\n")
                accelerator.log(_scalars(last), step=done)  # the trackers of run.report_to
                shown = "-" if last["loss"] is None else f"{last['loss']:.4f}"
                shown_memory = (
                    {"mem": f"{last['peak_gpu_memory_gb']:.1f}GB"}
                    if "peak_gpu_memory_gb" in last
                    else {}
                )
                progress.set_postfix(
                    loss=shown,
                    tok_s=f"{tokens_per_s:,.0f}",
                    mfu=f"{100 * last['mfu']:.1f}%",
                    **shown_memory,
                )
                progress.write(
                    " ".join(
                        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in last.items()
                    )
                )
        elif done % plan.eval_every == 0:
            eval_loss = evaluate(accelerator, model, eval_data, plan)
            entry = {"step": done, **_run_periodic(accelerator, model, periodic)}
            if eval_loss is not None:
                entry["eval_loss"] = eval_loss
            if len(entry) > 1 and accelerator.is_main_process:
                entry["time"] = round(time.time(), 3)
                with log_path.open("a", encoding="utf-8") as handle:
                    handle.write(json.dumps(entry) + "\n")
                accelerator.log(_scalars(entry), step=done)
        if done % plan.save_every == 0 and done < plan.steps:
            _save_checkpoint(
                accelerator,
                model,
                scheduler,
                done,
                folder,
                plan.keep_checkpoints,
                {"loss": last.get("loss"), "tokens": ledger.tokens_seen, "skipped": ledger.skipped},
            )
    progress.close()
    hook.remove()
    if use_cache is not None:
        config.use_cache = use_cache
    if start_step >= plan.steps and accelerator.is_main_process:
        accelerator.print(f"{folder.name}: already at step {plan.steps}.")
    final = {k: v for k, v in last.items() if k != "step"}
    final["steps"] = plan.steps
    final["tokens"] = ledger.tokens_seen
    final["world_size"] = world
    if accelerator.device.type == "cuda":
        final["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(accelerator.device) / 1e9
    final["skipped_steps"] = ledger.skipped
    if scaler is not None:
        final["fp16_overflow_steps"] = ledger.overflows
    return final, model


def _scalars(entry: dict) -> dict[str, float]:
    """The finite numbers of a log line, for the trackers (log.jsonl keeps everything)."""
    return {
        key: float(value)
        for key, value in entry.items()
        if key not in ("step", "time")
        and isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
    }


def _run_periodic(accelerator, model, periodic) -> dict:
    """Benchmark figures of the model being trained (the unwrapped model). Under DDP or one
    process the main process computes them while the others wait; a sharded model (FSDP)
    needs every rank in each forward, so there every rank runs the same texts and the main
    process's figures are kept."""
    if periodic is None:
        return {}
    results: dict = {}
    if accelerator.is_main_process or sharded(accelerator):
        unwrapped = accelerator.unwrap_model(model)
        with torch.no_grad(), accelerator.autocast():
            results = periodic(unwrapped)
        unwrapped.train()
    accelerator.wait_for_everyone()
    return results if accelerator.is_main_process else {}


def _finite_or_none(value) -> float | None:
    """A float for the log, or None (JSON has no NaN / Infinity)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None
