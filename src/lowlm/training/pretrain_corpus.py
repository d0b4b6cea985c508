"""What a pre-training stage reads: its corpus packed into the content-keyed block cache with
the tokenizer its parent model was built for, and the texts it scores before and after."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from lowlm.config import LowlmConfig
from lowlm.data.blocks import BlockDataset, build_cache, cache_key
from lowlm.data.corpus import iter_documents, read_lines, resolve_sources
from lowlm.data.heldout import heldout_document_lines
from lowlm.errors import LowlmError
from lowlm.graph import corpus_patterns, tokenizer_folder
from lowlm.models.load import load_tokenizer, read_card, tokenizer_hash
from lowlm.models.metrics import heldout_lines
from lowlm.tokenization.base import resolve_base_tokenizer
from lowlm.training.loop import document_positions

if TYPE_CHECKING:
    from lowlm.execute import StageRun


class Blocks:
    """Packed blocks as training examples: labels are the inputs (the model shifts them).
    With `eos` (pretrain.isolate_documents), each block also carries position ids that
    restart after every EOS, so that its documents are kept apart."""

    def __init__(self, blocks: BlockDataset, eos: int | None = None):
        self.blocks, self.eos = blocks, eos

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict:
        ids = self.blocks[index]
        if self.eos is None:
            return {"input_ids": ids, "labels": ids}
        positions, labels = document_positions(ids, ids, self.eos)
        return {"input_ids": ids, "labels": labels, "position_ids": positions}


def pretrain_tokenizer_folder(config: LowlmConfig, parent: str) -> Path:
    """The run's tokenizer, else the parent's, else the base's (hub ids and .gguf included)."""
    run_tokenizer = tokenizer_folder(config)
    if run_tokenizer is not None and (run_tokenizer / "tokenizer.json").exists():
        return run_tokenizer
    if (Path(parent) / "tokenizer.json").exists():
        return Path(parent)
    if config.model.base or config.model.tokenizer:
        base = resolve_base_tokenizer(config.model)
        if base.folder is not None and (base.folder / "tokenizer.json").exists():
            return base.folder
    raise LowlmError(
        "no tokenizer found for pre-training; run `lowlm tokenize` first, or set model.base "
        "to a model that ships a tokenizer.json."
    )


def packed_corpus(run: StageRun, parent: str, name: str, accelerator):
    """(corpus sources, tokenizer, training blocks, held-out blocks or None): the corpus packed
    into the content-keyed cache (built, or reused when its key matches) with the tokenizer
    the parent model was built for."""
    config, cfg = run.config, run.config.pretrain
    tokenizer_dir = pretrain_tokenizer_folder(config, parent)
    corpus_hashes = {
        label.removeprefix("corpus:"): value
        for label, value in run.plan.inputs.items()
        if label.startswith("corpus:")
    }
    if not corpus_hashes and "parent:prepare" in run.plan.inputs:  # the prepared corpus
        corpus_hashes = {"prepare": run.plan.inputs["parent:prepare"]}
    field = (
        "pretrain.corpus" if cfg.corpus else "tokenize.corpus" if config.tokenize.corpus else None
    )
    sources = resolve_sources(corpus_patterns(config, "pretrain"), field or "prepare's corpus/")
    tokenizer_id = tokenizer_hash(tokenizer_dir)
    parent_card = read_card(Path(parent)) if Path(parent).is_dir() else None
    if parent_card is not None and parent_card["tokenizer_hash"] != tokenizer_id:
        raise LowlmError(
            f"{parent} was built for another tokenizer (hash {parent_card['tokenizer_hash'][:12]}) "
            f"than the run's {tokenizer_dir} (hash {tokenizer_id[:12]}); rerun "
            "`lowlm resize` or `lowlm init` after `lowlm tokenize`."
        )
    corpus_key = cache_key(
        tokenizer_id, cfg.block_size, corpus_hashes, config.data, config.run.seed
    )
    cache = run.run_dir.path / "cache" / f"blocks-{corpus_key}"
    # Every rank calls it: over several processes each encodes a share of the corpus (and
    # ranks on several nodes need the run directory on a filesystem they all share).
    meta = build_cache(
        cache,
        tokenizer_dir,
        sources,
        config.data,
        cfg.block_size,
        config.run.seed,
        cfg.num_proc,
    )
    accelerator.print(
        f"{name}: {meta['train_blocks']} training blocks of {cfg.block_size} tokens and "
        f"{meta['eval_blocks']} held-out ones in {cache}"
    )
    accelerator.wait_for_everyone()
    tokenizer = load_tokenizer(tokenizer_dir)
    eos = tokenizer.eos_token_id if cfg.isolate_documents else None
    train_data = Blocks(BlockDataset(cache, "train"), eos)
    eval_blocks = BlockDataset(cache, "eval")
    eval_data = Blocks(eval_blocks, eos) if len(eval_blocks) else None
    return sources, tokenizer, train_data, eval_data


def scored_texts(config: LowlmConfig, sources) -> dict[str, list[str]]:
    """What each stage scores before and after training: the run's held-out lines (a run
    without a tokenize stage takes them from its corpus by the same rule) and up to
    eval_lines of each tokenize.eval_texts file (the base language's drift)."""
    limit = config.pretrain.eval_lines
    lines = heldout_lines(tokenizer_folder(config), limit)
    if not lines and tokenizer_folder(config) is None and limit and config.data.heldout_fraction:
        lines = heldout_document_lines(
            iter_documents(sources, config.data),
            config.run.seed,
            config.data.heldout_fraction,
            min(limit, config.tokenize.holdout_lines),
        )
    texts = {"heldout": lines} if lines else {}
    for label, path in config.tokenize.eval_texts.items():
        if not Path(path).is_file():
            raise LowlmError(f"tokenize.eval_texts.{label}: file '{path}' does not exist.")
        texts[label] = read_lines(path, config.data)[:limit]
    return texts
