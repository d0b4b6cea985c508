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


def _read_umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


_UMASK = _read_umask()  # read once: setting it to read it is not thread-safe


def _readable(path: Path | str, directory: bool) -> None:
    """mkstemp/mkdtemp create 0600/0700 whatever the umask; give artifacts the usual modes
    (0644 / 0755 under umask 022) so other users of a shared box can read a run."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_UMASK)


def _readable_tree(root: Path) -> None:
    """The usual modes on every file and folder of an artifact: libraries write some through
    private temporary files (safetensors' model.safetensors is 0600 whatever the umask)."""
    for folder, _, files in os.walk(root):  # links are left alone, not followed
        _readable(folder, directory=True)
        for file in (Path(folder) / name for name in files):
            if not file.is_symlink():
                _readable(file, directory=False)


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
        _readable(tmp, directory=False)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _aside(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def recover_dir(path: Path) -> None:
    """Finish or undo a replacement that a kill interrupted (see atomic_dir).

    `.<name>.old` without `<name>`: the kill came between moving the old artifact aside and
    moving the new one in, so the old one goes back. Both present: the new one is in place
    and only the deletion of the old one was lost.
    """
    path = Path(path)
    old = _aside(path)
    if not old.exists():
        return
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(old, path)


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path` whole.

    On an exception the temporary folder is removed and `path` is left as it was. The
    replacement is move aside, move in, delete: at every instant either the previous
    artifact or the new one is complete on disk, and `recover_dir` (called here first,
    and by the run directory) puts the previous one back after a kill in between.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    _readable(tmp, directory=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _readable_tree(tmp)
    old = _aside(path)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    """The sha256 of a file's bytes (use `cached_sha256` for inputs read again and again)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def hash_cache_path() -> Path:
    """Where content hashes of large inputs are remembered ($LOWLM_HASH_CACHE to move it)."""
    override = os.environ.get("LOWLM_HASH_CACHE")
    if override:
        return Path(override)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "lowlm" / "file-hashes.json"


class _HashCache:
    """sha256 of files remembered by (path, size, mtime, ctime, inode), as git's index does: a
    file is read again only when one of those changed. Entries younger than RACY_SECONDS are not
    trusted (a rewrite within the clock's resolution could keep size and mtime)."""

    RACY_SECONDS = 2.0

    def __init__(self) -> None:
        self.entries: dict[str, list] | None = None
        self.dirty = False

    def _load(self) -> dict[str, list]:
        if self.entries is None:
            try:
                self.entries = json.loads(hash_cache_path().read_text(encoding="utf-8"))
                if not isinstance(self.entries, dict):
                    self.entries = {}
            except (OSError, ValueError):
                self.entries = {}
        return self.entries

    def sha256(self, path: Path) -> str:
        path = Path(path).resolve()
        stat = path.stat()
        stamp = [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]
        entries = self._load()
        entry = entries.get(str(path))
        if entry and entry[:4] == stamp:
            return entry[4]
        digest = sha256_file(path)
        if time.time() - stat.st_mtime > self.RACY_SECONDS:
            entries[str(path)] = [*stamp, digest]
            self.dirty = True
        return digest

    def save(self) -> None:
        if not self.dirty or self.entries is None:
            return
        with contextlib.suppress(OSError):  # a read-only home only costs re-hashing
            atomic_write_json(hash_cache_path(), self.entries)
        self.dirty = False


_HASHES = _HashCache()


def cached_sha256(path: Path) -> str:
    digest = _HASHES.sha256(path)
    _HASHES.save()
    return digest


def sha256_dir(path: Path) -> str:
    """Hash of a folder's files (names and contents), in sorted order; hidden entries and
    checkpoints/ are left out (they are work in progress, not the artifact)."""
    digest = hashlib.sha256()
    root = Path(path)
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = file.relative_to(root)
        if any(part.startswith(".") for part in relative.parts) or relative.parts[0] == (
            "checkpoints"
        ):
            continue
        digest.update(str(relative).encode())
        digest.update(_HASHES.sha256(file).encode())
    _HASHES.save()
    return digest.hexdigest()


def content_id(source: str | Path) -> str:
    """What a stage key records for an input outside the run: the sha256 of a local file or
    folder, else the name (a Hugging Face id; the hub versions it, lowlm cannot hash it)."""
    path = Path(source).expanduser()
    if path.is_file():
        return cached_sha256(path)
    if path.is_dir():
        return sha256_dir(path)
    return f"name:{source}"


def signature(path: Path) -> str:
    """A cheap stamp of a folder or file as written (names, sizes, mtimes): a changed stamp
    means someone touched an artifact after its stage recorded it."""
    path = Path(path)
    if path.is_file():
        stat = path.stat()
        return sha256_text(json.dumps([stat.st_size, stat.st_mtime_ns]))
    parts = []
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        stat = file.stat()
        parts.append([str(file.relative_to(path)), stat.st_size, stat.st_mtime_ns])
    return sha256_text(json.dumps(parts))


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


class RunDir:
    """A run's folder and its manifest; every change to the manifest is written atomically."""

    def __init__(self, config: LowlmConfig):
        self.config = config
        self.path = config.run_dir
        self.manifest_path = self.path / "manifest.json"

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

    def start(self, stage: str, inputs: dict[str, str], key: str, **extra: Any) -> None:
        """Record the stage running with its inputs (label -> hash) and key."""
        manifest = self.read_manifest()
        manifest["stages"][stage] = {
            "status": "running",
            "started": _now(),
            "key": key,
            "inputs": inputs,
            "versions": package_versions(),
            "lowlm_commit": lowlm_git_commit(),
            **extra,
        }
        self.write_config()
        self._write_manifest(manifest)

    def finish(self, stage: str, outputs: dict[str, str], metrics: dict, **extra: Any) -> None:
        manifest = self.read_manifest()
        record = manifest["stages"].setdefault(stage, {})
        record.update(status="done", finished=_now(), outputs=outputs, metrics=metrics, **extra)
        self._write_manifest(manifest)

    def interrupt(self, stage: str, reason: str) -> None:
        """Record a stage stopped by Ctrl-C: like a killed one, the next run resumes it."""
        manifest = self.read_manifest()
        record = manifest["stages"].setdefault(stage, {})
        record.update(status="interrupted", finished=_now(), reason=reason)
        self._write_manifest(manifest)

    def fail(self, stage: str, error: str) -> None:
        manifest = self.read_manifest()
        record = manifest["stages"].setdefault(stage, {})
        record.update(status="failed", finished=_now(), error=error)
        self._write_manifest(manifest)


def fingerprint(*parts: Any) -> str:
    """A stable hash of JSON-serialisable parts (config sections, input hashes)."""
    return sha256_text(json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str))
