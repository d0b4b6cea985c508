"""The cache's files: shards of packed blocks, the progress of a build, its carry, and the
parts ranks exchange in a build over several processes."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np

from lowlm.data.blocks.encoder import EncoderPlan
from lowlm.data.blocks.options import MISMATCH_FILE
from lowlm.rundir import atomic_write_bytes, atomic_write_json

SPLITS = ("train", "eval")


class Packer:
    """Accumulates EOS-separated token arrays and writes full blocks as shards."""

    def __init__(
        self,
        folder: Path,
        prefix: str,
        block_size: int,
        dtype,
        carry: np.ndarray,
        shards: int,
        shard_blocks: int,
    ):
        self.folder, self.prefix, self.block_size, self.dtype = folder, prefix, block_size, dtype
        self.chunks: list[np.ndarray] = [carry.astype(dtype)] if len(carry) else []
        self.size = len(carry)
        self.shards, self.shard_blocks = shards, shard_blocks

    @property
    def buffer(self) -> np.ndarray:
        """The tokens not yet in a shard (kept as one array from now on)."""
        if len(self.chunks) != 1:
            whole = np.concatenate(self.chunks) if self.chunks else np.zeros(0, self.dtype)
            self.chunks = [whole]
        return self.chunks[0]

    def add(self, ids: np.ndarray) -> None:
        if len(ids):
            self.chunks.append(ids)
            self.size += len(ids)

    def flush(self, final: bool = False) -> None:
        full = self.size // self.block_size
        if not (full >= self.shard_blocks or (final and full > 0)):
            return
        tokens = self.buffer
        start = 0
        while full >= self.shard_blocks or (final and full > 0):
            take = min(full, self.shard_blocks) * self.block_size
            atomic_write_bytes(
                self.folder / f"{self.prefix}-{self.shards:05d}.bin",
                memoryview(tokens[start : start + take]),  # written as it is, not copied
            )
            start += take
            self.shards += 1
            full = (len(tokens) - start) // self.block_size
        rest = tokens[start:].copy()  # a copy: the shard's tokens are freed
        self.chunks = [rest] if len(rest) else []
        self.size = len(rest)


def packers(
    folder: Path, block_size: int, dtype, progress: dict, shard_blocks: int
) -> dict[str, Packer]:
    """The two splits' packers, holding the tokens an interrupted build left unsharded."""
    return {
        split: Packer(
            folder,
            split,
            block_size,
            dtype,
            load_carry(folder, split, progress),
            progress["shards"][split],
            shard_blocks,
        )
        for split in SPLITS
    }


def pack(
    packers: dict[str, Packer],
    train: np.ndarray,
    held_out: np.ndarray,
    documents: int,
    progress_path: Path,
) -> bool:
    """Add the ids of documents up to `documents` and write the full shards; whether
    progress.json moved (it records `documents` whenever a shard was written)."""
    packers["train"].add(train)
    packers["eval"].add(held_out)
    before = sum(packer.shards for packer in packers.values())
    for packer in packers.values():
        packer.flush()
    if sum(packer.shards for packer in packers.values()) == before:
        return False
    save_progress(progress_path, documents, packers)
    return True


def read_progress(folder: Path) -> dict:
    """The documents consumed and shards written before an interruption (none: zeros)."""
    path = folder / "progress.json"
    if path.exists():
        return json.loads(path.read_text())
    return {"documents": 0, "shards": dict.fromkeys(SPLITS, 0)}


def save_progress(path: Path, documents: int, packers: dict) -> None:
    """Record the tokens not yet in a shard, then the documents consumed (the commit point)."""
    for split, packer in packers.items():
        buffer = io.BytesIO()
        np.save(buffer, packer.buffer)  # in the cache's dtype
        atomic_write_bytes(path.parent / f"carry-{split}-{documents}.npy", buffer.getbuffer())
    shards = {split: p.shards for split, p in packers.items()}
    atomic_write_json(path, {"documents": documents, "shards": shards})
    for old in path.parent.glob("carry-*.npy"):
        if not old.name.endswith(f"-{documents}.npy"):
            old.unlink()


def load_carry(folder: Path, split: str, progress: dict) -> np.ndarray:
    if not progress["documents"]:
        return np.zeros(0, dtype=np.int64)
    return np.load(folder / f"carry-{split}-{progress['documents']}.npy")


def count_blocks(folder: Path, split: str, block_size: int, dtype) -> int:
    itemsize = np.dtype(dtype).itemsize
    return sum(p.stat().st_size // (itemsize * block_size) for p in folder.glob(f"{split}-*.bin"))


def remove_build_leftovers(folder: Path) -> None:
    """What only an unfinished build needs: progress, carry, parts."""
    (folder / "progress.json").unlink(missing_ok=True)
    for carry in folder.glob("carry-*.npy"):
        carry.unlink()
    for parts in folder.glob("parts-*"):
        shutil.rmtree(parts, ignore_errors=True)


def discard(folder: Path, plan: EncoderPlan, message: str) -> None:
    """After a mismatch: no shard of this build stays, and the next build uses HF."""
    for pattern in ("train-*.bin", "eval-*.bin"):
        for path in folder.glob(pattern):
            path.unlink()
    remove_build_leftovers(folder)
    atomic_write_json(folder / MISMATCH_FILE, {"message": message, "plan_reason": plan.reason})


def part_path(parts: Path, first: int) -> Path:
    return parts / f"part-{first:012d}.npz"


def write_part(
    path: Path, documents: int, train: list[np.ndarray], held_out: list[np.ndarray], dtype
) -> None:
    """One part: its documents' EOS-separated ids, per split (written whole or not at all)."""
    buffer = io.BytesIO()
    empty = np.zeros(0, dtype)
    np.savez(
        buffer,
        documents=np.array(documents, dtype=np.int64),
        train=np.concatenate(train) if train else empty,
        eval=np.concatenate(held_out) if held_out else empty,
    )
    atomic_write_bytes(path, buffer.getbuffer())


def leave_stop(stop: Path, rank: int, batch: int) -> None:
    """Tell the other ranks to stop (batch: where a mismatch was found, -1 for an error)."""
    with contextlib.suppress(OSError):
        atomic_write_json(stop, {"rank": rank, "batch": batch})


def stopped_before(stop: Path, index: int) -> bool:
    """Whether a rank failed, with an error or at a batch before `index` (this rank's next
    ones could hold no earlier mismatch; before it, they could: the first one must be met)."""
    if not stop.exists():
        return False
    try:
        batch = json.loads(stop.read_text())["batch"]
    except (OSError, ValueError, KeyError):
        return True
    return batch < 0 or batch <= index
