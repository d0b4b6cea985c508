"""`build_cache`: one pipeline that tokenises a corpus into the cache, in one process (a run of
one rank) or over the ranks of a torch.distributed run (docs/token-cache.md)."""

from __future__ import annotations

import json
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing import Pool
from pathlib import Path

import numpy as np

from lowlm.config import DataConfig
from lowlm.data.blocks import choice, shards, share
from lowlm.data.blocks.encoder import (
    EncodedBatch,
    EncoderMismatch,
    EncoderPlan,
    encode_batch,
    encoder_name,
    init_worker,
)
from lowlm.data.blocks.options import MISMATCH_FILE, PLAIN_SUFFIXES, STOP_FILE, CacheOptions
from lowlm.data.corpus import Source
from lowlm.errors import LowlmError
from lowlm.rundir import atomic_write_json

# What the build record keeps of each rank's figures (meta.json's build["per_rank"]).
PER_RANK = ("rank", "mb_read", "mb", "documents", "batches", "parts_written", "parts_reused")
PER_RANK += ("seconds", "mb_per_s", "peak_rss_mb", "peak_rss_mb_largest_child")


@dataclass(frozen=True)
class _Job:
    """One build as this rank sees it."""

    folder: Path
    tokenizer_folder: Path
    sources: list[Source]
    data: DataConfig
    block_size: int
    seed: int
    num_proc: int
    options: CacheOptions
    rank: int
    ranks: int

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def by_files(self) -> bool:
        """Whether the ranks share the corpus by files rather than by parts of one stream."""
        return share.by_files(self.sources, self.data, self.ranks)

    @property
    def parts(self) -> Path:
        """Where the ranks of a build over several leave their parts."""
        if self.by_files:
            return self.folder / share.FILE_PARTS
        return self.folder / f"parts-{self.options.part_documents}"


@dataclass
class _Setup:
    """What a build needs before it encodes: decided once, by the main rank."""

    plan: EncoderPlan
    eos: int
    dtype: type
    vocab_size: int
    progress: dict  # documents consumed and shards written before an interruption
    start: share.Start  # where this build starts reading


def build_cache(
    folder: Path,
    tokenizer_folder: Path,
    sources: list[Source],
    data: DataConfig,
    block_size: int,
    seed: int,
    num_proc: int = 1,
    options: CacheOptions | None = None,
) -> dict:
    """Build (or finish building) the cache in `folder`; returns its meta (meta.json keeps the
    build's record too: encoder, MB/s, peak memory). Under torch.distributed with several
    processes every rank calls it and encodes a share of the corpus."""
    started = time.perf_counter()
    rank, ranks = _process_group()
    options = options or CacheOptions()
    where = (Path(folder), Path(tokenizer_folder), sources, data)
    job = _Job(*where, block_size, seed, num_proc, options, rank, ranks)
    kind, value = _on_main(job, _decide)
    if kind == "done":
        return value
    setup: _Setup = value
    sink = _ShardSink(job, setup) if ranks == 1 else _PartSink(job, setup)
    status, failure = _encode_share(job, setup, sink)
    statuses = _all_gather(status, ranks)  # every rank's outcome: the barrier
    _stop_on_failure(job, setup, statuses, failure)
    _, meta = _on_main(job, lambda job: _finish_build(job, setup, statuses, sink, started))
    return meta


def cache_description(meta: dict) -> dict:
    """The cache's meta without the record of how this build went."""
    return {key: value for key, value in meta.items() if key != "build"}


def _decide(job: _Job) -> tuple[str, object]:
    """The main rank: ("done", meta) for a finished cache, else ("build", its setup)."""
    meta_path = job.folder / "meta.json"
    if meta_path.exists():
        return "done", cache_description(json.loads(meta_path.read_text()))
    setup = _prepare(job)
    (job.parts / STOP_FILE).unlink(missing_ok=True)  # a failed build's
    over = f", {job.ranks} ranks" if job.ranks > 1 else ""
    print(f"packing with the {encoder_name(setup.plan)}{over}: {setup.plan.reason}")
    return "build", setup


def _prepare(job: _Job) -> _Setup:
    from transformers import AutoTokenizer

    job.folder.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(job.tokenizer_folder)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise LowlmError(
            f"the tokenizer in {job.tokenizer_folder} has no EOS token to separate documents."
        )
    dtype = np.uint16 if len(tokenizer) <= 65535 else np.uint32
    refused = ""
    if (job.folder / MISMATCH_FILE).exists():
        refused = f"an earlier build found sentencepiece wrong (see {job.folder / MISMATCH_FILE})"
    sample = choice.sample_documents(job.sources, job.data, job.options)
    plan = choice.choose_encoder(
        tokenizer, job.tokenizer_folder, sample, refused, job.options.max_triggers
    )
    progress = shards.read_progress(job.folder)
    start = share.Start(progress["documents"])
    if job.by_files and progress["documents"]:
        start = share.locate(job.sources, job.data, progress["documents"])
    return _Setup(plan, eos, dtype, len(tokenizer), progress, start)


@dataclass
class _Part:
    """A part being encoded: its file, its batches' arrays, its documents."""

    path: Path
    train: list[np.ndarray] = field(default_factory=list)
    held_out: list[np.ndarray] = field(default_factory=list)
    documents: int = 0


class _ShardSink:
    """One rank: its batches go straight into the shards."""

    def __init__(self, job: _Job, setup: _Setup):
        self.packers = shards.packers(
            job.folder, job.block_size, setup.dtype, setup.progress, job.options.shard_blocks
        )
        self.documents = setup.progress["documents"]
        self.progress_path = job.folder / "progress.json"
        self.parts_written = 0

    def add(self, batch: EncodedBatch, part: Path, ends_part: bool, index: int) -> bool:
        self.documents += batch.documents
        shards.pack(self.packers, batch.train, batch.held_out, self.documents, self.progress_path)
        return True

    def close(self) -> None:
        """Nothing waits: the packers keep the tokens short of a shard."""

    def failed(self, batch: int) -> None:
        """No other rank to tell."""


class _PartSink:
    """One of several ranks: its batches gathered into parts, each written to a file that the
    main rank merges; stops at the end of a part when another rank failed before it."""

    def __init__(self, job: _Job, setup: _Setup):
        self.job, self.dtype = job, setup.dtype
        self.stop = job.parts / STOP_FILE
        self.part: _Part | None = None
        self.parts_written = 0

    def add(self, batch: EncodedBatch, part: Path, ends_part: bool, index: int) -> bool:
        if self.part is not None and self.part.path != part:
            self._write()
        if self.part is None:
            self.part = _Part(part)
        self.part.train.append(batch.train)
        self.part.held_out.append(batch.held_out)
        self.part.documents += batch.documents
        if not ends_part:
            return True
        self._write()
        return not shards.stopped_before(self.stop, index)

    def close(self) -> None:
        if self.part is not None:
            self._write()

    def failed(self, batch: int) -> None:
        shards.leave_stop(self.stop, self.job.rank, batch)

    def _write(self) -> None:
        part, self.part = self.part, None
        shards.write_part(part.path, part.documents, part.train, part.held_out, self.dtype)
        self.parts_written += 1


def _new_status(rank: int) -> dict:
    return {
        "rank": rank,
        "failed": "",  # "mismatch", "error" or "stopped" (another rank failed)
        "batch": -1,
        "message": "",
        "lowlm": False,
        "documents_read": 0,  # from the start: the main rank's tells it the parts there are
        "documents": 0,
        "batches": 0,
        "parts_reused": 0,
        "by_hf": 0,
        "verified": 0,
    }


def _encode_share(job: _Job, setup: _Setup, sink) -> tuple[dict, BaseException | None]:
    """Encode this rank's batches into the sink; (its figures or failure, the exception)."""
    started = time.perf_counter()
    status = _new_status(job.rank)
    pending: deque[tuple[int, Path, bool, int]] = deque()
    sizes = {"read": 0, "encoded": 0}
    batches = (share.file_batches if job.by_files else share.stream_batches)(
        job, setup.start, status, pending, sizes
    )
    worker_args = (str(job.tokenizer_folder), job.seed, job.data.heldout_fraction, setup.plan)
    worker_args = (*worker_args, setup.eos, setup.dtype, job.options)
    pool = Pool(job.num_proc, init_worker, (*worker_args, True)) if job.num_proc > 1 else None
    if pool is None:
        init_worker(*worker_args)
    bar = _progress_bar(_read_by(job)) if job.main else None
    failure: BaseException | None = None
    finished = False
    try:
        encoded = pool.imap(encode_batch, batches) if pool else map(encode_batch, batches)
        for batch in encoded:
            index, part, ends_part, read = pending.popleft()
            if bar is not None:
                bar.update(read - bar.n)
            status["documents"] += batch.documents
            status["batches"] += int(batch.documents > 0)
            status["by_hf"] += batch.by_hf
            status["verified"] += batch.verified
            if not sink.add(batch, part, ends_part, index):  # another rank failed
                status.update(failed="stopped", message="another rank failed")
                break
        else:
            sink.close()
            if bar is not None and bar.total and bar.n < bar.total:
                bar.update(bar.total - bar.n)  # lines filtered out or stripped were read too
            finished = True
    except EncoderMismatch as exc:
        status.update(failed="mismatch", batch=exc.batch, message=str(exc), lowlm=True)
        sink.failed(exc.batch)
    except Exception as exc:
        failure = exc
        status.update(failed="error", message=_one_line(exc), lowlm=isinstance(exc, LowlmError))
        sink.failed(-1)
    finally:
        if bar is not None:
            bar.close()
        _close_pool(pool, finished)
    seconds = time.perf_counter() - started
    status.update(
        parts_written=sink.parts_written,
        mb_read=round(sizes["read"] / 1e6, 3),
        bytes=sizes["encoded"],
        mb=round(sizes["encoded"] / 1e6, 3),
        seconds=round(seconds, 2),
        mb_per_s=round(sizes["encoded"] / 1e6 / seconds, 3),
        peak_rss_mb=_peak_rss_mb(),
        peak_rss_mb_largest_child=_peak_rss_mb(children=True),
    )
    return status, failure


def _stop_on_failure(
    job: _Job, setup: _Setup, statuses: list[dict], failure: BaseException | None
) -> None:
    """Every rank raises when any failed: a mismatch's message (the first in the corpus: the
    one a single process would have met) after the main rank removed the build, else the
    error of this rank or of the first that failed."""
    mismatches = [s for s in statuses if s["failed"] == "mismatch"]
    if mismatches:
        message = min(mismatches, key=lambda s: s["batch"])["message"]
        try:
            if job.main:
                shards.discard(job.folder, setup.plan, message)
        finally:
            _barrier(job.ranks)  # the build is removed before any rank stops
        raise LowlmError(
            f"{message}. The build stopped and removed its shards (it trusted sentencepiece, "
            f"which a check had found exact); rerun to build {job.folder.name} with the HF "
            "tokenizer, and please report the document."
        )
    failed = [s for s in statuses if s["failed"]]
    if not failed:
        return
    if failure is not None:
        raise failure
    first = next((s for s in failed if s["failed"] == "error"), failed[0])
    if first["lowlm"]:
        raise LowlmError(first["message"])
    raise LowlmError(f"rank {first['rank']} stopped packing the corpus: {first['message']}")


def _finish_build(
    job: _Job, setup: _Setup, statuses: list[dict], sink, started: float
) -> tuple[str, dict]:
    """The main rank: the parts of several ranks merged in order, the last shards, meta.json."""
    merging = time.perf_counter()
    if job.ranks > 1:
        packers, documents = _merge_parts(job, setup, statuses)
    else:
        packers, documents = sink.packers, sink.documents
    statuses[0].update(
        peak_rss_mb=_peak_rss_mb(), peak_rss_mb_largest_child=_peak_rss_mb(children=True)
    )
    build = _build_record(job, setup, statuses, seconds=time.perf_counter() - started)
    if job.ranks > 1:
        build.update(
            parts_reused=sum(s["parts_reused"] for s in statuses),
            merge_seconds=round(time.perf_counter() - merging, 2),
            per_rank=[{key: s[key] for key in PER_RANK} for s in statuses],
        )
    meta = _finish(job, packers, setup, documents, build)
    _print_summary(build, setup.plan, children=job.num_proc > 1)
    return "ok", meta


def _merge_parts(
    job: _Job, setup: _Setup, statuses: list[dict]
) -> tuple[dict[str, shards.Packer], int]:
    """Every part in corpus order through the packers; each deleted once progress.json is
    past it. Returns the packers and the documents consumed."""
    packers = shards.packers(
        job.folder, job.block_size, setup.dtype, setup.progress, job.options.shard_blocks
    )
    documents = setup.progress["documents"]
    merged: list[Path] = []
    for path, owner, expected in _parts_in_order(job, setup, statuses):
        if not path.exists():
            raise LowlmError(
                f"{path}, the part of the corpus rank {owner} encoded, is missing; ranks on "
                "several nodes need the run directory on a filesystem they all share."
            )
        with np.load(path) as part:
            held = int(part["documents"])
            if expected is not None and held != expected:
                raise LowlmError(
                    f"{path} holds {held} documents, not {expected}; delete {job.parts} and rerun."
                )
            documents += held
            merged.append(path)
            progress_path = job.folder / "progress.json"
            if shards.pack(packers, part["train"], part["eval"], documents, progress_path):
                for done in merged:
                    done.unlink()
                merged = []
    return packers, documents


def _parts_in_order(job: _Job, setup: _Setup, statuses: list[dict]):
    """(path, the rank that encodes it, its documents when known) of every part, in corpus
    order: one per file from the start's on, or parts of part_documents from the start on."""
    start = setup.start
    if job.by_files:
        for number in range(start.source, len(job.sources)):
            skip = start.skip if number == start.source else 0
            yield share.file_part(job.parts, number, skip), share.owner(number, job.ranks), None
        return
    total = start.documents + statuses[0]["documents_read"]
    per_part = job.options.part_documents
    for first in range(start.documents, total, per_part):
        owner = (first - start.documents) // per_part % job.ranks
        yield shards.part_path(job.parts, first), owner, min(per_part, total - first)


def _build_record(job: _Job, setup: _Setup, statuses: list[dict], seconds: float) -> dict:
    """meta.json's "build": the encoder and why, MB/s in all and per encoding process (ranks
    times num_proc), peak memory (the largest rank's)."""
    plan, processes = setup.plan, job.ranks * job.num_proc
    mb = sum(s["bytes"] for s in statuses) / 1e6
    return {
        "encoder": plan.kind if plan.kind == "sentencepiece" or not plan.hf_fast else "hf-fast",
        "encoder_reason": plan.reason,
        "documents_encoded_by_hf": sum(s["by_hf"] for s in statuses),
        "batches_verified": sum(s["verified"] for s in statuses),
        "resumed_at_document": setup.progress["documents"],
        "ranks": job.ranks,
        "num_proc": job.num_proc,
        "processes": processes,
        "mb": round(mb, 3),
        "seconds": round(seconds, 2),
        "mb_per_s": round(mb / seconds, 3),
        "mb_per_s_per_process": round(mb / seconds / processes, 3),
        "peak_rss_mb": max(s["peak_rss_mb"] for s in statuses),
        "peak_rss_mb_largest_child": max(s["peak_rss_mb_largest_child"] for s in statuses),
    }


def _finish(job: _Job, packers: dict, setup: _Setup, documents: int, build: dict) -> dict:
    """Write the last shards and meta.json (the cache is then complete); returns the meta."""
    for packer in packers.values():
        packer.flush(final=True)
    train_blocks = shards.count_blocks(job.folder, "train", job.block_size, setup.dtype)
    eval_blocks = shards.count_blocks(job.folder, "eval", job.block_size, setup.dtype)
    if train_blocks == 0:
        raise LowlmError(
            f"the corpus gives fewer than {job.block_size} tokens for training; add text or "
            "lower pretrain.block_size."
        )
    meta = {
        "block_size": job.block_size,
        "dtype": np.dtype(setup.dtype).name,
        "train_blocks": train_blocks,
        "eval_blocks": eval_blocks,
        "documents": documents,
        "vocab_size": setup.vocab_size,
        "build": build,
    }
    atomic_write_json(job.folder / "meta.json", meta)
    shards.remove_build_leftovers(job.folder)
    return cache_description(meta)


def _print_summary(build: dict, plan: EncoderPlan, children: bool) -> None:
    ranks, num_proc = build["ranks"], build["num_proc"]
    processes = f"{num_proc} process" + ("es" if num_proc != 1 else "")
    if ranks > 1:
        processes = f"{ranks} ranks x {processes}"
    child = f", largest child {build['peak_rss_mb_largest_child']:.0f} MB" if children else ""
    largest = " (largest rank)" if ranks > 1 else ""
    print(
        f"packed {build['mb']:.1f} MB in {build['seconds']:.1f} s: {build['mb_per_s']:.2f} MB/s "
        f"({build['mb_per_s_per_process']:.2f} per process, {processes}) with the "
        f"{encoder_name(plan)}; peak memory{largest} {build['peak_rss_mb']:.0f} MB{child}"
    )


# Between ranks: messages through torch.distributed; with one rank, none is needed.


def _process_group() -> tuple[int, int]:
    """(rank, ranks) of this process under torch.distributed; (0, 1) when it runs alone."""
    dist = sys.modules.get("torch.distributed")  # never imported: not initialised either
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def _on_main(job: _Job, compute: Callable[[_Job], tuple[str, object]]) -> tuple[str, object]:
    """compute(job) on the main rank, its outcome on every rank; its error raised on all."""
    outcome, failure = None, None
    if job.main:
        try:
            outcome = compute(job)
        except Exception as exc:
            failure = exc
            outcome = ("error", _one_line(exc))
    if job.ranks > 1:
        import torch.distributed as dist

        box = [outcome]
        dist.broadcast_object_list(box, src=0)  # the other ranks wait here meanwhile
        outcome = box[0]
    if outcome[0] == "error":
        raise failure or LowlmError(outcome[1])
    return outcome


def _all_gather(status: dict, ranks: int) -> list[dict]:
    if ranks == 1:
        return [status]
    import torch.distributed as dist

    statuses: list = [None] * ranks
    dist.all_gather_object(statuses, status)
    return statuses


def _barrier(ranks: int) -> None:
    if ranks > 1:
        import torch.distributed as dist

        dist.barrier()


def _one_line(exc: BaseException) -> str:
    text = str(exc) if isinstance(exc, LowlmError) else f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())


def _close_pool(pool, finished: bool) -> None:
    """Let a finished pool's workers exit; stop those of an interrupted one."""
    if pool:
        if finished:
            pool.close()
        else:
            pool.terminate()
        pool.join()


def _read_by(job: _Job) -> list[Source]:
    """The sources this rank reads: its own files in a build shared by files, else all."""
    if not job.by_files:
        return job.sources
    return [s for i, s in enumerate(job.sources) if share.owner(i, job.ranks) == job.rank]


def _progress_bar(sources: list[Source]):
    """Bytes read, with rate and ETA: the total is known when every source is a plain text
    file (other formats' sizes are not their text's); otherwise bytes and rate alone."""
    from tqdm.auto import tqdm

    plain = all(s.path is not None and s.path.suffix in PLAIN_SUFFIXES for s in sources)
    total = sum(s.path.stat().st_size for s in sources) if plain else None
    return tqdm(
        total=total,
        desc="reading and packing the corpus",
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        dynamic_ncols=True,
    )


def _peak_rss_mb(children: bool = False) -> float:
    """Peak resident memory (getrusage) of this process, or of its largest finished child."""
    try:
        import resource
    except ImportError:  # not on this platform
        return 0.0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF)
    peak = peak.ru_maxrss
    return round(peak / 2**20 if sys.platform == "darwin" else peak / 2**10, 1)
