"""What the benchmark scripts share: peak-memory sampling and the SmolLM2-135M asset as a
dense HF folder. Imported by the scripts beside it (run as `python scripts/NAME.py`)."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import psutil

ASSETS = Path.home() / ".cache" / "lowlm-assets"


class PeakRss:
    """Samples this process's resident memory in a thread; reports the growth over the start."""

    def __init__(self):
        self.process = psutil.Process()
        self.start = self.peak = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.01)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def smollm2_folder(cache: Path, otherwise: str = "pass --model") -> Path:
    """The asset SmolLM2-135M (GGUF) as a dense HF folder every tool can load, made once."""
    folder = cache / "smollm2-135m-hf"
    if (folder / "model.safetensors").exists():
        return folder
    from transformers import AutoTokenizer

    from lowlm.models.load import load_pretrained
    from lowlm.tokenization.base import _gguf_tokenizer_folder

    gguf = ASSETS / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.exists():
        sys.exit(f"{gguf} is missing: run ../shared/tools/get-assets, or {otherwise}.")
    load_pretrained(str(gguf)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(_gguf_tokenizer_folder(gguf)).save_pretrained(folder)
    return folder
