"""A SIGKILLed run resumes to the same result; two gloo ranks match one process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lowlm.config import load_config
from lowlm.errors import LowlmError
from lowlm.models.load import load_model
from lowlm.stages import init, pretrain, tokenize

from .conftest import ENV, free_port, make_tiny_run, pipeline_config


def final_log(run_dir: Path) -> dict:
    lines = (run_dir / "pretrain-full" / "log.jsonl").read_text().splitlines()
    return json.loads(lines[-1])


def state(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_model(run_dir / "pretrain-full").state_dict()


@pytest.mark.slow
def test_run_killed_with_sigkill_resumes_to_the_same_loss(tmp_path, make_run):
    settings = dict(full={"steps": 240, "lr": 3e-3}, save_every=20, log_every=20, eval_every=80)
    whole = make_run("whole", **settings)
    killed = make_run("killed", **settings)
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


needs_torchrun = pytest.mark.skipif(
    shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None,
    reason="torchrun is not installed beside this Python",
)


def two_ranks(*args: str) -> subprocess.CompletedProcess:
    """`lowlm ARGS` under torchrun with two gloo processes on this CPU."""
    torchrun = Path(sys.executable).parent / "torchrun"
    command = [str(torchrun), "--nproc_per_node", "2", "--master_port", str(free_port())]
    return subprocess.run(
        [*command, "-m", "lowlm.cli", *args], env=ENV, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
@needs_torchrun
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path, make_run):
    one = make_run("one", full={"steps": 12, "lr": 3e-3}, batch_size=4, log_every=4)
    two = make_run("two", full={"steps": 12, "lr": 3e-3}, batch_size=2, log_every=4)
    tokenizers = [
        (tmp_path / "runs" / n / "tokenizer" / "tokenizer.json").read_bytes()
        for n in ("one", "two")
    ]
    assert tokenizers[0] == tokenizers[1]
    pretrain.run(load_config(one))
    result = two_ranks("pretrain", str(two))
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "runs" / "two" / "manifest.json").read_text())
    assert record["stages"]["pretrain-full"]["metrics"]["world_size"] == 2
    a, b = final_log(tmp_path / "runs" / "one"), final_log(tmp_path / "runs" / "two")
    assert b["loss"] == pytest.approx(a["loss"], abs=1e-4)
    assert b["eval_loss"] == pytest.approx(a["eval_loss"], abs=1e-4)


@pytest.mark.slow
@needs_torchrun
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
    result = two_ranks("run", str(path))
    assert result.returncode == 0, result.stderr[-3000:]
    stages = json.loads((tmp_path / "runs" / "ranks" / "manifest.json").read_text())["stages"]
    expected = ["tokenize", "init", "pretrain-stage2", "pretrain-full", "export"]
    assert list(stages) == expected
    assert all(stages[s]["status"] == "done" for s in expected)
    assert stages["pretrain-full"]["metrics"]["world_size"] == 2
    assert result.stdout.count("tokenize: ") == 1  # one rank did the work


@pytest.mark.slow
def test_a_checkpoint_that_needs_unpickling_code_is_refused_not_run(tmp_path, make_run):
    """Resume loads optimizer, scheduler and RNG state with weights_only=True: a run directory
    copied from someone else cannot run code on this machine."""
    path = make_run("evil", full={"steps": 6}, save_every=2)
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

    manifest = json.loads((work / "manifest.json").read_text())
    manifest["stages"]["pretrain-full"]["status"] = "failed"  # as if it had been killed
    (work / "manifest.json").write_text(json.dumps(manifest))
    for name in ("random_states_0.pkl", "optimizer.bin", "scheduler.pt"):
        shutil.rmtree(target)
        shutil.copytree(done, target)
        for checkpoint in target.iterdir():
            torch.save({"python": Payload()}, checkpoint / name)
        with pytest.raises(LowlmError, match="only unpickling code could restore"):
            pretrain.run(config)
        assert not marker.exists(), name


def _lora_run(tmp_path: Path, name: str, batch_size: int, dropout: float) -> Path:
    """A from-scratch tiny model, LoRA stage 2 on it, then SFT (packed) on the result."""
    lora = {"r": 2, "alpha": 4, "dropout": dropout}
    raw = pipeline_config(
        None,
        init={"size": "tiny"},
        pretrain={"stage2": {"steps": 6, "lr": 3e-3, "lora": lora}, "batch_size": batch_size},
        sft={
            "data": [str(Path(__file__).parent.parent / "data" / "demo" / "instructions.jsonl")],
            "steps": 6,
            "lr": 3e-3,
            "batch_size": batch_size,
            "max_length": 256,
            "lora": lora,
            "log_every": 2,
            "save_every": 2,
            "energy": {"enabled": False},
        },
    )
    raw["run"] = {"name": name, "root": str(tmp_path / "runs")}
    raw["tokenize"]["num_threads"] = 1
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    return path


def _last_loss(run_dir: Path, stage: str) -> dict:
    return json.loads((run_dir / stage / "log.jsonl").read_text().splitlines()[-1])


@pytest.mark.slow
@needs_torchrun
def test_lora_stage2_and_packed_sft_train_the_same_on_two_ranks_as_on_one(tmp_path):
    """The same global batch split over two gloo ranks: the same losses, the same adapters.
    SFT's packed blocks hold unequal numbers of target tokens, so this also checks that the
    loss is the mean over the global batch's tokens, not a mean of per-rank means."""
    one = _lora_run(tmp_path, "one", batch_size=4, dropout=0.0)
    two = _lora_run(tmp_path, "two", batch_size=2, dropout=0.0)
    subprocess.run(
        [sys.executable, "-m", "lowlm.cli", "run", str(one)], env=ENV, check=True, timeout=300
    )
    result = two_ranks("run", str(two))
    assert result.returncode == 0, result.stderr[-3000:]
    for stage in ("pretrain-stage2", "sft"):
        a = _last_loss(tmp_path / "runs" / "one", stage)
        b = _last_loss(tmp_path / "runs" / "two", stage)
        assert a["step"] == b["step"] == 6
        assert b["loss"] == pytest.approx(a["loss"], abs=2e-5), stage
        adapters = [
            load_file(str(tmp_path / "runs" / n / stage / "adapter_model.safetensors"))
            for n in ("one", "two")
        ]
        assert adapters[0].keys() == adapters[1].keys()
        for key, tensor in adapters[0].items():
            torch.testing.assert_close(adapters[1][key], tensor, atol=1e-4, rtol=1e-3)


@pytest.mark.slow
def test_lora_stage2_and_sft_resumed_from_a_checkpoint_match_the_whole_run(tmp_path):
    """LoRA dropout on: the resumed run continues the RNG as well as weights, optimizer and
    schedule (accelerate's save_state / load_state, the frozen base left out)."""
    from lowlm.stages import export, sft

    path = _lora_run(tmp_path, "whole", batch_size=2, dropout=0.1)
    config = load_config(path)
    tokenize.run(config)
    init.run(config)
    work = tmp_path / "runs" / "whole"
    for stage, run in (
        ("pretrain-stage2", lambda: pretrain.run(config, "2")),
        ("sft", lambda: sft.run(config)),
    ):
        run()
        whole = _last_loss(work, stage)
        finished = load_file(str(work / stage / "adapter_model.safetensors"))
        checkpoint = work / stage / "checkpoints" / "step-4"
        saved = load_file(str(checkpoint / "model.safetensors"))
        # the trained weights only: no copy of the frozen base
        assert saved and all("lora_" in k or "trainable_tokens" in k for k in saved)
        # As if killed after step 4: the checkpoint in the stage's work folder, no output.
        target = work / f".{stage}.train" / "checkpoints"
        target.mkdir(parents=True)
        shutil.copytree(checkpoint, target / "step-4")
        shutil.rmtree(work / stage)
        manifest = json.loads((work / "manifest.json").read_text())
        manifest["stages"][stage]["status"] = "failed"
        (work / "manifest.json").write_text(json.dumps(manifest))
        run()
        resumed = _last_loss(work, stage)
        assert resumed["step"] == 6, stage
        assert resumed["loss"] == pytest.approx(whole["loss"], abs=1e-6), stage
        for key, tensor in load_file(str(work / stage / "adapter_model.safetensors")).items():
            torch.testing.assert_close(tensor, finished[key], atol=1e-6, rtol=0)
        if stage == "pretrain-stage2":
            export.run(config)  # sft tunes the merged model


@pytest.fixture(scope="module")
def trained_other(tmp_path_factory, tokenized_runs) -> Path:
    """A folder holding other.yaml and its run, trained 4 steps with checkpoints at steps 2
    and 4, for each test to copy."""
    folder = tmp_path_factory.mktemp("trained-other")
    path = make_tiny_run(folder, tokenized_runs, "other", full={"steps": 4}, save_every=2)
    pretrain.run(load_config(path), resume=False)
    return folder


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"format": 1}, "written by an older lowlm in another layout"),
        ({"world_size": 2}, "resume with the same launch configuration"),
        ({"compiled": True}, "was written with compile on"),
    ],
)
def test_a_checkpoint_from_another_setup_is_refused_before_training(
    tmp_path, edit, message, trained_other
):
    shutil.copytree(trained_other, tmp_path, dirs_exist_ok=True)  # file times kept: still done
    path = tmp_path / "other.yaml"
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    raw["run"]["root"] = str(tmp_path / "runs")
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    config = load_config(path)
    work = tmp_path / "runs" / "other"
    target = work / ".pretrain-full.train" / "checkpoints"
    shutil.copytree(work / "pretrain-full" / "checkpoints", target)
    for checkpoint in target.iterdir():
        state = json.loads((checkpoint / "state.json").read_text())
        (checkpoint / "state.json").write_text(json.dumps({**state, **edit}))
    manifest = json.loads((work / "manifest.json").read_text())
    manifest["stages"]["pretrain-full"]["status"] = "failed"  # as if it had been killed
    (work / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LowlmError, match=message):
        pretrain.run(config)
