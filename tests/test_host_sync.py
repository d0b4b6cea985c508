"""The training loop reads the device once per logging step (the numeric guard on the device,
through the fused AdamW), resumes checkpoints of the foreach AdamW, and counts model FLOPs
for MFU as it says."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

from lowlm.config import load_config
from lowlm.stages import pretrain
from lowlm.training import guard, loop, metrics

HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy")
# The code of a training step: the loop and the guard and logger it calls.
STEP_FILES = {loop.__file__, guard.__file__, metrics.__file__}
STEP_CODE = {"train", "_micro_batches", "_loss_scales", "_forward_backward", "guarded_update"}
STEP_CODE |= {"record", "read", "take_window", "finite_or_none"}


def _count_host_reads(monkeypatch) -> list[str]:
    """Record each read of a tensor's value by the training loop's step code (not by the
    evaluation or the model, whose reads are the library's)."""
    seen: list[str] = []
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, _original=original, _name=name, **kwargs):
            caller = sys._getframe(1)
            code = caller.f_code
            if code.co_filename in STEP_FILES and code.co_name in STEP_CODE:
                seen.append(f"{caller.f_code.co_name}:{_name}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    return seen


def test_the_loop_reads_the_device_only_at_logging_steps(monkeypatch, prepare_run):
    config = prepare_run(
        None,
        init={"size": "tiny"},
        pretrain={"full": {"steps": 8}, "log_every": 4, "eval_every": 100, "save_every": 100},
    )
    seen = _count_host_reads(monkeypatch)
    metrics = pretrain.run(config)["full"]
    assert metrics["steps"] == 8 and metrics["loss"] is not None
    # Two logging steps, each one read of the step ledger and the gradient norm's value; the
    # loop before read loss, tokens and the guard's flags at every step.
    assert sorted(seen) == ["finite_or_none:__float__"] * 2 + ["read:tolist"] * 2


@pytest.mark.slow
def test_a_checkpoint_of_the_foreach_adamw_resumes_on_the_fused_one(
    tmp_path, monkeypatch, make_run
):
    """A checkpoint written with the foreach AdamW (a device without the fused kernel) holds
    param groups that would turn the fused one off (and the device guard with it): resuming
    one continues the run as if whole."""
    settings = dict(full={"steps": 6}, save_every=3, log_every=3)
    whole = load_config(make_run("whole", **settings))
    pretrain.run(whole)
    older = load_config(make_run("older", **settings))
    with monkeypatch.context() as patched:
        patched.setattr(loop, "fused_adamw_available", lambda accelerator: False)
        pretrain.run(older)
    work = tmp_path / "runs" / "older"
    target = work / ".pretrain-full.train" / "checkpoints"
    target.mkdir(parents=True)
    shutil.copytree(work / "pretrain-full" / "checkpoints" / "step-3", target / "step-3")
    shutil.rmtree(work / "pretrain-full")
    manifest = json.loads((work / "manifest.json").read_text())
    manifest["stages"]["pretrain-full"]["status"] = "failed"  # as if it had been killed
    (work / "manifest.json").write_text(json.dumps(manifest))
    metrics = pretrain.run(older)["full"]
    assert metrics["loss"] == pytest.approx(pretrain_loss(tmp_path, "whole"), abs=1e-5)
    expected = load_file(str(tmp_path / "runs" / "whole" / "pretrain-full" / "model.safetensors"))
    for key, tensor in load_file(str(work / "pretrain-full" / "model.safetensors")).items():
        torch.testing.assert_close(tensor, expected[key], atol=1e-5, rtol=0)


def pretrain_loss(tmp_path, name: str) -> float:
    lines = (tmp_path / "runs" / name / "pretrain-full" / "log.jsonl").read_text().splitlines()
    return json.loads(lines[-1])["loss"]


def test_model_flops_count_weights_that_multiply_and_attention(prepare_run):
    """MFU's numerator: 6 FLOPs per weight that multiplies (4 with a frozen base), the input
    embedding left out unless it is the output layer too, plus 12 x layers x width per
    position attended; the log's figure is that over the window's time and the peak."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def llama(tied: bool):
        return LlamaForCausalLM(
            LlamaConfig(
                vocab_size=1000,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=3,
                num_attention_heads=4,
                tie_word_embeddings=tied,
            )
        )

    untied, tied = llama(False), llama(True)
    total = sum(p.numel() for p in untied.parameters())
    assert metrics.training_flops(untied, frozen_base=False) == (6 * (total - 64_000), 12 * 3 * 64)
    assert metrics.training_flops(untied, frozen_base=True)[0] == 4 * (total - 64_000)
    # tied: the one matrix is the output layer, which multiplies
    assert metrics.training_flops(tied, frozen_base=False)[0] == 6 * (total - 64_000)

    config = prepare_run(
        None,
        init={"size": "tiny"},
        pretrain={"full": {"steps": 4}, "log_every": 2, "peak_tflops": 1.0},
    )
    pretrain.run(config)
    from lowlm.models.load import load_model

    model = load_model(config.run_dir / "pretrain-full")
    per_token, per_position = metrics.training_flops(model, frozen_base=False)
    block = config.pretrain.block_size
    log = [json.loads(line) for line in (config.run_dir / "pretrain-full" / "log.jsonl").open()]
    for entry in (e for e in log if "mfu" in e):
        expected = (per_token + per_position * block) * entry["tokens_per_s"] / 1e12
        assert entry["mfu"] == pytest.approx(expected, rel=1e-6)
