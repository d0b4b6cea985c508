"""Streaming corpus reading shared by every stage.

A corpus is a list of patterns: files, directories, globs, `.jsonl` / `.parquet` /
`.gz` files, or Hugging Face dataset names (`hf:` prefix, or any name that is not a
local path). Documents are streamed one at a time, so a corpus never has to fit in
memory; only the optional de-duplication keeps 8 bytes per distinct document.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import re
import unicodedata
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from lowlm.config import DataConfig
from lowlm.errors import LowlmError
from lowlm.hub import unreachable_note
from lowlm.rundir import cached_sha256, sha256_text

TEXT_SUFFIXES = {".txt", ".text", ".md", ".jsonl", ".parquet", ".gz"}
# Parquet schema metadata naming the text column of a file lowlm wrote (prepare's shards): read
# whatever data.text_field says, which names the field of the user's own inputs.
TEXT_COLUMN_KEY = b"lowlm.text_column"
_HF_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]+)?$")


@dataclass(frozen=True)
class Source:
    """One corpus input: a local file, or a Hugging Face dataset name."""

    path: Path | None = None
    hf_name: str | None = None

    def __str__(self) -> str:
        return str(self.path) if self.path is not None else f"hf:{self.hf_name}"


def _is_corpus_file(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix in TEXT_SUFFIXES


def _looks_local(pattern: str) -> bool:
    """A path whose first folder exists here (`data/typo`) is a typo, not a hub dataset: say so
    at once instead of a minute of Hub retries."""
    first = pattern.split("/", 1)[0]
    return pattern.startswith((".", "/", "~")) or ("/" in pattern and Path(first).is_dir())


def resolve_sources(patterns: Iterable[str], field: str = "corpus") -> list[Source]:
    """Expand patterns into sources; a pattern that matches nothing is an error naming the
    config `field` it came from (e.g. finetune.train)."""
    patterns = list(patterns)
    if not patterns:
        raise LowlmError(f"no {field} is configured; list files, folders or globs under it.")
    sources: list[Source] = []
    for pattern in patterns:
        if pattern.startswith("hf:"):
            sources.append(Source(hf_name=pattern[3:]))
            continue
        path = Path(pattern).expanduser()
        if glob.has_magic(pattern):
            matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
            files = [p for p in matches if p.is_file()]
            if not files:
                raise LowlmError(f"{field} pattern '{pattern}' matches no file; check the path.")
            sources.extend(Source(path=p) for p in files)
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if _is_corpus_file(p))
            if not files:
                raise LowlmError(
                    f"{field} folder '{pattern}' holds no .txt/.jsonl/.parquet/.gz file."
                )
            sources.extend(Source(path=p) for p in files)
        elif path.is_file():
            sources.append(Source(path=path))
        elif (
            path.suffix in TEXT_SUFFIXES
            or path.suffix
            or not _HF_NAME.match(pattern)
            or _looks_local(pattern)
        ):
            raise LowlmError(f"{field} file '{pattern}' does not exist; check the path.")
        else:
            sources.append(Source(hf_name=pattern))
    return sources


def source_hashes(sources: Iterable[Source]) -> dict[str, str]:
    """Content hashes of local files; dataset names are hashed by name (the hub versions them)."""
    return {
        str(s): cached_sha256(s.path) if s.path is not None else sha256_text(s.hf_name or "")
        for s in sources
    }


def _decoded_lines(handle: IO[bytes], name: str, data: DataConfig) -> Iterator[tuple[int, str]]:
    """Yield (line number, text without newline), reporting invalid UTF-8 with its byte offset."""
    offset = 0
    for number, raw in enumerate(handle, start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            if data.invalid_utf8 == "replace":
                text = raw.decode("utf-8", errors="replace")
            else:
                raise LowlmError(
                    f"{name}: invalid UTF-8 at byte offset {offset + exc.start} (line {number}); "
                    "fix or re-encode the file, or set data.invalid_utf8: replace."
                ) from None
        offset += len(raw)
        yield number, text.rstrip("\r\n")


def _jsonl_documents(lines: Iterator[tuple[int, str]], name: str, field: str) -> Iterator[str]:
    for number, line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LowlmError(
                f"{name}:{number}: not valid JSON ({exc.msg}); fix the line."
            ) from None
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise LowlmError(
                f"{name}:{number}: no text field '{field}'; set data.text_field to the field "
                "that holds the text."
            )
        yield record[field]


def _open_binary(path: Path) -> IO[bytes]:
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    return open(path, "rb")


def _file_documents(path: Path, data: DataConfig) -> Iterator[str]:
    inner_suffix = Path(path.stem).suffix if path.suffix == ".gz" else path.suffix
    if inner_suffix == ".parquet":
        yield from _parquet_documents(path, data.text_field)
        return
    try:
        handle = _open_binary(path)
        with handle:
            lines = _decoded_lines(io.BufferedReader(handle), str(path), data)
            if inner_suffix == ".jsonl":
                yield from _jsonl_documents(lines, str(path), data.text_field)
            else:
                for _, line in lines:
                    yield line
    except (OSError, EOFError, zlib.error) as exc:
        raise LowlmError(f"cannot read corpus file {path} ({exc}); is the file complete?") from None


def _parquet_documents(path: Path, field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise LowlmError(f"cannot read parquet file {path}: {exc}") from None
    written = (parquet.schema_arrow.metadata or {}).get(TEXT_COLUMN_KEY)
    field = written.decode("utf-8") if written else field
    if field not in parquet.schema_arrow.names:
        raise LowlmError(
            f"{path} has no column '{field}' (columns: {', '.join(parquet.schema_arrow.names)}); "
            "set data.text_field."
        )
    row = 0
    for batch in parquet.iter_batches(columns=[field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            if not isinstance(value, str):
                raise LowlmError(
                    f"{path} row {row}: column '{field}' holds {type(value).__name__}, not text; "
                    "filter the file, or set data.text_field to a text column."
                )
            row += 1
            yield value


def _hf_documents(name: str, data: DataConfig) -> Iterator[str]:
    note = unreachable_note()  # before datasets: fail at once offline
    import datasets

    dataset_name, _, subset = name.partition(":")
    try:
        rows = datasets.load_dataset(
            dataset_name, subset or None, split=data.hf_split, streaming=True
        )
    except Exception as exc:  # the hub raises many kinds; all mean "could not load"
        raise LowlmError(
            f"could not load Hugging Face dataset '{name}' ({type(exc).__name__}: {exc}){note}; "
            "check the name and your connection, or point to local files."
        ) from None
    for row in rows:
        value = row.get(data.text_field)
        if not isinstance(value, str):
            raise LowlmError(
                f"dataset '{name}' has no text field '{data.text_field}'; set data.text_field."
            )
        yield value


def source_documents(source: Source, data: DataConfig) -> Iterator[str]:
    """One source's documents, normalised and filtered by length (no de-duplication: that
    spans sources)."""
    raw = (
        _file_documents(source.path, data)
        if source.path is not None
        else _hf_documents(source.hf_name or "", data)
    )
    for text in raw:
        if data.nfkc:
            text = unicodedata.normalize("NFKC", text)
        text = text.strip()
        if len(text) >= data.min_chars:
            yield text


def iter_documents(sources: Iterable[Source], data: DataConfig) -> Iterator[str]:
    """Stream every document, normalised and filtered; an empty result is an error."""
    seen: set[bytes] = set()
    kept = 0
    for source in sources:
        for text in source_documents(source, data):
            if data.dedup:
                digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
                if digest in seen:
                    continue
                seen.add(digest)
            kept += 1
            yield text
    if kept == 0:
        names = ", ".join(str(s) for s in sources)
        raise LowlmError(
            f"the corpus ({names}) is empty after filtering; add text or lower data.min_chars."
        )


def read_lines(path: str | Path, data: DataConfig) -> list[str]:
    """All documents of one small file (held-out and eval texts), one per line."""
    return list(iter_documents(resolve_sources([str(path)]), data))
