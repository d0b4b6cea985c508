"""The model each pre-training stage trains, and which of its embedding rows train: stage 1
only the embedding matrices (optionally only the new tokens' rows), stage 2 LoRA with all, new
or no trainable embedding rows, full every weight."""

from __future__ import annotations

from pathlib import Path

import torch

from lowlm.config import LowlmConfig
from lowlm.errors import LowlmError
from lowlm.models.load import read_card, resolve_load_dtype
from lowlm.models.setup import apply_lora, load_for_training


def _embedding_module_names(model) -> tuple[str, str | None]:
    names = {id(m): n.split(".")[-1] for n, m in model.named_modules()}
    output = model.get_output_embeddings()
    return names[id(model.get_input_embeddings())], names.get(
        id(output)
    ) if output is not None else None


def _tied(model) -> bool:
    output = model.get_output_embeddings()
    return output is not None and output.weight is model.get_input_embeddings().weight


def _new_token_ids(parent: str, tokenizer) -> list[int]:
    card = read_card(Path(parent)) if Path(parent).is_dir() else None
    start, end = (card or {}).get("new_token_ids", [len(tokenizer), len(tokenizer)])
    return list(range(start, end))


def _prepare_stage1(model, new_ids: list[int], new_rows_only: bool):
    """Freeze everything but the embedding matrices; optionally mask the old rows' gradients."""
    for param in model.parameters():
        param.requires_grad_(False)
    # The modules, not their weights, are kept for the mask: FSDP2 (accelerator.prepare)
    # replaces the parameters of the same module objects with sharded ones.
    modules = [model.get_input_embeddings()]
    if not _tied(model) and model.get_output_embeddings() is not None:
        modules.append(model.get_output_embeddings())
    for module in modules:
        module.weight.requires_grad_(True)
    if not new_rows_only:
        return model, None
    if not new_ids:
        raise LowlmError("pretrain.stage1.new_rows_only is set but the model has no new rows.")
    first_new = new_ids[0]

    def mask_old_rows() -> None:
        for module in modules:
            grad = module.weight.grad
            if grad is None:
                continue
            if hasattr(grad, "to_local"):  # a DTensor sharded by rows: this rank's rows
                from torch.distributed.tensor._utils import (
                    compute_local_shape_and_global_offset,
                )

                _, offset = compute_local_shape_and_global_offset(
                    grad.shape, grad.device_mesh, grad.placements
                )
                grad.to_local()[: max(0, first_new - offset[0])] = 0
            else:
                grad[:first_new] = 0

    return model, mask_old_rows


def _prepare_stage2(model, config: LowlmConfig, new_ids: list[int], sharded: bool = False):
    cfg = config.pretrain.stage2
    input_name, output_name = _embedding_module_names(model)
    extra: dict = {}
    if sharded and _tied(model) and cfg.train_embeddings != "none":
        # peft's trainable-token wrapper hides the tie from accelerate's FSDP preparation,
        # which then fails on the shared weight.
        raise LowlmError(
            f"pretrain.stage2.train_embeddings: {cfg.train_embeddings} cannot run under FSDP on "
            "a model whose input and output embeddings are tied; set it to none, or launch "
            "without FSDP (DDP: configs/accelerate/multi-gpu.yaml)."
        )
    if cfg.train_embeddings == "new":
        if not new_ids:
            raise LowlmError(
                "pretrain.stage2.train_embeddings is 'new' (the default) but the model has no new "
                "rows (no merge before it); set it to none for LoRA alone, or all."
            )
        extra["trainable_token_indices"] = (
            {input_name: new_ids} if _tied(model) else {input_name: new_ids, output_name: new_ids}
        )
    elif cfg.train_embeddings == "all":
        if _tied(model):
            # modules_to_save would untie them (peft 0.21); trainable tokens keep the tie.
            rows = list(range(model.get_input_embeddings().weight.shape[0]))
            extra["trainable_token_indices"] = {input_name: rows}
        else:
            extra["modules_to_save"] = [input_name, output_name]
    return apply_lora(model, cfg.lora, **extra)


def pretrain_model(config: LowlmConfig, stage: str, parent: str, tokenizer, sharded: bool):
    """The parent loaded and prepared for pretrain stage `stage` ('1', '2' or 'full'; `sharded`:
    under FSDP): (model, after_backward hook, new token ids)."""
    cfg = config.pretrain
    dtype = torch.float32 if stage == "full" else resolve_load_dtype(config.model.dtype)
    # An adapter parent is folded in first; stage 2 may load the base quantized (QLoRA).
    quantize = cfg.stage2.quantize_base if stage == "2" else "none"
    model = load_for_training(parent, config.model, tokenizer, quantize, dtype)
    new_ids = _new_token_ids(parent, tokenizer)
    after_backward = None
    if stage == "1":
        model, after_backward = _prepare_stage1(model, new_ids, cfg.stage1.new_rows_only)
    elif stage == "2":
        model = _prepare_stage2(model, config, new_ids, sharded)
    else:  # every weight trains (a merged adapter parent leaves them frozen)
        for param in model.parameters():
            param.requires_grad_(True)
    return model, after_backward, new_ids
