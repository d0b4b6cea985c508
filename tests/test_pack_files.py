"""A token-cache build over several ranks shares a corpus of several files by files: each file
is read by one rank alone (the bytes the ranks read sum to the corpus once). The two-rank
build itself is compared with the one-process cache in tests/test_pack.py."""

from __future__ import annotations

from collections import deque
from pathlib import Path

import pytest

from lowlm.config import DataConfig
from lowlm.data.blocks import CacheOptions, share
from lowlm.data.blocks.build import _Job
from lowlm.data.corpus import Source, iter_documents, resolve_sources
from lowlm.errors import LowlmError

REPO = Path(__file__).resolve().parents[1]


def parquet_shards(folder: Path, lines: list[str], sizes: list[int]) -> list[Source]:
    """Shards of `sizes` documents (a size 0 holds one blank row: no document after strip)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir()
    start = 0
    for number, size in enumerate(sizes):
        rows = lines[start : start + size] or ["   "]
        pq.write_table(pa.table({"text": rows}), folder / f"{number:05d}.parquet")
        start += size
    return resolve_sources([str(folder)])


@pytest.fixture
def corpus(tmp_path) -> list[Source]:
    lines = (REPO / "data" / "demo" / "en.txt").read_text(encoding="utf-8").splitlines()
    return parquet_shards(tmp_path / "shards", [x for x in lines if x.strip()], [90, 0, 70, 45, 9])


def job(folder: Path, sources: list[Source], rank: int, ranks: int, **data) -> _Job:
    options = CacheOptions(docs_per_batch=16)
    return _Job(folder, folder, sources, DataConfig(**data), 16, 7, 1, options, rank, ranks)


def read_share(job: _Job, start: share.Start) -> tuple[list, dict, dict]:
    """(the batches, the status, the bytes read and encoded) of one rank's share."""
    status = {"parts_reused": 0}
    sizes = {"read": 0, "encoded": 0}
    pending: deque = deque()
    tasks = list(share.file_batches(job, start, status, pending, sizes))
    assert len(pending) == len(tasks)
    return list(zip(tasks, pending, strict=True)), status, sizes


def counting_reads(monkeypatch) -> list[tuple[int, str]]:
    """Every source share.py opens, as (rank being read for, path)."""
    reads: list = []
    real = share.source_documents

    def counted(source, data):
        reads.append((counted.rank, source.path.name))
        return real(source, data)

    counted.rank = -1
    monkeypatch.setattr(share, "source_documents", counted)
    return reads, counted


def test_two_ranks_read_each_shard_once_and_together_the_corpus(corpus, tmp_path, monkeypatch):
    reads, counted = counting_reads(monkeypatch)
    everything = list(iter_documents(corpus, DataConfig()))
    by_rank = {}
    for rank in (0, 1):
        counted.rank = rank
        by_rank[rank] = read_share(job(tmp_path, corpus, rank, 2), share.Start())
    opened = sorted(name for _, name in reads)
    assert opened == sorted(s.path.name for s in corpus)  # each shard once, on one rank
    mine = {name for rank, name in reads if rank == 0}
    assert mine == {"00000.parquet", "00002.parquet", "00004.parquet"}  # files 0, 2, 4
    text_bytes = sum(len(d.encode("utf-8")) + 1 for d in everything)
    read = [by_rank[rank][2]["read"] for rank in (0, 1)]
    assert sum(read) == text_bytes and min(read) > 0  # the corpus once, across the ranks
    assert [by_rank[rank][2]["encoded"] for rank in (0, 1)] == read
    # In corpus order (by file), the parts hold the corpus's documents.
    parts: dict[Path, list[str]] = {}
    for rank in (0, 1):
        for task, (index, part, _, _) in by_rank[rank][0]:
            assert index == task.index and part.parent == tmp_path / share.FILE_PARTS
            parts.setdefault(part, []).extend(task.documents)
    assert len(parts) == len(corpus)  # the empty shard too: an empty part ends it
    assert [d for part in sorted(parts) for d in parts[part]] == everything


def test_a_written_part_is_not_read_again(corpus, tmp_path, monkeypatch):
    reads, counted = counting_reads(monkeypatch)
    written = share.file_part(tmp_path / share.FILE_PARTS, 2, 0)
    written.parent.mkdir()
    written.write_bytes(b"")
    _, status, _ = read_share(job(tmp_path, corpus, 0, 2), share.Start())
    assert status["parts_reused"] == 1
    assert [name for _, name in reads] == ["00000.parquet", "00004.parquet"]


def test_a_resumed_build_starts_inside_the_file_that_holds_its_document(corpus, tmp_path):
    data = DataConfig()
    assert share.locate(corpus, data, 0) == share.Start(0, 0, 0)
    assert share.locate(corpus, data, 90) == share.Start(90, 2, 0)  # past the empty file
    assert share.locate(corpus, data, 100) == share.Start(100, 2, 10)
    assert share.locate(corpus, data, 205) == share.Start(205, 4, 0)
    assert share.locate(corpus, data, 214) == share.Start(214, 5, 0)  # all consumed
    with pytest.raises(LowlmError, match="holds 214"):
        share.locate(corpus, data, 215)
    tasks, _, sizes = read_share(job(tmp_path, corpus, 0, 2), share.Start(100, 2, 10))
    first = [t for t, (_, part, _, _) in tasks if part.name == "file-000002-000000000010.npz"]
    third_file = list(share.source_documents(corpus[2], data))
    assert [d for t in first for d in t.documents] == third_file[10:]
    assert sizes["read"] > sizes["encoded"]  # its first 10 documents read, not encoded


def test_ranks_share_by_files_only_when_each_file_can_be_read_alone(corpus, tmp_path):
    assert share.by_files(corpus, DataConfig(), 2) and share.by_files(corpus, DataConfig(), 5)
    assert not share.by_files(corpus, DataConfig(), 1)  # one process reads all anyway
    assert not share.by_files(corpus, DataConfig(), 6)  # a rank would have no file
    assert not share.by_files(corpus, DataConfig(dedup=True), 2)  # copies across files
    assert not share.by_files([*corpus, Source(hf_name="org/name")], DataConfig(), 2)
    assert job(tmp_path, corpus, 0, 2).parts == tmp_path / share.FILE_PARTS
    assert job(tmp_path, corpus, 0, 2, dedup=True).parts.name.startswith("parts-")


def test_a_file_with_no_document_still_ends_its_part(corpus, tmp_path):
    tasks, _, _ = read_share(job(tmp_path, corpus, 1, 2), share.Start())
    empty = [(t, ends) for t, (_, part, ends, _) in tasks if part.name.startswith("file-000001")]
    assert len(empty) == 1 and empty[0][0].documents == [] and empty[0][1]
    assert not empty[0][0].verify


def test_an_empty_batch_encodes_to_nothing_even_through_the_full_hf_call(byte_base):
    """tokenizer([]) raises in transformers 5: an empty file's batch never reaches it."""
    import numpy as np

    from lowlm.data.blocks.encoder import BatchTask, EncoderPlan, encode_batch, init_worker

    plan = EncoderPlan(kind="hf", reason="the full call", hf_fast=False)
    init_worker(str(byte_base), 7, 0.0, plan, 0, np.uint16, CacheOptions())
    empty = encode_batch(BatchTask(0, [], False, "batch 0"))
    assert empty.documents == 0 and len(empty.train) == len(empty.held_out) == 0
    assert encode_batch(BatchTask(1, ["a b"], False, "batch 1")).train[-1] == 0  # then EOS
