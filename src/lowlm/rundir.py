"""The run directory: atomic writes, content hashes, and manifest.json (one record per stage)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from lowlm import __version__
from lowlm.config import LowlmConfig, config_to_yaml
from lowlm.errors import LowlmError

TRACKED_PACKAGES = (
    "torch",
    "transformers",
    "tokenizers",
    "sentencepiece",
    "peft",
    "accelerate",
    "datasets",
)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so that readers see the old content or the new, never a half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path` whole.

    On an exception the temporary folder is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.with_name(f".{path.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_dir(path: Path) -> str:
    """Hash of a folder's files (names and contents), in sorted order."""
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        digest.update(sha256_file(file).encode())
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def package_versions() -> dict[str, str]:
    versions = {"lowlm": __version__}
    for name in TRACKED_PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def lowlm_git_commit() -> str | None:
    """The commit of the lowlm checkout this code runs from, or None when not a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# Where each stage writes its main artifact inside the run directory.
STAGE_FOLDERS = {
    "tokenize": "tokenizer",
    "resize": "model-resized",
    "init": "model-init",
    "pretrain-stage1": "pretrain-stage1",
    "pretrain-stage2": "pretrain-stage2",
    "pretrain-full": "pretrain-full",
    "export": "export",
    "sft": "sft",
}


class RunDir:
    """A run's folder and its manifest; every change to the manifest is written atomically."""

    def __init__(self, config: LowlmConfig):
        self.config = config
        self.path = config.run_dir
        self.manifest_path = self.path / "manifest.json"

    def folder(self, stage: str) -> Path:
        return self.path / STAGE_FOLDERS[stage]

    def newest(self, stages: list[str]) -> Path | None:
        """The folder of the first of `stages` that is done, in the order given."""
        manifest = self.read_manifest()["stages"]
        for stage in stages:
            if manifest.get(stage, {}).get("status") == "done" and self.folder(stage).exists():
                return self.folder(stage)
        return None

    def read_manifest(self) -> dict:
        if not self.manifest_path.exists():
            return {"lowlm_version": __version__, "stages": {}}
        try:
            manifest = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise LowlmError(
                f"{self.manifest_path} is corrupt ({exc}); restore it or delete the run "
                f"directory {self.path} and run again."
            ) from None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("stages"), dict):
            raise LowlmError(
                f"{self.manifest_path} is corrupt (no 'stages' mapping); restore it or delete "
                f"the run directory {self.path} and run again."
            )
        return manifest

    def _write_manifest(self, manifest: dict) -> None:
        atomic_write_json(self.manifest_path, manifest)

    def stage_record(self, stage: str) -> dict | None:
        return self.read_manifest()["stages"].get(stage)

    def write_config(self) -> None:
        atomic_write_text(self.path / "config.yaml", config_to_yaml(self.config))

    def run_tokenizer(self) -> Path:
        """The run's tokenizer folder; an error that says what to run when it is missing."""
        folder = self.folder("tokenize")
        if not (folder / "tokenizer.json").exists():
            raise LowlmError(f"{folder} holds no tokenizer; run `lowlm tokenize` first.")
        return folder

    def skip_done(self, stage: str, fingerprint: str, force: bool, say=print) -> bool:
        """True (and says so through `say`) when the stage is done with these inputs and not
        forced. Every rank of a multi-process run gets the same answer."""
        if force or not self.is_done(stage, fingerprint):
            return False
        where = self.path / STAGE_FOLDERS.get(stage, stage)
        say(f"{stage}: already done with these inputs in {where}; --force reruns it.")
        return True

    def is_done(self, stage: str, fingerprint: str) -> bool:
        """True when the stage finished with these exact inputs and its outputs still exist."""
        record = self.stage_record(stage)
        if not record or record.get("status") != "done" or record.get("fingerprint") != fingerprint:
            return False
        return all((self.path / out).exists() for out in record.get("outputs", {}))

    def start(self, stage: str, inputs: dict[str, str], fingerprint: str) -> None:
        manifest = self.read_manifest()
        manifest["stages"][stage] = {
            "status": "running",
            "started": _now(),
            "inputs": inputs,
            "fingerprint": fingerprint,
            "versions": package_versions(),
            "lowlm_commit": lowlm_git_commit(),
        }
        self.write_config()
        self._write_manifest(manifest)

    def finish(self, stage: str, outputs: dict[str, str], metrics: dict, **extra: Any) -> None:
        manifest = self.read_manifest()
        record = manifest["stages"].setdefault(stage, {})
        record.update(status="done", finished=_now(), outputs=outputs, metrics=metrics, **extra)
        self._write_manifest(manifest)

    @contextlib.contextmanager
    def recording(self, stage: str, inputs: dict[str, str], fingerprint: str) -> Iterator[None]:
        """Mark the stage running; if the block raises, mark it failed with the message."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.start(stage, inputs, fingerprint)
        try:
            yield
        except LowlmError as exc:
            self.fail(stage, str(exc))
            raise
        except BaseException as exc:
            self.fail(stage, f"{type(exc).__name__}: {exc}")
            raise

    def finish_model(self, stage: str, card: dict, metrics: dict, started: float, **extra) -> None:
        """finish() for a stage that wrote a model folder: its tokenizer hash and vocab size."""
        self.finish(
            stage,
            outputs={STAGE_FOLDERS.get(stage, stage): card["tokenizer_hash"]},
            metrics=metrics,
            tokenizer_hash=card["tokenizer_hash"],
            vocab_size=card["vocab_size"],
            seconds=round(time.time() - started, 2),
            **extra,
        )

    def fail(self, stage: str, error: str) -> None:
        manifest = self.read_manifest()
        record = manifest["stages"].setdefault(stage, {})
        record.update(status="failed", finished=_now(), error=error)
        self._write_manifest(manifest)


def fingerprint(*parts: Any) -> str:
    """A stable hash of JSON-serialisable parts (config sections, input hashes)."""
    return sha256_text(json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str))
