"""`lowlm export`: a standalone HF model (LoRA merged in) with its tokenizer.

Reads the run's newest trained model (stage 2 adapter, full model, stage 1 embeddings,
or the resized / initialised model); writes `export/`. Merged and adapter logits are
compared on held-out text and the export fails above `export.tolerance`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lowlm.config import LowlmConfig
from lowlm.errors import LowlmError
from lowlm.execute import StageRun, execute
from lowlm.graph import tokenizer_folder
from lowlm.models.load import (
    check_vocab,
    load_model,
    load_tokenizer,
    read_card,
    resolve_load_dtype,
    save_whole_model,
    tokenizer_hash,
)
from lowlm.models.metrics import heldout_lines

STAGE = "export"
CHECK_TOKENS = 128


def _check_texts(config: LowlmConfig, tokenizer, count: int) -> list[list[int]]:
    lines = heldout_lines(tokenizer_folder(config), count) or ["The quick brown fox."]
    return [
        tokenizer(line, truncation=True, max_length=CHECK_TOKENS)["input_ids"] for line in lines
    ]


@torch.no_grad()
def _logits(model, sequences: list[list[int]]) -> list[torch.Tensor]:
    model.eval()
    return [model(input_ids=torch.tensor([ids])).logits.float() for ids in sequences if ids]


def run(config: LowlmConfig, source: str | None = None, force: bool = False) -> dict:
    return execute(config, STAGE, _work, force=force, override=source)


def _work(run: StageRun) -> dict:
    config = run.config
    folder_in = Path(run.plan.model) if run.plan.model else None
    if folder_in is None or not folder_in.exists():
        raise LowlmError(
            "there is no model to export; configure and run `lowlm pretrain` (or resize / init)."
        )
    card = read_card(folder_in)
    if card is None:
        raise LowlmError(
            f"{folder_in} has no lowlm_model.json; export works on models lowlm wrote."
        )
    tokenizer = load_tokenizer(folder_in)
    if tokenizer_hash(folder_in) != card["tokenizer_hash"] or len(tokenizer) != card["vocab_size"]:
        raise LowlmError(
            f"the tokenizer in {folder_in} (hash {tokenizer_hash(folder_in)[:12]}, "
            f"{len(tokenizer)} tokens) is not the one the model was saved with (hash "
            f"{card['tokenizer_hash'][:12]}, {card['vocab_size']} tokens); rerun the stage."
        )
    model = load_model(folder_in, config.model.trust_remote_code, torch.float32)
    check_vocab(model, tokenizer, str(folder_in))
    sequences = _check_texts(config, tokenizer, config.export.check_sequences)
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
    record = save_whole_model(
        run.folder,
        model,
        tokenizer,
        run.key,
        exported_from=str(folder_in),
        max_logit_diff=max_diff,
        new_token_ids=card.get("new_token_ids"),
    )
    metrics = {
        "source": str(folder_in),
        "max_logit_diff": max_diff,
        "checked_sequences": len(sequences),
        "dtype": str(model.dtype).replace("torch.", ""),
    }
    print(
        f"export: {folder_in.name} -> {run.folder} (merged vs adapter max |logit diff| "
        f"{max_diff:.2e} on {len(sequences)} held-out sequences)"
    )
    return {"metrics": metrics, "record": record}
