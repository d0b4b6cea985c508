"""Reading a finished cache: random access to one split's packed blocks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


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
