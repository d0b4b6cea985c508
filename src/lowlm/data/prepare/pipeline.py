"""The prepare pipeline as datatrove executor runs, in FineWeb-2's shape.

1. filter (tasks = input files): read -> language ID -> Han script (cmn_Hant / cmn_Hans) ->
   decontamination -> Gopher repetition -> FineWeb quality -> Gopher quality -> JSONL shards.
2. exact dedup: signatures (one task per shard) -> find duplicates (1 task).
3. MinHash: signatures (same reader and task count as the filter below) -> buckets (one task
   per bucket) -> clusters (1 task, cluster sizes kept).
3b. sentence dedup (optional): signatures of the documents the two filters keep -> find
   repeated spans (1 task).
4. write: the shards again -> exact filter -> MinHash filter -> sentence filter -> FTFY ->
   PII -> held-out mark -> rehydration (optional) -> counts -> parquet.
Each run has its own logging folder (completion markers, stats) inside a work folder named by
the stage's key, so a rerun after a kill skips finished tasks and a changed input never reuses
them. The same steps run under the local, Slurm or Ray executor.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup import (
    ExactDedupFilter,
    ExactDedupSignature,
    ExactFindDedups,
    MinhashDedupCluster,
    MinhashDedupFilter,
    MinhashDedupSignature,
)
from datatrove.pipeline.dedup.exact_dedup import ExactDedupConfig
from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupBuckets
from datatrove.pipeline.formatters import FTFYFormatter, PIIFormatter
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter, ParquetWriter
from datatrove.utils.hashing import HashConfig
from datatrove.utils.logging import setup_default_logger

from lowlm.data.corpus import TEXT_COLUMN_KEY
from lowlm.data.heldout import is_held_out
from lowlm.data.prepare import sentences
from lowlm.data.prepare.settings import ExecutorConfig
from lowlm.errors import LowlmError

MINHASH = MinhashConfig(  # FineWeb-2's settings
    hash_config=HashConfig(hash_fc="xxhash", precision=64),
    num_buckets=14,
    hashes_per_bucket=8,
    n_grams=5,
)


class TaskFailed(LowlmError):
    """A datatrove task raised: the work folder is kept (logs, finished tasks to resume)."""


def document_text(doc: Document) -> str:
    return doc.text


EXACT = ExactDedupConfig(content_getter=document_text)


class RemovedSamples(JsonlWriter):
    """The first `limit` removed documents of each reason, per task (the rest are counted in
    the stats, not kept)."""

    def __init__(self, folder: str, step: str, limit: int):
        super().__init__(folder, output_filename="${rank}.jsonl", compression=None)
        self.step, self.limit, self.count = step, limit, Counter()

    def write(self, document: Document, rank: int = 0, **kwargs):
        reason = f"{self.step}:{document.metadata.get('filter_reason', 'removed')}"
        self.count[reason] += 1
        if self.count[reason] <= self.limit:
            document.metadata["removed_by"] = reason
            super().write(document, rank, **kwargs)


class MarkHeldOut(PipelineStep):
    """Marks each kept document `heldout` by the run's rule (lowlm.data.heldout) on the text
    the corpus readers will see, so the corpus says which documents no stage trains on."""

    name = "🔒 held-out mark"
    type = "🏷 - LABEL"

    def __init__(self, seed: int, fraction: float, nfkc: bool):
        super().__init__()
        self.seed, self.fraction, self.nfkc = seed, fraction, nfkc

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1):
        import unicodedata

        for doc in data:
            text = unicodedata.normalize("NFKC", doc.text) if self.nfkc else doc.text
            doc.metadata["heldout"] = is_held_out(text.strip(), self.seed, self.fraction)
            self.stat_update("heldout" if doc.metadata["heldout"] else "train")
            yield doc


class Rehydrate(PipelineStep):
    """FineWeb-2's rehydration: a kept document written once per member of its MinHash
    cluster, at most `max_copies` times."""

    name = "💧 rehydrate"
    type = "🏷 - LABEL"

    def __init__(self, max_copies: int):
        super().__init__()
        self.max_copies = max_copies

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1):
        for doc in data:
            copies = min(int(doc.metadata.get("minhash_cluster_size", 1)), self.max_copies)
            self.stat_update("copies", value=copies)
            for _ in range(copies):
                yield doc


class CountWritten(PipelineStep):
    """Counts what the writer after it writes (documents, characters, UTF-8 bytes, held-out
    ones) for stats.json, which so needs no second read of the shards (that read's memory grew
    with the shards' size)."""

    name = "🧮 written"
    type = "🏷 - LABEL"

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1):
        for doc in data:
            self.stat_update("written_documents")
            self.stat_update("written_characters", value=len(doc.text))
            self.stat_update("written_bytes", value=len(doc.text.encode("utf-8")))
            self.stat_update("written_heldout", value=int(bool(doc.metadata.get("heldout"))))
            yield doc


def parquet_row(self, document: Document) -> dict:
    """One kept document as a row: text, id, its source, scores, cluster size, held-out flag,
    and every other field of the input row as JSON."""
    meta = dict(document.metadata)
    row = {"text": document.text, "id": str(document.id)}
    row["source"] = str(meta.pop("source", ""))
    row["language_score"] = float(meta.pop("language_score", 0.0))
    row["target_language_score"] = float(meta.pop("target_language_score", 0.0))
    row["minhash_cluster_size"] = int(meta.pop("minhash_cluster_size", 1))
    row["heldout"] = bool(meta.pop("heldout", False))
    meta.pop("file_path", None)
    row["metadata"] = json.dumps(meta, ensure_ascii=False, default=str)
    return row


@dataclass
class Phase:
    name: str
    steps: list
    tasks: int
    seconds: float = 0.0
    stats: list = field(default_factory=list)


class Runner:
    """Runs phases with the configured executor, each logging into work/logs/<phase>."""

    def __init__(self, executor: ExecutorConfig, work: Path, progress_every: float = 30.0):
        self.executor, self.work, self.progress_every = executor, work, progress_every
        self.phases: list[Phase] = []

    def run(self, name: str, steps: list, tasks: int, task_bytes: list[int] | None = None) -> Phase:
        """Run one phase; while it runs, a line every `progress_every` seconds says how many
        tasks, documents and input MB are done (task_bytes: the input bytes of each task)."""
        phase = Phase(name, steps, max(tasks, 1))
        logs = self.work / "logs" / name
        started = time.time()
        executor = self._executor(phase, logs)
        stop = threading.Event()
        progress = (phase, logs, task_bytes, started, stop, self.progress_every)
        threading.Thread(target=_report_progress, args=progress, daemon=True).start()
        try:
            with _datatrove_logs_to(self.work / "datatrove.log"):
                executor.run()
            if self.executor.kind == "slurm":
                _wait_for_slurm(executor)
            elif self.executor.kind == "ray":
                _check_ray_tasks(executor)
        except Exception as exc:  # noqa: BLE001 - a task's failure, reported in one line
            raise TaskFailed(
                f"prepare's {name} step failed in a task ({type(exc).__name__}: {exc}); its log is "
                f"in {logs / 'logs'}, and a rerun resumes from the tasks that finished."
            ) from None
        finally:
            stop.set()
        phase.seconds = time.time() - started
        phase.stats = _merged_stats(logs)
        self.phases.append(phase)
        return phase

    def _executor(self, phase: Phase, logs: Path):
        cfg = self.executor
        if cfg.kind == "local":
            from datatrove.executor import LocalPipelineExecutor

            cores = cfg.workers or os.cpu_count() or 1
            return LocalPipelineExecutor(
                phase.steps,
                tasks=phase.tasks,
                workers=min(cores, phase.tasks),
                logging_dir=str(logs),
            )
        if cfg.kind == "ray":
            try:
                import ray
                from datatrove.executor import RayPipelineExecutor
            except ImportError:
                raise LowlmError(
                    "prepare.executor kind ray needs Ray: pip install 'lowlm[ray]' "
                    "(datatrove[ray])."
                ) from None
            if not ray.is_initialized():  # else: the Ray the caller started (and stops)
                ray.init(address=cfg.address, log_to_driver=False)  # task logs: logs/<phase>
            with _datatrove_logs_to(self.work / "datatrove.log"):  # its shared-folder warning
                return RayPipelineExecutor(
                    phase.steps,
                    tasks=phase.tasks,
                    logging_dir=str(logs),
                    cpus_per_task=cfg.cpus_per_task,
                    mem_per_cpu_gb=cfg.mem_per_cpu_gb,
                )
        from datatrove.executor import SlurmPipelineExecutor

        if not cfg.partition:
            raise LowlmError("prepare.executor kind slurm needs a partition; set it.")
        return SlurmPipelineExecutor(
            phase.steps,
            tasks=phase.tasks,
            time=cfg.time,
            partition=cfg.partition,
            cpus_per_task=cfg.cpus_per_task,
            mem_per_cpu_gb=cfg.mem_per_cpu_gb,
            job_name=f"lowlm-prepare-{phase.name}",
            logging_dir=str(logs),
            slurm_logs_folder=str(Path(cfg.logs) / phase.name) if cfg.logs else None,
            venv_path=str(Path(sys.prefix) / "bin" / "activate"),
            # datatrove writes f"{gb}G", which sbatch refuses for a float ("2.0G"): megabytes
            sbatch_args={"mem-per-cpu": f"{round(cfg.mem_per_cpu_gb * 1024)}M"},
        )


def _report_progress(phase: Phase, logs: Path, task_bytes, started: float, stop, every) -> None:
    """Every `every` seconds until `stop`: tasks done, and the documents and input MB of the
    finished tasks (their stats files)."""
    while not stop.wait(every):
        done = sorted((logs / "stats").glob("*.json")) if (logs / "stats").is_dir() else []
        documents = 0
        for file in done:
            with contextlib.suppress(OSError, ValueError, IndexError, KeyError):
                documents += int(
                    json.loads(file.read_text(encoding="utf-8"))[0]["stats"].get("documents", 0)
                )
        line = f"prepare: {phase.name}: {len(done)} of {phase.tasks} tasks done"
        if task_bytes:
            megabytes = sum(task_bytes[int(f.stem)] for f in done if int(f.stem) < len(task_bytes))
            rate = megabytes / 1e6 / max(time.time() - started, 1e-9)
            line += f", {documents:,} documents, {megabytes / 1e6:.1f} MB ({rate:.2f} MB/s)"
        print(line, flush=True)


def _wait_for_slurm(executor, poll: float = 5.0) -> None:
    """Slurm jobs are submitted, not run: wait until every task has its completion marker, or
    fail once the job array has left the queue with tasks unfinished."""
    while executor.get_incomplete_ranks(skip_completed=True):
        if executor.job_id not in (None, -1) and not _slurm_job_queued(executor.job_id):
            failed = executor.get_incomplete_ranks(skip_completed=True)  # a last look
            if failed:
                raise RuntimeError(
                    f"Slurm job {executor.job_id} ended with {len(failed)} of "
                    f"{executor.world_size} tasks unfinished (first: rank {failed[0]})"
                )
        time.sleep(poll)


def _slurm_job_queued(job_id) -> bool:
    """Whether any task of the job array is still pending or running (squeue lists them)."""
    listed = subprocess.run(["squeue", "-h", "-j", str(job_id)], capture_output=True, text=True)
    return listed.returncode == 0 and bool(listed.stdout.strip())


def _check_ray_tasks(executor) -> None:
    """datatrove's Ray executor only logs a warning when a task fails: fail the phase here."""
    failed = executor.get_incomplete_ranks(skip_completed=True)
    if failed:
        raise RuntimeError(
            f"{len(failed)} of {executor.world_size} Ray tasks did not complete (first: rank "
            f"{failed[0]})"
        )


def _merged_stats(logs: Path) -> list[dict]:
    """Per step, datatrove's stats summed over the tasks (stats/<rank>.json)."""
    from datatrove.utils.stats import PipelineStats

    total = PipelineStats()
    for file in sorted((logs / "stats").glob("*.json")):
        total = total + PipelineStats.from_json(json.loads(file.read_text(encoding="utf-8")))
    return [stat.to_dict() for stat in total.stats]


@contextlib.contextmanager
def _datatrove_logs_to(path: Path):
    """datatrove logs every task to stderr; send that (the file descriptor of worker processes,
    and sys.stderr of tasks run in this process) to a file: the stage prints its own progress
    lines. stderr is restored afterwards."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "a", encoding="utf-8") as log:
        os.dup2(log.fileno(), 2)
        try:
            with contextlib.redirect_stderr(log):
                yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            setup_default_logger()  # datatrove's default sink: the restored stderr, not the file


def shard_reader(folder: Path) -> JsonlReader:
    return JsonlReader(str(folder), glob_pattern="*.jsonl.gz", text_key="text", id_key="id")


def shard_count(folder: Path) -> int:
    return len(list(folder.glob("*.jsonl.gz"))) if folder.is_dir() else 0


def dedup_phases(runner: Runner, filtered: Path, work: Path, tokenizer, dedup) -> list:
    """Run the exact and MinHash finding phases; returns the filters the write phase applies
    (given an exclusion writer factory)."""
    shards = shard_count(filtered)
    filters = []
    if dedup.exact:
        signature = ExactDedupSignature(str(work / "exact-sigs"), EXACT)
        runner.run("exact-signatures", [shard_reader(filtered), signature], shards)
        runner.run(
            "exact-find",
            [ExactFindDedups(str(work / "exact-sigs"), str(work / "exact-dups"), EXACT)],
            1,
        )
        filters.append(
            lambda writer: ExactDedupFilter(str(work / "exact-dups"), EXACT, writer("exact"))
        )
    if dedup.minhash:
        before = [shard_reader(filtered), *(f(lambda _: None) for f in filters)]
        signature = MinhashDedupSignature(str(work / "mh-sigs"), MINHASH, language=tokenizer)
        runner.run("minhash-signatures", [*before, signature], shards)
        buckets = MinhashDedupBuckets(
            str(work / "mh-sigs"), str(work / "mh-buckets"), config=MINHASH
        )
        runner.run("minhash-buckets", [buckets], MINHASH.num_buckets)
        cluster = MinhashDedupCluster(
            str(work / "mh-buckets"), str(work / "mh-remove"), MINHASH, save_cluster_size=True
        )
        runner.run("minhash-cluster", [cluster], 1)
        filters.append(
            lambda writer: MinhashDedupFilter(
                str(work / "mh-remove"), writer("minhash"), load_cluster_sizes=True
            )
        )
    if dedup.sentences:  # on the documents the filters above keep, in the same order
        before = [shard_reader(filtered), *(f(lambda _: None) for f in filters)]
        filters.append(sentences.sentence_phases(runner, before, shards, work, tokenizer, dedup))
    return filters


def final_touches(pii: bool) -> list:
    """FineWeb-2's last formatters: FTFY (mojibake and broken Unicode), then PII."""
    return [FTFYFormatter(), *([PIIFormatter()] if pii else [])]


def output_writer(folder: Path) -> ParquetWriter:
    """The kept documents' shards, their schema naming the text column for tokenize and
    pretrain (lowlm.data.corpus reads it instead of data.text_field)."""
    import pyarrow as pa

    columns = [("text", pa.string()), ("id", pa.string()), ("source", pa.string())]
    columns += [("language_score", pa.float64()), ("target_language_score", pa.float64())]
    columns += [("minhash_cluster_size", pa.int64()), ("heldout", pa.bool_())]
    columns += [("metadata", pa.string())]
    schema = pa.schema(columns, metadata={TEXT_COLUMN_KEY: b"text"})
    return ParquetWriter(
        str(folder), output_filename="${rank}.parquet", adapter=parquet_row, schema=schema
    )
