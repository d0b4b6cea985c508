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


@contextlib.contextmanager
def track_energy(
    enabled: bool, country_iso_code: str, output_dir: Path, section: str = "pretrain"
) -> Iterator[dict]:
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
        from codecarbon import OfflineEmissionsTracker

        logging.getLogger("codecarbon").setLevel(logging.ERROR)
        tracker = OfflineEmissionsTracker(
            country_iso_code=country_iso_code,
            log_level="error",
            save_to_file=False,
            output_dir=str(output_dir),
            # codecarbon's machine-wide lock would otherwise drop the measurement of a second
            # concurrent run (two stages, two users) without an error.
            allow_multiple_runs=True,
        )
        tracker.start()
    except Exception as exc:  # codecarbon fails in many hardware-specific ways
        record["reason"] = f"codecarbon could not start: {type(exc).__name__}: {exc}"
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
