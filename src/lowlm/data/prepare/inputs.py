"""Which local files and dataset names `prepare.inputs` means (no datatrove import: the stage
graph hashes them to key the stage)."""

from __future__ import annotations

import glob
from pathlib import Path

from lowlm.errors import LowlmError

KINDS = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".warc": "warc",
    ".arc": "warc",
}
_COMPRESSED = {".gz", ".zst", ".bz2", ".xz"}


def input_kind(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSED:
        suffixes = suffixes[:-1]
    return KINDS.get(suffixes[-1]) if suffixes else None


def resolve_inputs(patterns: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """([(absolute path, kind)], [HF dataset names]); a pattern matching nothing, or a file of
    an unknown kind, is refused."""
    if not patterns:
        raise LowlmError("prepare.inputs is empty; list raw text files, globs or HF datasets.")
    files: list[tuple[str, str]] = []
    datasets: list[str] = []
    for pattern in patterns:
        path = Path(pattern).expanduser()
        if pattern.startswith("hf:") or not (glob.has_magic(pattern) or path.exists()):
            if pattern.startswith("hf:") or ("/" in pattern and not Path(pattern).suffix):
                if not Path(pattern.split("/")[0]).is_dir():  # data/typo is a typo, not a dataset
                    datasets.append(pattern.removeprefix("hf:"))
                    continue
            raise LowlmError(f"prepare input '{pattern}' does not exist; check the path.")
        if glob.has_magic(pattern):
            found = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
        elif path.is_dir():
            found = sorted(path.rglob("*"))
        else:
            found = [path]
        found = [p for p in found if p.is_file() and not p.name.startswith(".")]
        if not found:
            raise LowlmError(f"prepare input '{pattern}' matches no file; check the path.")
        for file in found:
            kind = input_kind(file)
            if kind is None:
                raise LowlmError(
                    f"prepare input {file}: unknown kind; name text files .txt, JSONL .jsonl(.gz/"
                    ".zst), parquet .parquet, WARC .warc(.gz)."
                )
            files.append((str(file.resolve()), kind))
    return list(dict.fromkeys(files)), datasets


class UnreadableInput(Exception):
    """An input file that cannot be read as its kind; the message names why."""
