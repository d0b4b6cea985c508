"""Which process this is, under `accelerate launch` / `torchrun` or alone: one answer for the
whole package (a training stage's accelerator gives the same one)."""

from __future__ import annotations

import os


def is_main_process() -> bool:
    """Rank 0 of a launch, or the only process: the one that prints and writes for the run.
    Read from the launcher's RANK, so the CLI answers before importing torch."""
    return os.environ.get("RANK", "0") == "0"


def launched_state():
    """accelerate's PartialState when launched with several processes, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())
