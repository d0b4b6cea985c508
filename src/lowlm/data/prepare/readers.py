"""Raw inputs as datatrove Documents: plain text, JSONL (.gz / .zst), parquet, WARC, HF datasets.

One reader step takes every local input file (each task reads files[rank::tasks]); Hugging
Face datasets get datatrove's own reader. Each document keeps its input `id` (else
`<file>:<position>`), its source file and the row's other fields. A file that cannot be read
(missing, corrupt, truncated, no text field) is recorded with the reason in `bad_files/` and the
task goes on; the stage then stops or lists it (prepare.bad_files). Invalid UTF-8 is replaced
and counted (stat `invalid_utf8_lines`), never silently dropped.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.readers.base import BaseReader

from lowlm.data.prepare.inputs import UnreadableInput


def _decoded_lines(handle, count_invalid) -> Iterator[tuple[int, str]]:
    """(0-based line number, text without its newline); invalid UTF-8 replaced and counted."""
    for number, raw in enumerate(handle):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            count_invalid()
            text = raw.decode("utf-8", errors="replace")
        yield number, text.rstrip("\r\n")


def _text_blocks(lines: Iterator[tuple[int, str]], documents: str) -> Iterator[str]:
    """Documents of a plain-text file: each line, or each blank-line-separated block."""
    block: list[str] = []
    for _, line in lines:
        if documents == "lines":
            yield line
        elif line.strip():
            block.append(line)
        elif block:
            yield "\n".join(block)
            block = []
    if block:
        yield "\n".join(block)


class InputReader(BaseReader):
    """Every local input file; see the module docstring."""

    name = "📄 lowlm inputs"

    def __init__(
        self,
        files: list[tuple[str, str]],
        text_field: str,
        documents: str,
        bad_files_folder: str,
    ):
        super().__init__(text_key=text_field)
        self.files = files
        self.documents = documents
        self.bad_files_folder = bad_files_folder
        self._extractor = None

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1):
        if data:
            yield from data
        for path, kind in self.files[rank::world_size]:
            self.stat_update("input_files")
            try:
                for document in getattr(self, f"_read_{kind}")(path):
                    self.stat_update("documents")
                    self.update_doc_stats(document)
                    yield document
            except Exception as exc:  # noqa: BLE001 - any failure of one file is reported by name
                named = isinstance(exc, UnreadableInput)
                reason = str(exc) if named else f"{type(exc).__name__}: {exc}"
                self.stat_update("bad_files")
                folder = Path(self.bad_files_folder)
                folder.mkdir(parents=True, exist_ok=True)
                with open(folder / f"{rank:05d}.jsonl", "a", encoding="utf-8") as handle:
                    handle.write(json.dumps({"file": path, "reason": reason}) + "\n")

    def _document(self, text: str, doc_id: str, path: str, extra: dict) -> Document | None:
        if not text.strip():
            return None
        return Document(text=text, id=str(doc_id), metadata={"source": path, **extra})

    def _count_invalid(self) -> None:
        self.stat_update("invalid_utf8_lines")

    def _read_text(self, path: str) -> Iterator[Document]:
        from datatrove.io import open_file

        with open_file(path, "rb", compression="infer") as handle:
            blocks = _text_blocks(_decoded_lines(handle, self._count_invalid), self.documents)
            index = 0
            for block in blocks:
                document = self._document(block, f"{path}:{index}", path, {})
                if document is not None:
                    index += 1
                    yield document

    def _row_document(self, row: dict, path: str, where: str, position: int) -> Document | None:
        if self.text_key not in row:
            raise UnreadableInput(
                f"{where}: no text field '{self.text_key}' (fields: {', '.join(map(str, row))}); "
                "set prepare.text_field"
            )
        text = row.pop(self.text_key)
        if not isinstance(text, str):
            raise UnreadableInput(f"{where}: field '{self.text_key}' holds {type(text).__name__}")
        doc_id = row.pop("id", None)
        extra = {k: v for k, v in row.items() if isinstance(v, (str, int, float, bool))}
        doc_id = doc_id if doc_id is not None else f"{path}:{position}"
        return self._document(text, doc_id, path, extra)

    def _read_jsonl(self, path: str) -> Iterator[Document]:
        from datatrove.io import open_file

        with open_file(path, "rb", compression="infer") as handle:
            for number, line in _decoded_lines(handle, self._count_invalid):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    where = f"{path}:{number + 1}"
                    raise UnreadableInput(f"{where}: not valid JSON ({exc.msg})") from None
                if not isinstance(row, dict):
                    raise UnreadableInput(f"{path}:{number + 1}: not a JSON object")
                document = self._row_document(row, path, f"{path}:{number + 1}", number)
                if document is not None:
                    yield document

    def _read_parquet(self, path: str) -> Iterator[Document]:
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(path)
        position = 0
        for batch in parquet.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                document = self._row_document(row, path, f"{path} row {position}", position)
                position += 1
                if document is not None:
                    yield document

    def _read_warc(self, path: str) -> Iterator[Document]:
        from datatrove.io import open_file
        from datatrove.pipeline.extractors import Trafilatura
        from datatrove.pipeline.readers.warc import process_record
        from warcio.archiveiterator import ArchiveIterator

        if self._extractor is None:
            self._extractor = Trafilatura(favour_precision=True)  # FineWeb's settings
        with open_file(path, "rb", compression="infer") as handle:
            for position, record in enumerate(ArchiveIterator(io.BufferedReader(handle))):
                extracted = process_record(record)
                if not extracted:
                    continue
                try:
                    text = self._extractor.extract(extracted["text"])
                except Exception:  # noqa: BLE001 - trafilatura fails on some pages: count, go on
                    self.stat_update("warc_extraction_failed")
                    continue
                doc_id = extracted.get("id") or f"{path}:{position}"
                extra = {"url": extracted.get("url") or "", "date": extracted.get("date") or ""}
                document = self._document(text or "", doc_id, path, extra)
                if document is not None:
                    yield document


def hf_row(self, data: dict, path: str, id_in_file: int | str) -> dict:
    """datatrove's row adapter, but a row without the text field stops the task by name
    (datatrove's own skips it with a warning, which would hide a wrong text_field)."""
    if self.text_key not in data:
        raise UnreadableInput(
            f"dataset {path}: no text field '{self.text_key}' (fields: "
            f"{', '.join(map(str, data))}); set prepare.text_field"
        )
    return self._default_adapter(data, path, id_in_file)


def hf_readers(names: list[str], text_field: str, split: str) -> list:
    """datatrove's Hugging Face reader for each dataset name (`name` or `name:subset`)."""
    from datatrove.pipeline.readers import HuggingFaceDatasetReader

    readers = []
    for name in names:
        dataset, _, subset = name.partition(":")
        options = {"split": split, **({"name": subset} if subset else {})}
        readers.append(
            HuggingFaceDatasetReader(
                dataset, options, text_key=text_field, streaming=True, adapter=hf_row
            )
        )
    return readers


def read_bad_files(folder: Path) -> list[dict]:
    if not folder.is_dir():
        return []
    found = []
    for file in sorted(folder.glob("*.jsonl")):
        found += [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines()]
    return found
