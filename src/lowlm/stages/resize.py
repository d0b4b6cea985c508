"""`lowlm resize`: give the base model rows for the merged tokenizer's new tokens.

Reads `model`, `resize` and the run's `tokenizer/`; writes `model-resized/` (HF model,
tokenizer, lowlm_model.json) and the held-out loss per character of the base and the
resized model in the manifest.
"""

from __future__ import annotations

from lowlm.config import LowlmConfig
from lowlm.errors import LowlmError
from lowlm.execute import StageRun, execute
from lowlm.graph import folder
from lowlm.models.load import (
    load_pretrained,
    load_tokenizer,
    resolve_load_dtype,
    save_whole_model,
)
from lowlm.models.metrics import heldout_lines, loss_per_char
from lowlm.models.resize import resize_embeddings
from lowlm.tokenization.base import resolve_base_tokenizer

STAGE = "resize"


def run(config: LowlmConfig, force: bool = False) -> dict:
    if not config.model.base:
        raise LowlmError(
            "model.base is not set; name the model to resize (HF id, folder or .gguf)."
        )
    return execute(config, STAGE, _work, force=force)


def _work(run: StageRun) -> dict:
    config = run.config
    tokenizer_folder = folder(config, "tokenize")
    tokenizer = load_tokenizer(tokenizer_folder)
    base_tokenizer = resolve_base_tokenizer(config.model).load_hf(config.model.trust_remote_code)
    model = load_pretrained(
        config.model.base, config.model.trust_remote_code, resolve_load_dtype(config.model.dtype)
    )
    lines = heldout_lines(tokenizer_folder, config.resize.eval_lines)
    before = loss_per_char(model, base_tokenizer, lines) if lines else None
    result = resize_embeddings(
        model,
        base_tokenizer,
        tokenizer,
        config.resize.init,
        config.resize.pad_to_multiple_of,
        config.run.seed,
    )
    after = loss_per_char(model, tokenizer, lines) if lines else None
    metrics = {
        "init": result.init,
        "old_rows": result.old_rows,
        "new_rows": result.new_rows,
        "new_tokens": len(result.new_token_ids),
        "tied": result.tied,
        **result.subword_counts,
        "heldout_loss_per_char_base": before,
        "heldout_loss_per_char_resized": after,
        "heldout_lines": len(lines),
    }
    new_ids = result.new_token_ids
    span = [new_ids[0], new_ids[-1] + 1] if new_ids else [len(tokenizer), len(tokenizer)]
    whole = {"base": config.model.base, "new_token_ids": span, "init": result.init}
    record = save_whole_model(run.folder, model, tokenizer, run.key, **whole)
    print(
        f"resize: {result.old_rows} -> {result.new_rows} rows ({len(result.new_token_ids)} new "
        f"tokens, init {result.init}, tied {result.tied}); held-out loss per character "
        f"{_fmt(before)} (base) -> {_fmt(after)} (resized); wrote {run.folder}"
    )
    return {"metrics": metrics, "record": record}


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
