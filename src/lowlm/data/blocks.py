"""Tokenise a corpus once into memory-mapped shards of packed `block_size` blocks.

The cache folder is named by a content key (tokenizer hash, block size, input file
hashes, reading options, held-out rule), so a changed input, tokenizer or block size
never reuses a stale cache (a cache keyed by file name once reused another block size).
Building streams in bounded memory: documents are tokenised in batches, EOS-separated,
and written in shards; `progress.json` records the documents consumed after every shard,
so an interrupted build resumes there. The cache is complete when `meta.json` exists.
"""

from __future__ import annotations

import io
import json
from collections import deque
from collections.abc import Iterator
from multiprocessing import Pool
from pathlib import Path

import numpy as np

from lowlm.config import DataConfig
from lowlm.data.corpus import Source, iter_documents
from lowlm.data.heldout import is_held_out
from lowlm.errors import LowlmError
from lowlm.rundir import atomic_write_bytes, atomic_write_json, fingerprint

DOCS_PER_BATCH = 256
CACHE_FORMAT = 3  # part of the key: a change of layout never reuses an old cache
SHARD_BLOCKS = 4096
PLAIN_SUFFIXES = {".txt", ".text", ".md"}  # a document per line: the file size is the text's


def cache_key(
    tokenizer_hash: str, block_size: int, inputs: dict[str, str], data: DataConfig, seed: int
) -> str:
    """Tokenizer, block size, input contents, reading options and the held-out rule."""
    parts = (CACHE_FORMAT, tokenizer_hash, block_size, inputs, data.model_dump())
    return fingerprint(*parts, seed)[:20]


_worker: dict = {}


def _init_worker(tokenizer_folder: str, seed: int, heldout_fraction: float) -> None:
    from transformers import AutoTokenizer

    _worker.update(
        tokenizer=AutoTokenizer.from_pretrained(tokenizer_folder),
        seed=seed,
        heldout_fraction=heldout_fraction,
    )


def _encode(batch: list[str]) -> list[tuple[bool, list[int]]]:
    """(held out?, token ids) for each document of a batch (lowlm.data.heldout), with BOS when
    the tokenizer adds it (as at inference); EOS is appended by the packer."""
    ids = _worker["tokenizer"](batch, add_special_tokens=True)["input_ids"]
    return [
        (is_held_out(doc, _worker["seed"], _worker["heldout_fraction"]), row)
        for doc, row in zip(batch, ids, strict=True)
    ]


class _Packer:
    """Accumulates EOS-separated token streams and writes full blocks as shards."""

    def __init__(
        self, folder: Path, prefix: str, block_size: int, dtype, carry: list[int], shards: int
    ):
        self.folder, self.prefix, self.block_size, self.dtype = folder, prefix, block_size, dtype
        self.buffer: list[int] = list(carry)
        self.shards = shards

    def add(self, ids: list[int]) -> None:
        self.buffer.extend(ids)

    def flush(self, final: bool = False) -> None:
        full = len(self.buffer) // self.block_size
        while full >= SHARD_BLOCKS or (final and full > 0):
            take = min(full, SHARD_BLOCKS) * self.block_size
            array = np.asarray(self.buffer[:take], dtype=self.dtype)
            atomic_write_bytes(
                self.folder / f"{self.prefix}-{self.shards:05d}.bin", array.tobytes()
            )
            self.buffer = self.buffer[take:]
            self.shards += 1
            full = len(self.buffer) // self.block_size


def _progress_bar(sources: list[Source]):
    """Bytes read, with rate and ETA: the total is known when every source is a plain text
    file (other formats' sizes are not their text's); otherwise bytes and rate alone."""
    from tqdm.auto import tqdm

    plain = all(s.path is not None and s.path.suffix in PLAIN_SUFFIXES for s in sources)
    total = sum(s.path.stat().st_size for s in sources) if plain else None
    return tqdm(
        total=total,
        desc="reading and packing the corpus",
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        dynamic_ncols=True,
    )


def build_cache(
    folder: Path,
    tokenizer_folder: Path,
    sources: list[Source],
    data: DataConfig,
    block_size: int,
    seed: int,
    num_proc: int = 1,
) -> dict:
    """Build (or finish building) the cache in `folder`; returns its meta."""
    from transformers import AutoTokenizer

    meta_path = folder / "meta.json"
    if meta_path.exists():
        return json.loads(meta_path.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise LowlmError(
            f"the tokenizer in {tokenizer_folder} has no EOS token to separate documents."
        )
    dtype = np.uint16 if len(tokenizer) <= 65535 else np.uint32
    progress_path = folder / "progress.json"
    progress = (
        json.loads(progress_path.read_text())
        if progress_path.exists()
        else {
            "documents": 0,
            "shards": {"train": 0, "eval": 0},
        }
    )
    packers = {
        split: _Packer(
            folder,
            split,
            block_size,
            dtype,
            _load_carry(folder, split, progress),
            progress["shards"][split],
        )
        for split in ("train", "eval")
    }

    # Bytes read per batch, in order: the bar advances as batches come back encoded (imap
    # reads ahead of the workers, so counting where documents are read would run ahead).
    batch_bytes: deque[int] = deque()

    def batches() -> Iterator[list[str]]:
        batch: list[str] = []
        size = 0
        for index, document in enumerate(iter_documents(sources, data)):
            size += len(document.encode("utf-8")) + 1
            if index < progress["documents"]:
                continue  # consumed before the interruption
            batch.append(document)
            if len(batch) == DOCS_PER_BATCH:
                batch_bytes.append(size)
                yield batch
                batch, size = [], 0
        if batch:
            batch_bytes.append(size)
            yield batch

    worker_args = (str(tokenizer_folder), seed, data.heldout_fraction)
    pool = Pool(num_proc, _init_worker, worker_args) if num_proc > 1 else None
    if pool is None:
        _init_worker(*worker_args)
    bar = _progress_bar(sources)
    try:
        encoded = pool.imap(_encode, batches()) if pool else map(_encode, batches())
        documents = progress["documents"]
        for rows in encoded:
            bar.update(batch_bytes.popleft() if batch_bytes else 0)
            for held_out, row in rows:
                if row and row[-1] == eos:  # tokenizers that add EOS themselves
                    row = row[:-1]
                packers["eval" if held_out else "train"].add([*row, eos])
            documents += len(rows)
            before = packers["train"].shards + packers["eval"].shards
            for packer in packers.values():
                packer.flush()
            if packers["train"].shards + packers["eval"].shards != before:
                _save_progress(progress_path, documents, packers)
        if bar.total and bar.n < bar.total:
            bar.update(bar.total - bar.n)  # lines filtered out or stripped were read too
    finally:
        bar.close()
        if pool:
            pool.close()
            pool.join()
    for packer in packers.values():
        packer.flush(final=True)
    train_blocks = _count_blocks(folder, "train", block_size, dtype)
    eval_blocks = _count_blocks(folder, "eval", block_size, dtype)
    if train_blocks == 0:
        raise LowlmError(
            f"the corpus gives fewer than {block_size} tokens for training; add text or lower "
            "pretrain.block_size."
        )
    meta = {
        "block_size": block_size,
        "dtype": np.dtype(dtype).name,
        "train_blocks": train_blocks,
        "eval_blocks": eval_blocks,
        "documents": documents,
        "vocab_size": len(tokenizer),
    }
    atomic_write_json(meta_path, meta)
    progress_path.unlink(missing_ok=True)
    for carry in folder.glob("carry-*.npy"):
        carry.unlink()
    return meta


def _save_progress(path: Path, documents: int, packers: dict) -> None:
    """Record the tokens not yet in a shard, then the documents consumed (the commit point)."""
    for split, packer in packers.items():
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(packer.buffer, dtype=np.int64))
        atomic_write_bytes(path.parent / f"carry-{split}-{documents}.npy", buffer.getvalue())
    shards = {split: p.shards for split, p in packers.items()}
    atomic_write_json(path, {"documents": documents, "shards": shards})
    for old in path.parent.glob("carry-*.npy"):
        if not old.name.endswith(f"-{documents}.npy"):
            old.unlink()


def _load_carry(folder: Path, split: str, progress: dict) -> list[int]:
    if not progress["documents"]:
        return []
    return np.load(folder / f"carry-{split}-{progress['documents']}.npy").tolist()


def _count_blocks(folder: Path, split: str, block_size: int, dtype) -> int:
    itemsize = np.dtype(dtype).itemsize
    return sum(p.stat().st_size // (itemsize * block_size) for p in folder.glob(f"{split}-*.bin"))


class BlockDataset:
    """Random access to the packed blocks of one split, memory-mapped."""

    def __init__(self, folder: Path, split: str):
        meta = json.loads((folder / "meta.json").read_text())
        self.block_size = meta["block_size"]
        dtype = np.dtype(meta["dtype"])
        self.shards = [
            np.memmap(p, dtype=dtype, mode="r").reshape(-1, self.block_size)
            for p in sorted(folder.glob(f"{split}-*.bin"))
        ]
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> np.ndarray:
        shard = int(np.searchsorted(self.offsets, index, side="right") - 1)
        return np.asarray(self.shards[shard][index - self.offsets[shard]], dtype=np.int64)
