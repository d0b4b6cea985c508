"""Which documents each rank of a build reads and encodes, in parts (docs/token-cache.md, "One
pipeline, one rank or several").

Two ways to share a corpus among ranks: parts of one stream of documents that every rank
reads (part k is rank k % ranks's), or, when the corpus is several local files, the files
themselves (file k is rank k % ranks's part), so that each file is read by one rank alone."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lowlm.config import DataConfig
from lowlm.data.blocks import shards
from lowlm.data.blocks.encoder import BatchTask
from lowlm.data.corpus import Source, iter_documents, source_documents
from lowlm.errors import LowlmError

if TYPE_CHECKING:
    from lowlm.data.blocks.build import _Job

FILE_PARTS = "parts-files"  # the parts folder of a build shared by files
INDEX_BITS = 32  # a batch's index in a build shared by files: its file's number, then its own


@dataclass(frozen=True)
class Start:
    """Where a build starts: the documents consumed before an interruption and, in a build
    shared by files, the file holding the next one and how many of that file's came before."""

    documents: int = 0
    source: int = 0
    skip: int = 0


def by_files(sources: list[Source], data: DataConfig, ranks: int) -> bool:
    """Whether the ranks share the corpus by files: several ranks, several local files (at
    least one per rank), and no de-duplication (data.dedup compares documents across files)."""
    local = all(source.path is not None for source in sources)
    return ranks > 1 and len(sources) >= ranks and local and not data.dedup


def locate(sources: list[Source], data: DataConfig, documents: int) -> Start:
    """The file holding document number `documents`, found by counting the documents of the
    files before it (a build shared by files, resumed: progress.json counts documents)."""
    before = 0
    for number, source in enumerate(sources):
        within = 0
        for _ in source_documents(source, data):
            if before + within == documents:  # a document follows the consumed ones here
                return Start(documents, number, within)
            within += 1
        before += within
    if before == documents:  # every document consumed: no part is left
        return Start(documents, len(sources), 0)
    raise LowlmError(
        f"progress.json says {documents} documents were packed, but the corpus holds {before}; "
        "delete the cache folder and rerun."
    )


def file_part(parts: Path, source: int, skip: int) -> Path:
    """The part of file number `source`, from its document `skip` on."""
    return parts / f"file-{source:06d}-{skip:012d}.npz"


def owner(source: int, ranks: int) -> int:
    return source % ranks


def stream_batches(
    job: _Job, start: Start, status: dict, pending: deque, sizes: dict
) -> Iterator[BatchTask]:
    """Shared by parts of one stream: this rank's batches from document `start` on, numbered
    from there (part k of part_batches batches is rank k % ranks's, unless a rerun finds it
    written). Every rank reads every document. Per batch, `pending` gets its number, its
    part's file, whether it ends the part and the bytes read so far (for the main rank's bar);
    `sizes` counts the text read and the text encoded."""
    per_batch, per_part = job.options.docs_per_batch, job.options.part_documents
    batch: list[str] = []
    part, mine, position = job.parts, False, -1
    for number, document in enumerate(iter_documents(job.sources, job.data)):
        length = len(document.encode("utf-8")) + 1
        sizes["read"] += length
        if number < start.documents:  # consumed before an interruption
            continue
        position = number - start.documents
        if position % per_part == 0:  # a part starts
            part = shards.part_path(job.parts, number)
            owned = (position // per_part) % job.ranks == job.rank
            mine = owned and (job.ranks == 1 or not part.exists())
            status["parts_reused"] += int(owned and not mine)
        if not mine:
            continue
        sizes["encoded"] += length
        batch.append(document)
        if len(batch) == per_batch:
            index = position // per_batch
            pending.append((index, part, (position + 1) % per_part == 0, sizes["read"]))
            yield BatchTask(index, batch, index % job.options.verify_every == 0, f"batch {index}")
            batch = []
    if batch:
        index = position // per_batch
        pending.append((index, part, True, sizes["read"]))
        yield BatchTask(index, batch, index % job.options.verify_every == 0, f"batch {index}")
    status["documents_read"] = position + 1


def file_batches(
    job: _Job, start: Start, status: dict, pending: deque, sizes: dict
) -> Iterator[BatchTask]:
    """Shared by files: the batches of this rank's files (numbers rank, rank + ranks, ... from
    the file the build starts in), each file one part, read by this rank alone; a part a rerun
    finds written is not read again. A file's last batch (empty for a file with no document
    left) ends its part. `pending` and `sizes` as in stream_batches."""
    per_batch, verify_every = job.options.docs_per_batch, job.options.verify_every
    made = 0  # this rank's batches: every verify_every-th is verified

    def task(number: int, part: Path, within: int, documents: list[str], ends: bool):
        nonlocal made
        pending.append(((number << INDEX_BITS) + within, part, ends, sizes["read"]))
        verify = bool(documents) and made % verify_every == 0
        made += 1
        where = f"batch {within} of {job.sources[number]}"
        return BatchTask((number << INDEX_BITS) + within, documents, verify, where)

    for number in range(start.source, len(job.sources)):
        if owner(number, job.ranks) != job.rank:
            continue
        skip = start.skip if number == start.source else 0
        part = file_part(job.parts, number, skip)
        if part.exists():
            status["parts_reused"] += 1
            continue
        batch: list[str] = []
        within = 0
        for position, document in enumerate(source_documents(job.sources[number], job.data)):
            length = len(document.encode("utf-8")) + 1
            sizes["read"] += length
            if position < skip:  # consumed before an interruption
                continue
            sizes["encoded"] += length
            batch.append(document)
            if len(batch) == per_batch + 1:  # the one before is not the file's last
                yield task(number, part, within, batch[:-1], False)
                batch, within = batch[-1:], within + 1
        yield task(number, part, within, batch, True)
