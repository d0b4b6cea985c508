"""The numeric guard: an optimizer step whose loss or gradient norm is non-finite on any rank
is skipped by every rank, and too many in a row stop the stage. Decided on the device where
the fused AdamW takes a `found_inf` flag (the host then reads nothing until the next logging
step), on the host under fp16's GradScaler or without a fused kernel."""

from __future__ import annotations

from pathlib import Path

import torch

from lowlm.errors import LowlmError
from lowlm.training.checkpoint import latest_checkpoint

UPDATED, SKIPPED, OVERFLOW = 0, 1, 2  # what an optimizer step did


def fused_adamw_available(accelerator) -> bool:
    """torch's fused AdamW, where the device has the kernel: one kernel per parameter group
    (on CPU about 4x faster than the foreach one), and it takes a `found_inf` flag that skips
    the update on the device."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        devices = _get_fused_kernels_supported_devices()
    except ImportError:  # a private helper: fall back to the devices every release supports
        devices = ["cpu", "cuda"]
    return accelerator.device.type in devices


def guarded_update(
    optimizer, scheduler, scaler, on_device: bool, bad_losses, bad_norms
) -> torch.Tensor:
    """Step the optimizer and schedule unless the step is non-finite; the outcome (UPDATED,
    SKIPPED or OVERFLOW) as a tensor. On the device, the schedule advances on a skipped step
    too (the lr follows the step number)."""
    if on_device:
        outcome = ((bad_losses + bad_norms) > 0).long() * SKIPPED
        getattr(optimizer, "optimizer", optimizer).found_inf = outcome.float()
        optimizer.step()
        scheduler.step()
        return outcome
    bad_loss, bad_norm = torch.stack([bad_losses, bad_norms]).tolist()  # a host sync
    if bad_loss == 0 and bad_norm > 0 and scaler is not None:
        # fp16 loss scaling overflowed. The wrapped optimizer's step lets the
        # GradScaler skip the update and lower the scale.
        optimizer.step()
        return torch.tensor(OVERFLOW)
    if bad_loss > 0 or bad_norm > 0:  # weights and optimizer state stay as they were
        return torch.tensor(SKIPPED)
    optimizer.step()
    scheduler.step()
    return torch.tensor(UPDATED)


class StepOutcomes:
    """What the optimizer steps did, kept on the device and read back in one host sync at
    logging and checkpoint steps (every step where the guard runs on the host).

    Each step records its outcome, its loss (the mean over ranks) and its tokens; `read` turns
    them into the window's figures, logs a line per skipped step, and stops the stage when
    max_skipped_steps steps in a row were skipped."""

    def __init__(self, device, max_skipped: int, folder: Path, logger, skipped: int):
        # loss, tokens, updated steps, token-positions attended; float64 keeps a window's
        # token count exact past 2**24
        wide = torch.float32 if torch.device(device).type == "mps" else torch.float64
        self.sums = torch.zeros(4, device=device, dtype=wide)
        self.pending: list[tuple[int, torch.Tensor]] = []
        self.max_skipped, self.folder, self.logger = max_skipped, folder, logger
        self.skipped, self.in_a_row, self.overflows = skipped, 0, 0
        self.tokens_seen = 0
        self.window_loss, self.window_tokens, self.window_steps = 0.0, 0, 0
        self.window_attended = 0.0

    def record(
        self, step: int, outcome: torch.Tensor, loss: torch.Tensor, tokens, attended
    ) -> None:
        updated = outcome == UPDATED
        figures = torch.stack([loss, tokens, torch.ones_like(loss), attended])
        figures = figures.to(self.sums.dtype)
        self.sums += torch.where(updated, figures, 0)
        self.pending.append((step, outcome))

    def read(self) -> None:
        if not self.pending:
            return
        outcomes = torch.stack([o for _, o in self.pending]).to(self.sums.dtype)
        values = torch.cat([self.sums, outcomes]).tolist()
        self.sums.zero_()
        self.window_loss += values[0]
        self.window_tokens += int(values[1])
        self.tokens_seen += int(values[1])
        self.window_steps += int(values[2])
        self.window_attended += values[3]
        steps = [step for step, _ in self.pending]
        self.pending = []
        for step, outcome in zip(steps, values[4:], strict=True):
            if outcome == OVERFLOW:  # routine while the fp16 loss scale settles
                self.overflows += 1
            elif outcome == SKIPPED:
                self.skipped += 1
                self.in_a_row += 1
                self.logger.write({"step": step, "skipped": "non-finite"})
                if self.in_a_row >= self.max_skipped:
                    self._stop(step)
            else:
                self.in_a_row = 0

    def _stop(self, step: int) -> None:
        saved = latest_checkpoint(self.folder)
        kept = f"the last good checkpoint is {saved}" if saved else "no checkpoint was written yet"
        raise LowlmError(
            f"the loss or gradient norm was non-finite for {self.in_a_row} steps in "
            f"a row (steps {step - self.in_a_row + 1}-{step}, each skipped); {kept}. "
            "Lower the learning rate, use bf16 or fp32 instead of fp16, or check the "
            "data."
        )

    def take_window(self) -> tuple[float | None, int, float]:
        """The mean loss of the window's updated steps (None when every step was skipped), its
        tokens and token-positions attended; starts the next window."""
        loss = self.window_loss / self.window_steps if self.window_steps else None
        tokens, attended = self.window_tokens, self.window_attended
        self.window_loss, self.window_tokens, self.window_steps = 0.0, 0, 0
        self.window_attended = 0.0
        return loss, tokens, attended
