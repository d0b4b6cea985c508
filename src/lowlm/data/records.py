"""Records (one dict each) from .jsonl, .json, .csv (with header) or .parquet files, or a
Hugging Face dataset name: the shared reader of instruction data, preference pairs,
labelled sets and local multiple-choice files.

Each record comes with where it is (`file:line`, `file row N`, `name[N]`); a line that is
not JSON (or not UTF-8) comes back as an exception in place of the record, so a caller can
count it (instructions) or stop on it (everything else) with the place it happened.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path

from lowlm.data.corpus import Source, resolve_sources
from lowlm.errors import LowlmError
from lowlm.hub import unreachable_note

_CONTROL = {chr(c) for c in range(32)} - {"\t", "\n", "\r"}


def read_csv_text(path: Path) -> str:
    """A CSV's text; invalid UTF-8 or a control byte stops with the file and line."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise LowlmError(
            f"{path}:{line}: invalid UTF-8 at byte {exc.start}; re-encode the file as UTF-8."
        ) from None
    bad = next((i for i, ch in enumerate(text) if ch in _CONTROL), None)
    if bad is not None:
        line = text.count("\n", 0, bad) + 1
        raise LowlmError(
            f"{path}:{line}: control character U+{ord(text[bad]):04X} in the file; remove it "
            "(a damaged or binary file?)."
        )
    return text


def iter_records(source: Source, split: str = "train") -> Iterator[tuple[str, object]]:
    if source.hf_name is not None:
        note = unreachable_note()  # before datasets: fail at once offline
        import datasets

        name, _, subset = source.hf_name.partition(":")
        try:
            rows = datasets.load_dataset(name, subset or None, split=split, streaming=True)
        except Exception as exc:  # the hub raises many kinds; all mean "could not load"
            raise LowlmError(
                f"could not load Hugging Face dataset '{source.hf_name}': {exc}{note}"
            ) from None
        for index, row in enumerate(rows):
            yield f"{source.hf_name}[{index}]", row
        return
    path = source.path
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise LowlmError(
                f"{path} is not a valid JSON file ({exc}); fix it or use JSONL."
            ) from None
        rows = data if isinstance(data, list) else [data]
        for index, row in enumerate(rows):
            yield f"{path}[{index}]", row
        return
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises several types for a damaged file
            raise LowlmError(f"cannot read parquet file {path}: {exc}") from None
        for index, row in enumerate(table.to_pylist()):
            yield f"{path} row {index}", row
        return
    if path.suffix == ".csv":
        for number, row in enumerate(csv.DictReader(io.StringIO(read_csv_text(path))), start=2):
            yield f"{path}:{number}", row
        return
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                yield f"{path}:{number}", json.loads(raw.decode("utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                yield f"{path}:{number}", ValueError(f"not valid JSON or UTF-8 ({exc})")


def read_records(pattern: str, split: str = "train", field: str = "data") -> list[tuple[str, dict]]:
    """Every record of a file, glob or dataset name (config `field`, named when it is
    missing); a record that is not a JSON object stops with its place."""
    records = []
    for source in resolve_sources([pattern], field):
        for where, record in iter_records(source, split):
            if isinstance(record, Exception):
                raise LowlmError(f"{where}: {record}; fix the line.")
            if not isinstance(record, dict):
                raise LowlmError(
                    f"{where}: a JSON {type(record).__name__}, not an object with named fields."
                )
            records.append((where, record))
    return records
