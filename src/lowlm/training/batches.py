"""Right-padding of unequal rows into one batch: the one place every collate pads."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def right_pad(rows: Sequence[Sequence[int]], fill: int, width: int | None = None) -> np.ndarray:
    """The rows as one int64 array of `width` columns (default: the longest row's length),
    each row followed by `fill` (a pad id, or -100 for labels) up to that width."""
    width = max(len(row) for row in rows) if width is None else width
    padded = np.full((len(rows), width), fill, dtype=np.int64)
    for index, row in enumerate(rows):
        padded[index, : len(row)] = row
    return padded


def padding_mask(rows: Sequence[Sequence[int]], width: int | None = None) -> np.ndarray:
    """The attention mask of `right_pad(rows, ...)`: 1 on each row's own tokens, 0 after."""
    return right_pad([np.ones(len(row), dtype=np.int64) for row in rows], 0, width)
