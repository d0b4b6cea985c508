"""Energy and CO2 of a stage, measured by codecarbon offline, with the method written beside it."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path


def _method() -> dict:
    rapl = Path("/sys/class/powercap/intel-rapl:0/energy_uj")
    cpu = (
        "RAPL hardware counters"
        if rapl.exists() and os.access(rapl, os.R_OK)
        else "codecarbon model from CPU load (no hardware power meter readable): an estimate"
    )
    gpu = "NVML" if _has_cuda() else "no GPU"
    return {"cpu": cpu, "gpu": gpu, "ram": "codecarbon model from installed RAM: an estimate"}


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


class _NotStarted(RuntimeError):
    """codecarbon built no running tracker; the message is the exception it swallowed."""


class _CodecarbonFailures(logging.Filter):
    """codecarbon's constructor and start() swallow their exceptions into logged warnings and
    leave a tracker that never started: keep the first exception logged, to say why, and let
    only errors through to codecarbon's own console handler."""

    def __init__(self):
        super().__init__()
        self.failure: str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None and self.failure is None:
            exc = record.exc_info[1]
            self.failure = f"{type(exc).__name__}: {exc}"
        return record.levelno >= logging.ERROR


def _start_tracker(country_iso_code: str):
    """A started codecarbon tracker, or an exception saying why none could start."""
    from codecarbon import OfflineEmissionsTracker

    codecarbon_log = logging.getLogger("codecarbon")
    failures = _CodecarbonFailures()
    codecarbon_log.addFilter(failures)
    codecarbon_log.setLevel(logging.WARNING)  # before the constructor sets it from log_level
    try:
        # save_to_file=False: the record goes to the manifest, so no output folder is needed
        # (codecarbon refuses one that does not exist yet).
        tracker = OfflineEmissionsTracker(
            country_iso_code=country_iso_code,
            log_level="warning",  # its swallowed exceptions come as warnings
            save_to_file=False,
            # codecarbon's machine-wide lock would otherwise drop the measurement of a second
            # concurrent run (two stages, two users) without an error.
            allow_multiple_runs=True,
        )
        tracker.start()
    finally:
        codecarbon_log.removeFilter(failures)
        codecarbon_log.setLevel(logging.ERROR)
    # codecarbon's own mark of a started tracker (set by start(), None until then).
    if getattr(tracker, "_start_time", None) is None:
        raise _NotStarted(failures.failure or "its tracker did not start (no reason logged)")
    return tracker


@contextlib.contextmanager
def track_energy(enabled: bool, country_iso_code: str, section: str = "pretrain") -> Iterator[dict]:
    """Yield a dict that holds kWh, kg CO2 and the method once the block ends.

    When codecarbon cannot run, the dict says so and why; no figure is invented.
    """
    record: dict = {"measured": False}
    if not enabled:
        record["reason"] = f"disabled by {section}.energy.enabled: false"
        yield record
        return
    tracker = None
    try:
        tracker = _start_tracker(country_iso_code)
    except Exception as exc:  # codecarbon fails in many hardware-specific ways
        why = str(exc) if isinstance(exc, _NotStarted) else f"{type(exc).__name__}: {exc}"
        record["reason"] = f"codecarbon could not start: {why}"
        tracker = None
    try:
        yield record
    finally:
        if tracker is not None:
            try:
                emissions = tracker.stop()
                data = getattr(tracker, "final_emissions_data", None)
                if data is None:
                    raise RuntimeError("codecarbon returned no measurement")
                record.update(
                    measured=True,
                    kwh=data.energy_consumed,
                    kg_co2=emissions,
                    seconds=data.duration,
                    country_iso_code=country_iso_code,
                    cpu_power_w=data.cpu_power,
                    gpu_power_w=data.gpu_power,
                    ram_power_w=data.ram_power,
                    method=_method(),
                )
            except Exception as exc:
                record["reason"] = f"codecarbon could not stop: {type(exc).__name__}: {exc}"
