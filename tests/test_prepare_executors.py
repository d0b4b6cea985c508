"""`lowlm prepare` on datatrove's Ray executor, against the local executor on the same inputs."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from .conftest import EN_LINES, ZH_LINES, blocks, invoke, prepare_config, write_text

pytestmark = pytest.mark.slow


def _without_times(stats: dict) -> dict:
    """stats.json less its wall-clock fields (the whole run's and each phase's seconds)."""
    stats = {k: v for k, v in stats.items() if k not in ("seconds", "finished")}
    stats["phases"] = {name: phase["tasks"] for name, phase in stats["phases"].items()}
    return stats


def _prepare(write_config, tmp_path, inputs, name: str, executor: dict) -> tuple[list, dict]:
    """Run `lowlm prepare` as run `name`; its kept rows (sorted by id) and its stats.json."""
    path = prepare_config(write_config, inputs, {"run": {"name": name}}, executor=executor)
    result = invoke("prepare", path)
    assert result.exit_code == 0, result.output
    corpus = tmp_path / "runs" / name / "corpus"
    rows = [
        row
        for shard in sorted(corpus.glob("*.parquet"))
        for row in pq.read_table(shard).to_pylist()
    ]
    stats = json.loads((corpus / "stats.json").read_text(encoding="utf-8"))
    return sorted(rows, key=lambda row: row["id"]), stats


@pytest.fixture
def local_ray():
    if importlib.util.find_spec("ray") is None:
        pytest.skip("ray is not installed (pip install 'lowlm[ray]')")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _corpus(tmp_path) -> list:
    """Two input files (two filter tasks): target-language blocks, English blocks, exact copies."""
    zh = blocks(ZH_LINES, 6, 40)
    first = write_text(tmp_path / "a.txt", zh[:20] + blocks(EN_LINES, 4, 8) + zh[:4])
    second = write_text(tmp_path / "b.txt", zh[20:] + blocks(EN_LINES, 4, 8, start=40) + zh[20:24])
    return [first, second]


def test_ray_keeps_the_same_documents_and_stats_as_local(write_config, tmp_path, local_ray):
    inputs = _corpus(tmp_path)
    local_rows, local_stats = _prepare(write_config, tmp_path, inputs, "local", {"workers": 1})
    ray_rows, ray_stats = _prepare(write_config, tmp_path, inputs, "ray", {"kind": "ray"})
    assert ray_stats["funnel"][0]["documents"] == 2 * 32
    assert 0 < len(ray_rows) < 64  # languages and copies removed, documents kept
    assert [r["id"] for r in ray_rows] == [r["id"] for r in local_rows]
    assert ray_rows == local_rows
    assert _without_times(ray_stats) == _without_times(local_stats)
    # every task of every phase ran on Ray: datatrove gives each task its placement group
    tasks = sum(phase["tasks"] for phase in ray_stats["phases"].values())
    assert len(local_ray.util.placement_group_table()) == tasks


def test_a_failed_ray_task_fails_the_phase_with_its_log_folder(tmp_path, local_ray):
    from lowlm.data.prepare.pipeline import Runner, TaskFailed, shard_reader
    from lowlm.data.prepare.settings import ExecutorConfig

    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "00000.jsonl.gz").write_bytes(b"not gzip")  # the reader raises inside the task
    (tmp_path / "work").mkdir()
    runner = Runner(ExecutorConfig(kind="ray"), tmp_path / "work")
    with pytest.raises(TaskFailed, match=r"1 of 1 Ray tasks did not complete.*logs/read/logs"):
        runner.run("read", [shard_reader(shards)], 1)
    assert (tmp_path / "work" / "logs" / "read" / "logs" / "task_00000.log").exists()


def test_the_cli_starts_its_own_ray_when_none_runs(write_config, tmp_path):
    if importlib.util.find_spec("ray") is None:
        pytest.skip("ray is not installed (pip install 'lowlm[ray]')")
    inputs = _corpus(tmp_path)[:1]
    local_rows, _ = _prepare(write_config, tmp_path, inputs, "local", {"workers": 1})
    path = prepare_config(write_config, inputs, {"run": {"name": "ray"}}, executor={"kind": "ray"})
    command = [sys.executable, "-m", "lowlm.cli", "prepare", str(path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_ADDRESS": ""}  # no cluster to join
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "prepare: kept" in result.stdout
    assert "datatrove." not in result.stdout + result.stderr  # its logs go to the log folder
    corpus = tmp_path / "runs" / "ray" / "corpus"
    ids = sorted(r["id"] for s in corpus.glob("*.parquet") for r in pq.read_table(s).to_pylist())
    assert ids == [r["id"] for r in local_rows]


@pytest.fixture
def slurm_log(monkeypatch):
    """A single-node Slurm with partition `lowlm`; yields its controller's log."""
    from . import slurm_cluster

    reason = slurm_cluster.missing_reason()
    if reason:
        pytest.skip(reason)
    folder = Path(tempfile.mkdtemp(prefix="lowlm-slurm-"))  # short: it holds munge's socket
    try:
        monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.start(folder, "lowlm")))
        yield folder / "slurmctld.log"
    finally:
        slurm_cluster.stop(folder)
        shutil.rmtree(folder, ignore_errors=True)


def test_slurm_keeps_the_same_documents_and_stats_as_local(write_config, tmp_path, slurm_log):
    inputs = _corpus(tmp_path)
    local_rows, local_stats = _prepare(write_config, tmp_path, inputs, "local", {"workers": 1})
    executor = {"kind": "slurm", "partition": "lowlm", "mem_per_cpu_gb": 1.5}
    slurm_rows, slurm_stats = _prepare(write_config, tmp_path, inputs, "slurm", executor)
    assert 0 < len(slurm_rows) < 64
    assert slurm_rows == local_rows
    assert _without_times(slurm_stats) == _without_times(local_stats)
    # every task of every phase ran as a Slurm job array element (and datatrove's stats merges)
    tasks = sum(phase["tasks"] for phase in slurm_stats["phases"].values())
    assert slurm_log.read_text().count("WEXITSTATUS 0") >= tasks


def test_a_failed_slurm_task_fails_the_phase_instead_of_waiting(tmp_path, slurm_log):
    from lowlm.data.prepare.pipeline import Runner, TaskFailed, shard_reader
    from lowlm.data.prepare.settings import ExecutorConfig

    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "00000.jsonl.gz").write_bytes(b"not gzip")  # the reader raises inside the task
    (tmp_path / "work").mkdir()
    runner = Runner(ExecutorConfig(kind="slurm", partition="lowlm"), tmp_path / "work")
    with pytest.raises(TaskFailed, match=r"ended with 1 of 1 tasks unfinished"):
        runner.run("read", [shard_reader(shards)], 1)
