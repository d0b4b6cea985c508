"""What training reports: log.jsonl (written here and nowhere else), the trackers of
run.report_to, the progress bar, and the figures behind MFU."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

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


class MetricLogger:
    """log.jsonl, the trackers and the progress bar of one training run; the main process
    writes, the others only count."""

    def __init__(self, accelerator, folder: Path, steps: int, start_step: int, fresh: bool):
        from tqdm.auto import tqdm

        self.accelerator = accelerator
        self.main = accelerator.is_main_process
        self.path = folder / "log.jsonl"
        if fresh and self.main:
            self.path.unlink(missing_ok=True)
        self.bar = tqdm(
            total=steps,
            initial=start_step,
            disable=not self.main,
            desc=folder.name.strip(".").removesuffix(".train"),
            dynamic_ncols=True,
        )

    def write(self, entry: dict) -> None:
        """One line of log.jsonl."""
        if self.main:
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(entry) + "\n")

    def record(self, entry: dict, step: int) -> None:
        """A line stamped with the time, and its finite numbers to the trackers."""
        if self.main:
            self.write({**entry, "time": round(time.time(), 3)})
            self.accelerator.log(scalars(entry), step=step)

    def show(self, entry: dict) -> None:
        """A logging step's figures beside the bar and as a line under it."""
        if not self.main:
            return
        shown = "-" if entry["loss"] is None else f"{entry['loss']:.4f}"
        memory = entry.get("peak_gpu_memory_gb")
        extra = {"mem": f"{memory:.1f}GB"} if memory is not None else {}
        self.bar.set_postfix(
            loss=shown,
            tok_s=f"{entry['tokens_per_s']:,.0f}",
            mfu=f"{100 * entry['mfu']:.1f}%",
            **extra,
        )
        self.bar.write(
            " ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items()
            )
        )

    def close(self) -> None:
        self.bar.close()


def scalars(entry: dict) -> dict[str, float]:
    """The finite numbers of a log line, for the trackers (log.jsonl keeps everything)."""
    return {
        key: float(value)
        for key, value in entry.items()
        if key not in ("step", "time")
        and isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
    }


def finite_or_none(value) -> float | None:
    """A float for the log, or None (JSON has no NaN / Infinity)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


class Throughput:
    """Tokens per second and model FLOPs utilisation of a window of steps."""

    def __init__(self, model, frozen_base: bool, accelerator, configured_tflops: float | None):
        self.per_token, self.per_attended = training_flops(model, frozen_base)
        matmul_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
            str(accelerator.mixed_precision), torch.float32
        )
        peak = peak_flops(accelerator.device, configured_tflops, matmul_dtype)
        self.peak = peak * accelerator.num_processes

    def figures(self, tokens: int, attended: float, seconds: float) -> dict:
        flops = self.per_token * tokens + self.per_attended * attended
        return {"tokens_per_s": tokens / seconds, "mfu": flops / seconds / self.peak}


def peak_flops(device: torch.device, configured: float | None, dtype: torch.dtype) -> float:
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


def loss_text(metrics: dict) -> str:
    """A stage's final loss for its closing line ("-" when it trained no step)."""
    loss = metrics.get("loss")
    return "-" if loss is None else f"{loss:.4f}"
