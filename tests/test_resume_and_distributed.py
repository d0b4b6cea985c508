"""A SIGKILLed run resumes to the same result; two gloo ranks match one process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from lowlm.config import load_config
from lowlm.models.load import load_model
from lowlm.stages import init, pretrain, tokenize

from .conftest import pipeline_config

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def make_run(tmp_path: Path, name: str, **pretrain_section) -> Path:
    """Tokenize and init a tiny from-scratch run; return its config path."""
    raw = pipeline_config(None, init={"size": "tiny"}, pretrain=pretrain_section)
    raw["run"] = {"name": name, "root": str(tmp_path / "runs")}
    raw["tokenize"]["num_threads"] = 1
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    config = load_config(path)
    tokenize.run(config)
    init.run(config)
    return path


def final_log(run_dir: Path) -> dict:
    lines = (run_dir / "pretrain-full" / "log.jsonl").read_text().splitlines()
    return json.loads(lines[-1])


def state(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_model(run_dir / "pretrain-full").state_dict()


def test_run_killed_with_sigkill_resumes_to_the_same_loss(tmp_path):
    settings = dict(full={"steps": 240, "lr": 3e-3}, save_every=20, log_every=20, eval_every=80)
    whole = make_run(tmp_path, "whole", **settings)
    killed = make_run(tmp_path, "killed", **settings)
    # Every training run is a fresh process with one thread, so float results can be equal.
    command = [sys.executable, "-m", "lowlm.cli", "pretrain"]
    subprocess.run([*command, str(whole)], env=ENV, check=True, capture_output=True)
    process = subprocess.Popen(
        [*command, str(killed)], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    checkpoints = tmp_path / "runs" / "killed" / ".pretrain-full.train" / "checkpoints"
    deadline = time.time() + 120
    while not (checkpoints / "step-40" / "state.json").exists():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "runs" / "killed" / "pretrain-full").exists()
    manifest = json.loads((tmp_path / "runs" / "killed" / "manifest.json").read_text())
    assert manifest["stages"]["pretrain-full"]["status"] == "running"

    resumed = subprocess.run(
        [*command, str(killed)], env=ENV, check=True, capture_output=True, text=True
    )  # resumes from the newest checkpoint by default
    assert "resuming from" in resumed.stdout and "step-40" in resumed.stdout
    log = (tmp_path / "runs" / "killed" / "pretrain-full" / "log.jsonl").read_text()
    assert json.loads(log.splitlines()[0])["step"] == 20  # the log before the kill is kept
    a, b = final_log(tmp_path / "runs" / "whole"), final_log(tmp_path / "runs" / "killed")
    assert a["step"] == b["step"] == 240
    assert b["loss"] == pytest.approx(a["loss"], abs=1e-6)
    assert b["eval_loss"] == pytest.approx(a["eval_loss"], abs=1e-6)
    for name, tensor in state(tmp_path / "runs" / "whole").items():
        torch.testing.assert_close(
            state(tmp_path / "runs" / "killed")[name], tensor, atol=1e-6, rtol=0
        )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(
    shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None,
    reason="torchrun is not installed beside this Python",
)
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path):
    one = make_run(tmp_path, "one", full={"steps": 12, "lr": 3e-3}, batch_size=4, log_every=4)
    two = make_run(tmp_path, "two", full={"steps": 12, "lr": 3e-3}, batch_size=2, log_every=4)
    tokenizers = [
        (tmp_path / "runs" / n / "tokenizer" / "tokenizer.json").read_bytes()
        for n in ("one", "two")
    ]
    assert tokenizers[0] == tokenizers[1]
    pretrain.run(load_config(one))
    torchrun = Path(sys.executable).parent / "torchrun"
    result = subprocess.run(
        [
            str(torchrun),
            "--nproc_per_node",
            "2",
            "--master_port",
            str(_free_port()),
            "-m",
            "lowlm.cli",
            "pretrain",
            str(two),
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "runs" / "two" / "manifest.json").read_text())
    assert record["stages"]["pretrain-full"]["metrics"]["world_size"] == 2
    a, b = final_log(tmp_path / "runs" / "one"), final_log(tmp_path / "runs" / "two")
    assert b["loss"] == pytest.approx(a["loss"], abs=1e-4)
    assert b["eval_loss"] == pytest.approx(a["eval_loss"], abs=1e-4)


@pytest.mark.skipif(
    shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None,
    reason="torchrun is not installed beside this Python",
)
def test_lowlm_run_under_two_ranks_builds_every_stage_once(tmp_path):
    """tokenize and init run on the main rank while the other waits; stage 1 of a from-scratch
    model does not exist, so full then export; no rank races ahead of a stage's record."""
    raw = pipeline_config(
        None,
        init={"size": "tiny"},
        pretrain={"full": {"steps": 2}, "stage2": {"steps": 2, "lora": {"r": 2, "alpha": 4}}},
    )
    raw["run"] = {"name": "ranks", "root": str(tmp_path / "runs")}
    raw["tokenize"]["num_threads"] = 1
    path = tmp_path / "ranks.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    torchrun = Path(sys.executable).parent / "torchrun"
    command = [str(torchrun), "--nproc_per_node", "2", "--master_port", str(_free_port())]
    result = subprocess.run(
        [*command, "-m", "lowlm.cli", "run", str(path)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    stages = json.loads((tmp_path / "runs" / "ranks" / "manifest.json").read_text())["stages"]
    expected = ["tokenize", "init", "pretrain-stage2", "pretrain-full", "export"]
    assert list(stages) == expected
    assert all(stages[s]["status"] == "done" for s in expected)
    assert stages["pretrain-full"]["metrics"]["world_size"] == 2
    assert result.stdout.count("tokenize: ") == 1  # one rank did the work


def test_a_checkpoint_that_needs_unpickling_code_is_refused_not_run(tmp_path):
    """Resume loads optimizer, scheduler and RNG state with weights_only=True: a run directory
    copied from someone else cannot run code on this machine."""
    path = make_run(tmp_path, "evil", full={"steps": 6}, save_every=2)
    config = load_config(path)
    pretrain.run(config, resume=False)
    work = tmp_path / "runs" / "evil"
    # a killed run leaves its checkpoints in .pretrain-full.train; plant one with a payload
    done = work / "pretrain-full" / "checkpoints"
    target = work / ".pretrain-full.train" / "checkpoints"
    shutil.copytree(done, target)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    for checkpoint in target.iterdir():
        torch.save({"python": Payload()}, checkpoint / "rng-0.pt")
    manifest = json.loads((work / "manifest.json").read_text())
    manifest["stages"]["pretrain-full"]["status"] = "failed"  # as if it had been killed
    (work / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(Exception, match="only unpickling code could restore"):
        pretrain.run(config)
    assert not marker.exists()
