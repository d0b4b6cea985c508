"""Where the memory of `lowlm finetune` on a small model goes: resident memory after each step of
what the stage does (load the classifier, wrap it in LoRA, one training step of a batch of B
sequences of L tokens, with and without gradient checkpointing), measured in one process.

    .venv/bin/python scripts/bench_finetune_memory.py                   # SmolLM2-135M, B=8
    .venv/bin/python scripts/bench_finetune_memory.py --lengths 32 256 --batch 8

Model: SmolLM2-135M as a dense HF folder (~/.cache/lowlm/smollm2-135m-hf, made once from the
asset GGUF), or --model FOLDER. The classifier, LoRA (finetune's defaults: r 64, alpha 128,
q/k/v/o, SEQ_CLS), fp32 weights and AdamW are the stage's (lowlm.stages.finetune._classifier is
not used: it needs a run; AutoModelForSequenceClassification is loaded the same way).

Figures: RSS of the process (psutil) after imports (the baseline), the growth over it after
loading and after LoRA, and for each L the peak growth during one forward + backward +
optimizer step (sampled every 10 ms), printed beside the ratio to the loaded model's growth.
Peak RSS includes what the allocator keeps after earlier steps (glibc does not return every
freed block), as the stage's own peak does.
"""

from __future__ import annotations

import argparse
import gc
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="An HF model folder (default: SmolLM2-135M).")
    parser.add_argument("--batch", type=int, default=8, help="finetune.batch_size (default 8).")
    parser.add_argument("--lengths", type=int, nargs="+", default=[32, 128, 256])
    args = parser.parse_args()
    folder = args.model or smollm2_folder(CACHE)
    from transformers import AutoModelForSequenceClassification

    from lowlm.config import LoraSection
    from lowlm.training.session import apply_lora

    torch.manual_seed(0)
    start = rss_gb()
    print(f"after imports: {start:.2f} GB resident (the baseline)")
    model = AutoModelForSequenceClassification.from_pretrained(
        folder, num_labels=4, dtype=torch.float32
    )
    model.config.pad_token_id = model.config.eos_token_id
    loaded = rss_gb() - start
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    print(f"classifier loaded: +{loaded:.2f} GB ({weights:.2f} GB of fp32 weights)")
    model = apply_lora(model, LoraSection(), task_type="SEQ_CLS")
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=2e-4)
    print(
        f"LoRA applied: +{rss_gb() - start:.2f} GB; "
        f"{sum(p.numel() for p in trainable) / 1e6:.1f}M trainable"
    )
    model.train()
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        for length in args.lengths:
            peak = one_step(model, optimizer, args.batch, length) - start
            switch = "on " if checkpointing else "off"
            print(
                f"step B={args.batch} L={length:<4} checkpointing={switch}"
                f": peak +{peak:.2f} GB over the baseline ({peak / loaded:.1f}x the loaded model);"
                f" {rss_gb() - start:+.2f} GB resident after it"
            )


if __name__ == "__main__":
    main()
