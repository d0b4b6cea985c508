"""`lowlm export`: a standalone HF model (LoRA merged in) with its tokenizer.

Reads the run's newest trained model (stage 2 adapter, full model, stage 1 embeddings,
or the resized / initialised model); writes `export/`. Merged and adapter logits are
compared on held-out text and the export fails above `export.tolerance`.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from lowlm.config import LowlmConfig
from lowlm.errors import LowlmError
from lowlm.models.load import (
    check_vocab,
    load_model,
    load_tokenizer,
    read_card,
    resolve_load_dtype,
    save_model_folder,
    tokenizer_hash,
)
from lowlm.rundir import RunDir, atomic_dir, fingerprint, sha256_dir

STAGE = "export"
SOURCES = ["pretrain-full", "pretrain-stage2", "pretrain-stage1", "resize", "init"]
CHECK_TOKENS = 128


def _check_texts(run_dir: RunDir, tokenizer, count: int) -> list[list[int]]:
    path = run_dir.folder("tokenize") / "heldout.txt"
    lines = path.read_text(encoding="utf-8").split("\n") if path.exists() else []
    lines = [line for line in lines if line.strip()][:count] or ["The quick brown fox."]
    return [
        tokenizer(line, truncation=True, max_length=CHECK_TOKENS)["input_ids"] for line in lines
    ]


@torch.no_grad()
def _logits(model, sequences: list[list[int]]) -> list[torch.Tensor]:
    model.eval()
    return [model(input_ids=torch.tensor([ids])).logits.float() for ids in sequences if ids]


def run(config: LowlmConfig, source: str | None = None, force: bool = False) -> dict:
    run_dir = RunDir(config)
    folder = Path(source) if source else run_dir.newest(SOURCES)
    if folder is None or not folder.exists():
        raise LowlmError(
            "there is no model to export; run `lowlm pretrain` (or resize / init) first."
        )
    card = read_card(folder)
    if card is None:
        raise LowlmError(f"{folder} has no lowlm_model.json; export works on models lowlm wrote.")
    inputs = {"source": str(folder), "source_hash": sha256_dir(folder)}
    key = fingerprint(config.export.model_dump(), config.model.dtype, inputs)
    if run_dir.skip_done(STAGE, key, force):
        return run_dir.stage_record(STAGE)["metrics"]

    started = time.time()
    with run_dir.recording(STAGE, inputs, key):
        tokenizer = load_tokenizer(folder)
        if tokenizer_hash(folder) != card["tokenizer_hash"] or len(tokenizer) != card["vocab_size"]:
            raise LowlmError(
                f"the tokenizer in {folder} (hash {tokenizer_hash(folder)[:12]}, {len(tokenizer)} "
                f"tokens) is not the one the model was saved with (hash "
                f"{card['tokenizer_hash'][:12]}, {card['vocab_size']} tokens); rerun the stage."
            )
        model = load_model(folder, config.model.trust_remote_code, torch.float32)
        check_vocab(model, tokenizer, str(folder))
        sequences = _check_texts(run_dir, tokenizer, config.export.check_sequences)
        max_diff = 0.0
        if hasattr(model, "merge_and_unload"):
            before = _logits(model, sequences)
            model = model.merge_and_unload()
            after = _logits(model, sequences)
            max_diff = max((a - b).abs().max().item() for a, b in zip(before, after, strict=True))
            if not max_diff <= config.export.tolerance:
                raise LowlmError(
                    f"merged and adapter logits differ by up to {max_diff:.3g} (tolerance "
                    f"{config.export.tolerance}); the merge is not faithful, nothing was written."
                )
        model = model.to(resolve_load_dtype(config.model.dtype))
        with atomic_dir(run_dir.folder(STAGE)) as out:
            saved = save_model_folder(
                model,
                tokenizer,
                out,
                "model",
                None,
                exported_from=str(folder),
                max_logit_diff=max_diff,
                new_token_ids=card.get("new_token_ids"),
            )
    metrics = {
        "source": str(folder),
        "max_logit_diff": max_diff,
        "checked_sequences": len(sequences),
        "dtype": str(model.dtype).replace("torch.", ""),
    }
    run_dir.finish_model(STAGE, saved, metrics, started)
    print(
        f"export: {folder.name} -> {run_dir.folder(STAGE)} (merged vs adapter max |logit diff| "
        f"{max_diff:.2e} on {len(sequences)} held-out sequences)"
    )
    return metrics
