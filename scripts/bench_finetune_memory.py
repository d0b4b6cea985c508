"""Where the memory of `lowlm finetune` on a small model goes: resident memory after each step of
what the stage does (load the classifier, wrap it in LoRA, one training step of a batch of B
sequences of L tokens, with and without gradient checkpointing), measured in one process.

    .venv/bin/python scripts/bench_finetune_memory.py                   # SmolLM2-135M, B=8
    .venv/bin/python scripts/bench_finetune_memory.py --lengths 32 256 --batch 8

Model: SmolLM2-135M as a dense HF folder (~/.cache/lowlm/smollm2-135m-hf, made once from the
asset GGUF), or --model FOLDER. The classifier, LoRA (finetune's defaults: r 64, alpha 128,
q/k/v/o, SEQ_CLS), fp32 weights and AdamW are the stage's (lowlm.stages.finetune._classifier is
not used: it needs a run; AutoModelForSequenceClassification is loaded the same way).

Figures, for gradient checkpointing off and on (each in a fresh process): RSS (psutil) after
imports (the baseline), the growth after loading the classifier and LoRA, and for each L
(ascending) the peak growth during one forward + backward + optimizer step (sampled every
10 ms), beside its ratio to the fp32 weights' size. Peak RSS includes what the allocator kept
from earlier steps (glibc does not return every freed block), as the stage's own peak does.
"""

from __future__ import annotations

import argparse
import gc
import subprocess
import sys
from pathlib import Path

import psutil
import torch
from _bench_common import PeakRss, smollm2_folder

CACHE = Path.home() / ".cache" / "lowlm"


def rss_gb() -> float:
    return psutil.Process().memory_info().rss / 2**30


def one_step(model, optimizer, batch: int, length: int) -> float:
    """Peak RSS growth (GB over the step's start) of one training step of batch x length."""
    ids = torch.randint(100, 10000, (batch, length))
    labels = torch.randint(0, 4, (batch,))
    gc.collect()
    with PeakRss() as peak:
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return peak.peak / 2**30


def measure(folder: Path, batch: int, lengths: list[int], checkpointing: bool) -> None:
    """One process, one mode: load, LoRA, then a step per length (ascending, so memory the
    allocator kept from a shorter step never exceeds a longer step's own)."""
    from transformers import AutoModelForSequenceClassification

    from lowlm.config import LoraSection
    from lowlm.models.setup import apply_lora

    torch.manual_seed(0)
    start = rss_gb()
    model = AutoModelForSequenceClassification.from_pretrained(
        folder, num_labels=4, dtype=torch.float32
    )
    model.config.pad_token_id = model.config.eos_token_id
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    model = apply_lora(model, LoraSection(), task_type="SEQ_CLS")
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=2e-4)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    print(
        f"[gradient_checkpointing {'on' if checkpointing else 'off'}] after imports "
        f"{start:.2f} GB resident (the baseline); classifier + LoRA loaded: "
        f"+{rss_gb() - start:.2f} GB ({weights:.2f} GB of fp32 weights, memory-mapped until "
        f"touched; {sum(p.numel() for p in trainable) / 1e6:.1f}M trainable)",
        flush=True,
    )
    model.train()
    for length in sorted(lengths):
        peak = one_step(model, optimizer, batch, length) - start
        print(
            f"  step B={batch} L={length:<4}: peak +{peak:.2f} GB over the baseline "
            f"({peak / weights:.1f}x the weights); +{rss_gb() - start:.2f} GB resident after",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="An HF model folder (default: SmolLM2-135M).")
    parser.add_argument("--batch", type=int, default=8, help="finetune.batch_size (default 8).")
    parser.add_argument("--lengths", type=int, nargs="+", default=[32, 128, 256])
    parser.add_argument("--only", choices=["off", "on"], help=argparse.SUPPRESS)  # one child
    args = parser.parse_args()
    folder = args.model or smollm2_folder(CACHE)
    if args.only:
        measure(folder, args.batch, args.lengths, args.only == "on")
        return
    # Each mode in a fresh process: the allocator keeps what an earlier step freed.
    for mode in ("off", "on"):
        command = [sys.executable, __file__, "--only", mode, "--model", str(folder)]
        command += ["--batch", str(args.batch), "--lengths", *map(str, args.lengths)]
        subprocess.run(command, check=True, stderr=subprocess.DEVNULL)


if __name__ == "__main__":
    main()
