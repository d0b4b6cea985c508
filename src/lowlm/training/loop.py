"""The training loop shared by every pre-training stage (and instruction tuning).

On accelerate: one process, or several through `accelerate launch` / `torchrun`.
Gradient accumulation, AdamW, warmup + cosine, clipping, bf16/fp16 autocast with the
trainable weights in fp32, optional gradient checkpointing. The data order is a pure
function of (seed, step), so a checkpoint needs only the step to resume exactly, and N
ranks see the same global batch as one process would.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lowlm.errors import LowlmError
from lowlm.training.batches import padding_mask, right_pad
from lowlm.training.checkpoint import Checkpointer, latest_checkpoint, model_is_sharded
from lowlm.training.guard import StepOutcomes, fused_adamw_available, guarded_update
from lowlm.training.metrics import MetricLogger, Throughput, finite_or_none

# Imported from here by the stages and the session.
__all__ = [
    "TrainPlan",
    "check_isolation",
    "document_positions",
    "latest_checkpoint",
    "model_is_sharded",
    "seed_everything",
    "to_device",
    "train",
]


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
    embedding_lr: float | None = None  # peak lr of trained embedding / LM-head rows (default lr)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class DataOrder:
    """The example at a global position: a fresh seeded permutation of the data every epoch,
    so the order is a pure function of (seed, position)."""

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


def _param_groups(model, weight_decay: float, embedding_lr: float | None = None) -> list[dict]:
    """No decay on embeddings, norms and biases: zero-gradient rows must not shrink. With
    embedding_lr, the embedding and LM-head rows (whole, or peft's trainable-token deltas)
    form a group of their own at that peak lr."""
    embedding_ids = {id(model.get_input_embeddings().weight)}
    output = model.get_output_embeddings()
    if output is not None:
        embedding_ids.add(id(output.weight))
    decay, no_decay, rows = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        row = id(param) in embedding_ids or "embed" in name or "lm_head" in name
        if row and embedding_lr is not None:
            rows.append(param)
        else:
            (no_decay if row or param.ndim < 2 else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if rows:
        groups.append({"params": rows, "weight_decay": 0.0, "lr": embedding_lr})
    return [group for group in groups if group["params"]]


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
    rows = [e["input_ids"] for e in examples]
    input_ids, attention = right_pad(rows, 0), padding_mask(rows)
    labels = right_pad([e["labels"] for e in examples], -100)
    batch = {
        "input_ids": to_device(input_ids, device),
        "labels": to_device(labels, device),
        "num_tokens": int(attention.sum()),
    }
    if packed:  # the padding's positions start at 0: one more document of its own
        positions = [
            np.concatenate([e["position_ids"], np.arange(length - len(e["position_ids"]))])
            for e in examples
        ]
        batch["position_ids"] = to_device(np.stack(positions).astype(np.int64), device)
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


def _match_fused(optimizer, fused: bool) -> None:
    """load_state_dict copies the saved param groups' flags in, so a checkpoint written with
    the foreach AdamW (a device without the fused kernel) would turn the fused one off: set
    the flag back and put the step counters where that implementation keeps them."""
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
    if len(train_data) == 0:
        raise LowlmError("there is no training example; add text or lower the block size.")
    training = _set_up(accelerator, model, train_data, plan, folder, resume)
    model, optimizer, scheduler = training.model, training.optimizer, training.scheduler
    outcomes, logger = training.outcomes, training.logger
    world = accelerator.num_processes
    window_start, last = time.perf_counter(), {}
    for step in range(training.start_step, plan.steps):
        batches = _micro_batches(accelerator, train_data, training.order, step, plan, collate)
        loss_sum, tokens, attended, bad_losses, bad_norms, grad_norm = _forward_backward(
            accelerator, model, batches, plan, loss_fn, after_backward, training.trainable
        )
        done = step + 1
        logger.bar.update(1)
        outcome = guarded_update(
            optimizer, scheduler, training.scaler, training.on_device, bad_losses, bad_norms
        )
        optimizer.zero_grad(set_to_none=True)
        outcomes.record(done, outcome.to(loss_sum.device), loss_sum / world, tokens, attended)
        log_now = done % plan.log_every == 0 or done == plan.steps
        if not training.on_device or log_now or done % plan.save_every == 0:
            outcomes.read()  # the host sync
        entry = None
        if log_now:
            seconds = time.perf_counter() - window_start
            entry = _log_entry(accelerator, done, scheduler, grad_norm, training, seconds)
            window_start = time.perf_counter()  # evaluation counts in the next window
        if done % plan.eval_every == 0 or done == plan.steps:
            eval_loss = evaluate(accelerator, model, eval_data, plan)
            scores = _run_periodic(accelerator, model, periodic)
            entry = _with_evaluation(entry, done, eval_loss, scores)
        if log_now:
            last = entry
            logger.record(last, done)
            logger.show(last)
        elif entry is not None and len(entry) > 1:
            logger.record(entry, done)
        if done % plan.save_every == 0 and done < plan.steps:
            state = {"loss": last.get("loss"), "tokens": outcomes.tokens_seen}
            training.checkpointer.save(done, {**state, "skipped": outcomes.skipped})
    logger.close()
    training.checkpointer.close()
    if training.use_cache is not None:
        accelerator.unwrap_model(model).config.use_cache = training.use_cache
    if training.start_step >= plan.steps and accelerator.is_main_process:
        accelerator.print(f"{folder.name}: already at step {plan.steps}.")
    return _final_metrics(accelerator, plan, last, outcomes, training.scaler is not None), model


@dataclass
class _Training:
    """What the loop steps with once set up: the prepared model, optimizer and scheduler, the
    checkpointer, where it starts, and the step's bookkeeping."""

    model: object
    optimizer: object
    scheduler: object
    trainable: list  # the prepared model's trainable parameters (clipped each step)
    checkpointer: Checkpointer
    use_cache: bool | None  # the model's setting, restored after training
    start_step: int
    order: DataOrder
    throughput: Throughput
    logger: MetricLogger
    outcomes: StepOutcomes
    scaler: object  # fp16's GradScaler, else None
    on_device: bool  # the numeric guard decides on the device, read at logging steps


def _set_up(accelerator, model, train_data, plan: TrainPlan, folder: Path, resume: bool):
    """The model and AdamW prepared, the newest checkpoint restored when `resume`, and the
    data order, throughput, log and numeric guard carried on from where it stopped."""
    folder.mkdir(parents=True, exist_ok=True)
    fused = fused_adamw_available(accelerator)
    model, optimizer, scheduler, precise = _prepare(accelerator, model, plan, fused)
    # Listed again: FSDP2's fully_shard replaces every parameter with a sharded one.
    trainable = [p for p in model.parameters() if p.requires_grad]
    checkpointer = Checkpointer(accelerator, model, scheduler, folder, plan.keep_checkpoints)
    use_cache = _enter_training(accelerator, model, train_data, precise)
    restored = checkpointer.resume(resume) or {}
    if restored:
        _match_fused(optimizer, fused)
    start_step = restored.get("step", 0)
    order = DataOrder(len(train_data), plan.seed)
    unwrapped = accelerator.unwrap_model(model)
    throughput = Throughput(unwrapped, plan.frozen_base, accelerator, plan.peak_tflops)
    if accelerator.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(accelerator.device)
    logger = MetricLogger(accelerator, folder, plan.steps, start_step, fresh=not restored)
    outcomes = StepOutcomes(
        accelerator.device, plan.max_skipped_steps, folder, logger, restored.get("skipped", 0)
    )
    outcomes.tokens_seen = restored.get("tokens", 0)
    scaler = getattr(accelerator, "scaler", None)  # fp16 only
    # The guard decides on the device (no host read until the next logging step) where the
    # fused AdamW takes its flag; under fp16's GradScaler the host reads every step.
    on_device = fused and scaler is None
    return _Training(
        model,
        optimizer,
        scheduler,
        trainable,
        checkpointer,
        use_cache,
        start_step,
        order,
        throughput,
        logger,
        outcomes,
        scaler,
        on_device,
    )


def _log_entry(accelerator, done: int, scheduler, grad_norm, training: _Training, seconds):
    """A logging step's line: the window's loss, the lr, the gradient norm, the skipped steps,
    the throughput over `seconds` and (on a GPU) the peak memory."""
    window_loss, window_tokens, window_attended = training.outcomes.take_window()
    entry = {
        "step": done,
        "loss": window_loss,  # None when the guard skipped every step of the window
        "lr": scheduler.get_last_lr()[0],
        "grad_norm": finite_or_none(grad_norm),
        "skipped_steps": training.outcomes.skipped,
        **training.throughput.figures(window_tokens, window_attended, seconds),
    }
    if accelerator.device.type == "cuda":
        memory = torch.cuda.max_memory_allocated(accelerator.device)
        entry["peak_gpu_memory_gb"] = memory / 1e9
    return entry


def _prepare(accelerator, model, plan: TrainPlan, fused: bool):
    """(model, optimizer, scheduler, whether every weight is fp32) with the model and AdamW
    prepared by accelerate; the trainable weights in fp32 whatever the model's dtype."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise LowlmError("the stage has no trainable parameter; check its configuration.")
    for param in trainable:
        param.data = param.data.float()
    optimizer = torch.optim.AdamW(
        _param_groups(model, plan.weight_decay, plan.embedding_lr),
        lr=plan.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
        fused=fused or None,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_lr(s, plan))
    precise = all(p.dtype == torch.float32 for p in model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    return model, optimizer, scheduler, precise


def _enter_training(accelerator, model, train_data, precise: bool):
    """Training mode without a key/value cache (transformers keeps packed documents apart
    only without one); packed data is checked to stay apart. Returns use_cache to restore."""
    model.train()
    config = accelerator.unwrap_model(model).config
    use_cache, config.use_cache = getattr(config, "use_cache", None), False
    if "position_ids" in train_data[0]:
        vocab = getattr(config, "vocab_size", None) or getattr(
            config.get_text_config(), "vocab_size", 2
        )
        check_isolation(
            model, vocab, accelerator.device, precise and accelerator.mixed_precision == "no"
        )
    return use_cache


def _micro_batches(accelerator, train_data, order: DataOrder, step: int, plan, collate) -> list:
    """This rank's micro-batches of a step: the same global batch under any number of ranks."""
    world, rank = accelerator.num_processes, accelerator.process_index
    global_batch = plan.batch_size * plan.grad_accum * world
    batches = []
    for micro in range(plan.grad_accum):
        first = step * global_batch + (micro * world + rank) * plan.batch_size
        examples = [train_data[order(first + b)] for b in range(plan.batch_size)]
        batches.append(collate(examples, accelerator.device))
    return batches


def _loss_scales(accelerator, batches: list, plan: TrainPlan, loss_fn) -> list:
    """Each micro-batch's weight in the step's loss. With next-token targets the step's loss
    is the mean over every target token of the global batch, not a mean of per-micro-batch
    means: batches of unequal target counts (SFT) then train the same under any split over
    ranks and micro-steps (each mean scaled by its share of the count, times the ranks,
    which DDP averages)."""
    if loss_fn is None and batches[0]["labels"].ndim == 2:
        counts = [(b["labels"][:, 1:] != -100).sum() for b in batches]
        total = accelerator.reduce(torch.stack(counts).sum().float(), "sum").clamp(min=1)
        return [count * accelerator.num_processes / total for count in counts]
    return [1.0 / plan.grad_accum] * plan.grad_accum


def _forward_backward(accelerator, model, batches, plan, loss_fn, after_backward, trainable):
    """The step's gradients, clipped; (loss summed over ranks, tokens, token-positions
    attended, ranks with a non-finite loss, ranks with a non-finite gradient norm, the norm),
    the first five reduced in one call, on the device."""
    device = accelerator.device
    step_loss, step_tokens, step_attended = (torch.zeros((), device=device) for _ in range(3))
    scales = _loss_scales(accelerator, batches, plan, loss_fn)
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
    figures = torch.stack(
        [
            torch.nan_to_num(step_loss),
            step_tokens.float(),
            step_attended.float(),
            (~torch.isfinite(step_loss)).float(),
            (~torch.isfinite(norm)).float(),
        ]
    )
    return (*accelerator.reduce(figures, "sum"), grad_norm)


def _with_evaluation(entry: dict | None, done: int, eval_loss, scores: dict) -> dict:
    """A logging step's line gets the eval loss (when finite) with its perplexity, then the
    benchmark scores; an evaluation-only line (entry None) the scores, then the eval loss."""
    if entry is not None:
        if eval_loss is not None and math.isfinite(eval_loss):
            entry.update(eval_loss=eval_loss, eval_ppl=math.exp(min(eval_loss, 50)))
        return {**entry, **scores}
    entry = {"step": done, **scores}
    if eval_loss is not None:
        entry["eval_loss"] = eval_loss
    return entry


def _final_metrics(accelerator, plan, last: dict, outcomes: StepOutcomes, fp16: bool) -> dict:
    final = {k: v for k, v in last.items() if k != "step"}
    final["steps"] = plan.steps
    final["tokens"] = outcomes.tokens_seen
    final["world_size"] = accelerator.num_processes
    if accelerator.device.type == "cuda":
        final["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(accelerator.device) / 1e9
    final["skipped_steps"] = outcomes.skipped
    if fp16:
        final["fp16_overflow_steps"] = outcomes.overflows
    return final


def _run_periodic(accelerator, model, periodic) -> dict:
    """Benchmark figures of the model being trained (the unwrapped model). Under DDP or one
    process the main process computes them while the others wait; a sharded model (FSDP)
    needs every rank in each forward, so there every rank runs the same texts and the main
    process's figures are kept."""
    if periodic is None:
        return {}
    results: dict = {}
    if accelerator.is_main_process or model_is_sharded(accelerator):
        unwrapped = accelerator.unwrap_model(model)
        with torch.no_grad(), accelerator.autocast():
            results = periodic(unwrapped)
        unwrapped.train()
    accelerator.wait_for_everyone()
    return results if accelerator.is_main_process else {}
