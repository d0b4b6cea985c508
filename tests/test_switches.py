"""Memory and speed switches: each trains where this machine supports it, and refuses in one
line where it does not (rather than training silently without it)."""

from __future__ import annotations

import pytest
import torch
import yaml
from typer.testing import CliRunner

from lowlm.cli import app
from lowlm.config import load_config
from lowlm.errors import LowlmError
from lowlm.stages import init, sft
from lowlm.training.session import make_accelerator

from .conftest import DEMO, pipeline_config, tokenize_once

runner = CliRunner()


def _sft_config(write_config, **sft_fields):
    return write_config(
        **pipeline_config(
            None,
            init={"size": "tiny"},
            sft={
                "data": [str(DEMO / "instructions.jsonl")],
                "steps": 2,
                "max_length": 64,
                "lora": {"r": 2, "alpha": 4},
                "energy": {"enabled": False},
                **sft_fields,
            },
        )
    )


@pytest.fixture
def prepared(write_config, tokenized_runs):
    def make(**sft_fields):
        path = _sft_config(write_config, **sft_fields)
        config = load_config(path)
        tokenize_once(config, yaml.safe_load(path.read_text(encoding="utf-8")), tokenized_runs)
        init.run(config)
        return path

    return make


def test_eager_attention_and_gradient_checkpointing_train_packed_sft(prepared, monkeypatch):
    """Both switches are in force while the stage trains: attention runs through the eager
    kernel, and the decoder layers run under activation checkpointing."""
    import transformers.modeling_utils
    from transformers.models.llama import modeling_llama

    calls = {"eager": 0, "checkpoint": 0}

    def counted(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)

        return wrapper

    eager = counted("eager", modeling_llama.eager_attention_forward)
    monkeypatch.setattr(modeling_llama, "eager_attention_forward", eager)
    checkpoint = counted("checkpoint", transformers.modeling_utils.checkpoint)
    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", checkpoint)
    path = prepared(gradient_checkpointing=True)
    config = load_config(path, ["model.attn_implementation=eager"])
    metrics = sft.run(config)
    assert metrics["packed_blocks"] >= 1 and metrics["loss"] is not None
    layers = config_layers(config)
    # two optimizer steps of one micro-batch each: every layer, every step
    assert calls["checkpoint"] >= 2 * layers
    assert calls["eager"] >= 2 * layers


def config_layers(config) -> int:
    from lowlm.models.load import load_model

    return load_model(config.run_dir / "model-init").config.num_hidden_layers


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "model.attn_implementation=flash_attention_2",
            "model.attn_implementation flash_attention_2 cannot be used here",
        ),
        ("sft.liger_kernel=true", "liger_kernel needs a CUDA GPU"),
        ("sft.quantize_base=4bit", "quantize_base 4bit needs a CUDA GPU"),
    ],
)
@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusals of a machine without CUDA")
def test_a_switch_this_machine_cannot_honour_stops_in_one_line(prepared, override, expected):
    path = prepared()
    result = runner.invoke(app, ["sft", str(path), "--set", override])
    assert result.exit_code == 1
    assert expected in result.output and "Traceback" not in result.output


def test_compile_asks_accelerate_for_inductor_and_is_reset_between_stages():
    compiled = make_accelerator("fp32", compile=True)
    assert str(compiled.state.dynamo_plugin.backend.value).lower() == "inductor"
    plain = make_accelerator("fp32", compile=False)
    assert str(plain.state.dynamo_plugin.backend.value).lower() == "no"


def test_deepspeed_is_refused_in_one_line(monkeypatch):
    """accelerate's DeepSpeed backward steps the engine's optimizer itself, past lowlm's
    accumulation and numeric guard: refused, not run with figures that are not the run's.
    (accelerate enables DeepSpeed only on GPUs, so the launch type is stood in for here.)"""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    monkeypatch.setattr(
        Accelerator, "distributed_type", property(lambda self: DistributedType.DEEPSPEED)
    )
    with pytest.raises(LowlmError, match="does not support DeepSpeed yet.*fsdp.yaml"):
        make_accelerator("fp32")
