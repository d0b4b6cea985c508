"""FSDP2 through accelerate on two gloo CPU ranks: checkpoints, resume and the exported model.

accelerate turns its FSDP plugin on only over GPU-like distributed types: with `cpu=True`
(what lowlm asks for on a machine without CUDA) AcceleratorState.__init__ in
accelerate/state.py leaves the type MULTI_CPU, and the run is plain DDP. torch's FSDP2
(`fully_shard`) itself runs on a gloo CPU mesh, so these runs go through
tests/_fsdp_launch.py, which adds MULTI_CPU to that one switch and changes nothing else:
`accelerate launch --config_file configs/accelerate/fsdp.yaml` (the shipped config, with two
processes and fp32) sets the FSDP variables; accelerate's own prepare wraps the model with
fully_shard, save_state / load_state go through its FSDP2 code (torch.distributed.checkpoint
folders for SHARDED_STATE_DICT, rank 0's gathered files for FULL_STATE_DICT), get_state_dict
gathers the whole model, and lowlm's loop runs on top unchanged.

What the runs guard:
- the loop clips the parameters accelerator.prepare made (fully_shard replaces every
  parameter with a DTensor one), with the DTensor norm made whole;
- stage 1's new_rows_only mask looks the weights up at each step and masks the rows of
  each rank's shard;
- pretrain.eval_tasks runs the same texts on every rank (a sharded forward needs them all);
- stage 2's trainable embedding rows on a tied model are refused in one line before
  training (peft's TrainableTokensWrapper hides the tie from accelerate's
  fsdp2_prepare_model);
- the exported model of a tied model holds the embeddings once (the gathered state has two
  tensors; save_model_folder keeps the one tied to).

DeepSpeed is not installed and not a test dependency; lowlm refuses it (training/session.py).

Each launch is a fresh pair of one-thread processes, so FSDP2 and DDP agree to rounding
and a resumed run equals the uninterrupted one.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lowlm.config import load_config
from lowlm.models.load import load_tokenizer
from lowlm.stages import resize, tokenize

from .conftest import ENV, REPO, free_port, pipeline_config

LAUNCH = Path(__file__).with_name("_fsdp_launch.py")
FSDP_CONFIG = REPO / "configs" / "accelerate" / "fsdp.yaml"
BIN = Path(sys.executable).parent


def _fsdp2_over_gloo() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return torch.distributed.is_available() and torch.distributed.is_gloo_available()


pytestmark = [
    pytest.mark.slow,  # every test launches two ranks
    pytest.mark.skipif(
        shutil.which("accelerate", path=str(BIN)) is None
        or shutil.which("torchrun", path=str(BIN)) is None,
        reason="accelerate's launcher and torchrun are not installed beside this Python",
    ),
    pytest.mark.skipif(not _fsdp2_over_gloo(), reason="this torch has no FSDP2 over gloo"),
]


def fsdp_ranks(
    *args: str, state_dict: str | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    """`lowlm ARGS` in two gloo processes under the shipped FSDP config (fp32 on this CPU);
    `state_dict` overrides its fsdp_state_dict_type."""
    command = [str(BIN / "accelerate"), "launch", "--config_file", str(FSDP_CONFIG)]
    command += ["--num_processes", "2", "--mixed_precision", "no"]
    command += ["--main_process_port", str(free_port())]
    if state_dict is not None:
        command += ["--fsdp_state_dict_type", state_dict]
    return subprocess.run(
        [*command, str(LAUNCH), *args], env=ENV, capture_output=True, text=True, timeout=timeout
    )


def ddp_ranks(*args: str) -> subprocess.CompletedProcess:
    """The same under torchrun: two gloo processes, DDP."""
    command = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port())]
    return subprocess.run(
        [*command, "-m", "lowlm.cli", *args], env=ENV, capture_output=True, text=True, timeout=300
    )


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """The launch, having succeeded; else a failure that quotes the ranks' exceptions."""
    if result.returncode != 0:
        lines = result.stderr.splitlines()
        raised = [i for i, line in enumerate(lines) if re.match(r"(\[rank\d\]: )?\w+Error: ", line)]
        quoted = [" ".join(lines[i : i + 2]) for i in raised[:4]] or lines[-40:]
        pytest.fail(f"the launch exited with {result.returncode}:\n" + "\n".join(quoted))
    return result


def as_if_killed_after(run_dir: Path, stage: str, step: int, aside: Path) -> None:
    """What a run killed after `step` leaves: that checkpoint in the stage's work folder, no
    output folder (moved to `aside`), the stage recorded as not done."""
    target = run_dir / f".{stage}.train" / "checkpoints"
    target.mkdir(parents=True)
    shutil.copytree(run_dir / stage / "checkpoints" / f"step-{step}", target / f"step-{step}")
    (run_dir / stage).rename(aside)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest["stages"][stage]["status"] = "failed"
    (run_dir / "manifest.json").write_text(json.dumps(manifest))


def log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


def assert_same_weights(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for key, tensor in a.items():
        assert b[key].shape == tensor.shape, key
        torch.testing.assert_close(b[key], tensor, atol=atol, rtol=0, msg=key)


def checkpoint_files(checkpoint: Path) -> set[str]:
    """The files of an FSDP checkpoint of two ranks (state.json checked on the way)."""
    state = json.loads((checkpoint / "state.json").read_text())
    assert state["distributed"] == "DistributedType.FSDP"
    assert state["world_size"] == 2
    files = {p.name for p in checkpoint.iterdir()}
    # accelerate's per-rank RNG files and lowlm's own; no model.safetensors of DDP's layout
    assert files >= {"random_states_0.pkl", "random_states_1.pkl", "scheduler.pt", "state.json"}
    return files - {"random_states_0.pkl", "random_states_1.pkl", "scheduler.pt", "state.json"}


def resume_after_step_4(tmp_path: Path, config: Path, stage: str, *args: str, **launch) -> Path:
    """Simulate a kill after step 4 of the finished run and resume it under FSDP2; returns
    the uninterrupted run's output folder."""
    run_dir = tmp_path / "runs" / load_config(config).run.name
    whole = tmp_path / "whole"
    as_if_killed_after(run_dir, stage, 4, whole)
    resumed = ok(fsdp_ranks("pretrain", str(config), *args, **launch))
    assert "resuming from" in resumed.stdout and "step-4" in resumed.stdout
    a, b = log(whole)[-1], log(run_dir / stage)[-1]
    assert a["step"] == b["step"] == 8
    assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
    assert b["eval_loss"] == pytest.approx(a["eval_loss"], abs=1e-5)
    return whole


FULL_RUN = dict(full={"steps": 8, "lr": 3e-3}, log_every=2, save_every=4, eval_every=4)


def test_fsdp2_full_stage_with_the_shipped_config_trains_as_ddp_and_resumes(tmp_path, make_run):
    """The shipped fsdp.yaml (FULL_STATE_DICT): checkpoints are rank 0's gathered
    pytorch_model_fsdp.bin and optimizer.bin; FSDP2 and DDP are the same arithmetic up to
    rounding, so the log (losses, gradient norms after clipping), the step-4 weights and
    the exported model (gathered by get_state_dict: every tensor at its full shape) match a
    DDP run; a run resumed from step 4 (rank 0 loads, the ranks get their shards) ends as
    the uninterrupted one."""
    sharded = make_run("fsdp", **FULL_RUN)
    plain = make_run("ddp", **FULL_RUN)
    ok(fsdp_ranks("pretrain", str(sharded)))
    ok(ddp_ranks("pretrain", str(plain)))
    fsdp = tmp_path / "runs" / "fsdp" / "pretrain-full"
    ddp = tmp_path / "runs" / "ddp" / "pretrain-full"

    assert checkpoint_files(fsdp / "checkpoints" / "step-4") == {
        "pytorch_model_fsdp.bin",
        "optimizer.bin",
    }
    ddp_state = json.loads((ddp / "checkpoints" / "step-4" / "state.json").read_text())
    assert ddp_state["distributed"] == "DistributedType.MULTI_CPU"
    for mine, theirs in zip(log(fsdp), log(ddp), strict=True):
        assert mine["step"] == theirs["step"]
        for key in ("loss", "grad_norm", "eval_loss"):
            assert mine.get(key) == pytest.approx(theirs.get(key), abs=1e-5), (mine["step"], key)
    assert max(entry["grad_norm"] for entry in log(ddp)) > 1.0  # max_grad_norm: it clipped

    gathered = torch.load(
        fsdp / "checkpoints" / "step-4" / "pytorch_model_fsdp.bin", weights_only=True
    )
    reference = load_file(str(ddp / "checkpoints" / "step-4" / "model.safetensors"))
    assert_same_weights(reference, {key: gathered[key] for key in reference})

    exported = load_file(str(fsdp / "model.safetensors"))
    reference = load_file(str(ddp / "model.safetensors"))
    # The tiny model is tied: FSDP2's gathered state holds the embedding and lm_head as two
    # tensors; the export writes the tied weight once, as DDP's does.
    assert "lm_head.weight" not in exported
    assert_same_weights(reference, exported)

    whole = resume_after_step_4(tmp_path, sharded, "pretrain-full")
    assert_same_weights(
        load_file(str(whole / "model.safetensors")), load_file(str(fsdp / "model.safetensors"))
    )


def test_fsdp2_sharded_checkpoints_resume_to_the_uninterrupted_run(tmp_path, make_run):
    """SHARDED_STATE_DICT: model and optimizer in torch.distributed.checkpoint folders,
    each weight stored as one chunk per rank; a run resumed from them ends as the whole
    run."""
    config = make_run("fsdp", **FULL_RUN)
    ok(fsdp_ranks("pretrain", str(config), state_dict="SHARDED_STATE_DICT"))
    folder = tmp_path / "runs" / "fsdp" / "pretrain-full"
    checkpoint = folder / "checkpoints" / "step-4"
    assert checkpoint_files(checkpoint) == {"pytorch_model_fsdp_0", "optimizer_0"}
    for name in ("pytorch_model_fsdp_0", "optimizer_0"):
        written = {p.name for p in (checkpoint / name).iterdir()}
        assert {".metadata", "__0_0.distcp", "__1_0.distcp"} <= written
    from torch.distributed.checkpoint import FileSystemReader

    stored = FileSystemReader(str(checkpoint / "pytorch_model_fsdp_0")).read_metadata()
    embedding = stored.state_dict_metadata["model.model.embed_tokens.weight"]
    assert embedding.size[1] == 64 and len(embedding.chunks) == 2

    whole = resume_after_step_4(tmp_path, config, "pretrain-full", state_dict="SHARDED_STATE_DICT")
    assert_same_weights(
        load_file(str(whole / "model.safetensors")),
        load_file(str(folder / "model.safetensors")),
    )


def test_fsdp2_lora_stage2_checkpoints_in_fsdp_layout_and_resumes(tmp_path, make_run):
    """LoRA stage 2 (no embedding rows) under FSDP2: its checkpoint is FSDP's gathered file of
    the whole model (FSDP saves the model its own way, so lowlm's hook that leaves the frozen
    base out has nothing to filter), the adapter is written from get_state_dict, gradients
    are clipped over the sharded parameters (a non-zero norm in the log), the eval tasks run
    on both ranks (the sharded forward needs both; it hung when the main process ran them
    alone), and a run resumed from step 4 ends as the whole one."""
    lora = {"r": 2, "alpha": 4, "dropout": 0.0}
    stage2 = {"steps": 8, "lr": 3e-3, "lora": lora, "train_embeddings": "none"}
    heldout = str(tmp_path / "runs" / "lora" / "tokenizer" / "heldout.txt")
    config = make_run(
        "lora",
        stage2=stage2,
        log_every=2,
        save_every=4,
        eval_every=4,
        eval_tasks=[{"name": "ppl", "path": heldout}],
    )
    ok(fsdp_ranks("pretrain", str(config), "--stage", "2", timeout=180))
    folder = tmp_path / "runs" / "lora" / "pretrain-stage2"
    checkpoint = folder / "checkpoints" / "step-4"
    assert checkpoint_files(checkpoint) == {"pytorch_model_fsdp.bin", "optimizer.bin"}
    saved = torch.load(checkpoint / "pytorch_model_fsdp.bin", weights_only=True)
    assert any("lora_A" in key for key in saved) and any("base_layer" in key for key in saved)
    adapter = load_file(str(folder / "adapter_model.safetensors"))
    assert adapter and all("lora_" in key for key in adapter)
    assert any("lora_B" in key and tensor.abs().max() > 0 for key, tensor in adapter.items())

    entries = log(folder)
    assert all(entry["grad_norm"] > 0 for entry in entries if "grad_norm" in entry)
    assert [entry["step"] for entry in entries if "eval/ppl_heldout" in entry] == [4, 8]

    whole = resume_after_step_4(tmp_path, config, "pretrain-stage2", "--stage", "2")
    assert_same_weights(
        load_file(str(whole / "adapter_model.safetensors")),
        load_file(str(folder / "adapter_model.safetensors")),
    )


def test_fsdp2_partial_stages_see_the_prepared_parameters(write_config, tiny_base_untied):
    """Stage 1 with new_rows_only: only the new embedding rows may change. Under FSDP2 the
    loop clips, and the stage masks, the parameters from before accelerator.prepare, which
    never get a gradient: the log's grad_norm is 0 and the old rows train. (LoRA stage 2
    shows the same grad_norm of 0.)"""
    raw = pipeline_config(
        tiny_base_untied, pretrain={"stage1": {"steps": 4, "lr": 1e-2, "new_rows_only": True}}
    )
    path = write_config(**raw)
    config = load_config(path)
    tokenize.run(config)
    resize.run(config)
    ok(fsdp_ranks("pretrain", str(path), "--stage", "1"))
    assert all(entry["grad_norm"] > 0 for entry in log(config.run_dir / "pretrain-stage1"))
    before = load_file(str(config.run_dir / "model-resized" / "model.safetensors"))
    after = load_file(str(config.run_dir / "pretrain-stage1" / "embeddings.safetensors"))
    old_rows = len(load_tokenizer(tiny_base_untied))
    for saved, key in (("input", "model.embed_tokens.weight"), ("output", "lm_head.weight")):
        assert after[saved].shape == before[key].shape
        assert torch.equal(after[saved][:old_rows], before[key][:old_rows]), saved
        assert not torch.equal(after[saved][old_rows:], before[key][old_rows:]), saved


def test_fsdp2_refuses_trainable_embedding_rows_on_a_tied_model(tmp_path, make_run):
    lora = {"r": 2, "alpha": 4, "dropout": 0.0}
    stage2 = {"steps": 2, "lora": lora, "train_embeddings": "all"}
    config = make_run("tied", stage2=stage2)
    result = fsdp_ranks("pretrain", str(config), "--stage", "2", timeout=180)
    assert result.returncode != 0
    assert "cannot run under FSDP on a model whose input and output embeddings are tied" in (
        result.stderr
    )
    assert "src/lowlm" not in result.stderr  # no traceback of lowlm (the launcher prints its own)
