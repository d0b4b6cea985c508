"""resize, init, pretrain (stage 1, stage 2, full) and export on tiny models."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from lowlm.config import InitConfig, load_config
from lowlm.data.blocks import BlockDataset, build_cache, cache_key
from lowlm.data.corpus import resolve_sources, source_hashes
from lowlm.errors import LowlmError
from lowlm.models.load import load_model, load_pretrained, load_tokenizer
from lowlm.models.presets import llama_config
from lowlm.stages import export, pretrain, resize, tokenize

from .conftest import DEMO, pipeline_config, tokenize_once


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# resize


def test_resize_keeps_base_rows_bit_identical_and_stays_tied(tiny_base, prepare_run):
    config = prepare_run(tiny_base)
    base = load_pretrained(str(tiny_base))
    resized = load_model(config.run_dir / "model-resized")
    tokenizer = load_tokenizer(config.run_dir / "tokenizer")
    old = base.get_input_embeddings().weight
    new = resized.get_input_embeddings().weight
    assert new.shape[0] % 64 == 0 and new.shape[0] >= len(tokenizer) > old.shape[0]
    assert torch.equal(new[: old.shape[0]], old)
    assert resized.get_output_embeddings().weight.data_ptr() == new.data_ptr()
    for name, tensor in weights(base).items():
        if "embed" not in name and "lm_head" not in name:
            assert torch.equal(tensor, weights(resized)[name]), name
    card = json.loads((config.run_dir / "model-resized" / "lowlm_model.json").read_text())
    assert card["vocab_size"] == len(tokenizer)
    assert card["new_token_ids"] == [old.shape[0], len(tokenizer)]
    metrics = json.loads((config.run_dir / "manifest.json").read_text())["stages"]["resize"]
    assert metrics["metrics"]["heldout_loss_per_char_resized"] > 0


def test_subword_mean_row_is_the_mean_of_its_base_subtokens(tiny_base_untied, prepare_run):
    config = prepare_run(tiny_base_untied)
    base = load_pretrained(str(tiny_base_untied))
    resized = load_model(config.run_dir / "model-resized")
    base_tok = load_tokenizer(tiny_base_untied)
    tokenizer = load_tokenizer(config.run_dir / "tokenizer")
    assert resized.get_output_embeddings().weight.data_ptr() != (
        resized.get_input_embeddings().weight.data_ptr()
    )
    for token_id in (len(base_tok), len(base_tok) + 7, len(tokenizer) - 1):
        text = tokenizer.convert_tokens_to_string([tokenizer.convert_ids_to_tokens(token_id)])
        pieces = base_tok.encode(text, add_special_tokens=False)
        for get in ("get_input_embeddings", "get_output_embeddings"):
            expected = getattr(base, get)().weight[pieces].mean(dim=0)
            torch.testing.assert_close(getattr(resized, get)().weight[token_id], expected)
    old_rows = base.get_output_embeddings().weight.shape[0]
    assert torch.equal(
        resized.get_output_embeddings().weight[:old_rows], base.get_output_embeddings().weight
    )


@pytest.mark.parametrize("method", ["mean", "random"])
def test_mean_and_random_initialisation(tiny_base, method, prepare_run):
    config = prepare_run(tiny_base, resize={"init": method, "pad_to_multiple_of": None})
    base = load_pretrained(str(tiny_base)).get_input_embeddings().weight
    new = load_model(config.run_dir / "model-resized").get_input_embeddings().weight
    rows = new[base.shape[0] :]
    assert rows.shape[0] == len(load_tokenizer(config.run_dir / "tokenizer")) - base.shape[0]
    if method == "mean":
        torch.testing.assert_close(rows, base.mean(dim=0).expand_as(rows))
    else:
        assert abs(rows.std().item() - base.std().item()) < 0.2 * base.std().item()
        assert not torch.allclose(rows[0], rows[1])


# init


def test_named_sizes_match_teeny_tiny_llama(sp_base):
    from transformers import LlamaTokenizer

    tokenizer = LlamaTokenizer.from_pretrained(str(sp_base), add_bos_token=True)
    small = llama_config(InitConfig(size="ttl-160m"), tokenizer)
    large = llama_config(InitConfig(size="ttl-460m"), tokenizer)
    assert (small.hidden_size, small.intermediate_size, small.num_hidden_layers) == (768, 3072, 12)
    assert small.num_attention_heads == 12 and small.vocab_size == len(tokenizer)
    assert (large.hidden_size, large.intermediate_size, large.num_hidden_layers) == (1024, 4096, 24)
    assert large.num_attention_heads == 16
    custom = llama_config(InitConfig(size="tiny", num_hidden_layers=3), tokenizer)
    assert custom.num_hidden_layers == 3 and custom.hidden_size == 64
    with pytest.raises(LowlmError, match="custom needs init.hidden_size"):
        llama_config(InitConfig(size="custom"), tokenizer)


def test_init_writes_a_model_for_the_runs_tokenizer(prepare_run):
    config = prepare_run(None, init={"size": "tiny"})
    model = load_model(config.run_dir / "model-init")
    assert model.config.vocab_size == len(load_tokenizer(config.run_dir / "tokenizer"))
    assert model.config.hidden_size == 64


# the block cache


@pytest.mark.slow
def test_cache_key_changes_with_block_size_and_content(write_config, tmp_path):
    config = load_config(write_config(**pipeline_config(None)))
    tokenize.run(config)
    corpus = tmp_path / "c.txt"
    corpus.write_text((DEMO / "zh-tw.txt").read_text(encoding="utf-8"), encoding="utf-8")
    sources = resolve_sources([str(corpus)])

    def key(block_size):
        return cache_key("tok", block_size, source_hashes(sources), config.data, 1)

    first = key(32)
    assert key(64) != first
    with corpus.open("a", encoding="utf-8") as handle:
        handle.write("再加一行。\n")
    assert key(32) != first
    meta32 = build_cache(
        tmp_path / "c32", config.run_dir / "tokenizer", sources, config.data, 32, 1
    )
    meta64 = build_cache(
        tmp_path / "c64", config.run_dir / "tokenizer", sources, config.data, 64, 1
    )
    assert BlockDataset(tmp_path / "c32", "train")[0].shape == (32,)
    assert meta32["train_blocks"] > meta64["train_blocks"] > 0


@pytest.mark.slow
def test_interrupted_cache_build_resumes_to_the_same_blocks(write_config, tmp_path, monkeypatch):
    from lowlm.data.blocks import CacheOptions, shards

    config = load_config(write_config(**pipeline_config(None)))
    tokenize.run(config)
    sources = resolve_sources([str(DEMO / "zh-tw.txt")])
    options = CacheOptions(shard_blocks=64)
    tokenizer = config.run_dir / "tokenizer"
    build_cache(tmp_path / "whole", tokenizer, sources, config.data, 32, 1, 1, options)

    real_save = shards.save_progress
    calls = {"n": 0}

    def crash_after_two(*args):
        real_save(*args)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(shards, "save_progress", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        build_cache(tmp_path / "resumed", tokenizer, sources, config.data, 32, 1, 1, options)
    assert (tmp_path / "resumed" / "progress.json").exists()
    assert not (tmp_path / "resumed" / "meta.json").exists()
    monkeypatch.setattr(shards, "save_progress", real_save)
    build_cache(tmp_path / "resumed", tokenizer, sources, config.data, 32, 1, 1, options)
    for split in ("train", "eval"):
        whole, resumed = (
            BlockDataset(tmp_path / "whole", split),
            BlockDataset(tmp_path / "resumed", split),
        )
        assert len(whole) == len(resumed) > 0
        assert all((whole[i] == resumed[i]).all() for i in range(len(whole)))


# pretrain


def test_stage1_trains_only_the_new_embedding_rows_when_asked(tiny_base_untied, prepare_run):
    config = prepare_run(
        tiny_base_untied,
        pretrain={"stage1": {"steps": 4, "lr": 1e-2, "new_rows_only": True}},
    )
    pretrain.run(config, stage="1")
    before = load_model(config.run_dir / "model-resized")
    after = load_model(config.run_dir / "pretrain-stage1")
    first_new = len(load_tokenizer(tiny_base_untied))
    changed = {k for k, v in weights(after).items() if not torch.equal(v, weights(before)[k])}
    assert changed == {"model.embed_tokens.weight", "lm_head.weight"}
    for get in ("get_input_embeddings", "get_output_embeddings"):
        old, new = getattr(before, get)().weight, getattr(after, get)().weight
        assert torch.equal(old[:first_new], new[:first_new])
        assert not torch.equal(old[first_new:], new[first_new:])
    assert (config.run_dir / "pretrain-stage1" / "embeddings.safetensors").exists()


def test_stage1_trains_all_rows_by_default(tiny_base, prepare_run):
    config = prepare_run(tiny_base, pretrain={"stage1": {"steps": 3, "lr": 1e-2}})
    pretrain.run(config, stage="1")
    before = load_model(config.run_dir / "model-resized").get_input_embeddings().weight
    after = load_model(config.run_dir / "pretrain-stage1").get_input_embeddings().weight
    assert not torch.equal(before[:100], after[:100])


@pytest.mark.slow
def test_stage2_trains_only_lora_and_new_rows_and_exports_faithfully(tiny_base, prepare_run):
    config = prepare_run(
        tiny_base,
        pretrain={
            "stage1": {"steps": 2},
            "stage2": {
                "steps": 4,
                "lr": 1e-2,
                "train_embeddings": "new",
                "lora": {"r": 4, "alpha": 8},
            },
        },
    )
    pretrain.run(config)
    adapter = config.run_dir / "pretrain-stage2"
    assert (adapter / "adapter_model.safetensors").exists()
    card = json.loads((adapter / "lowlm_model.json").read_text())
    assert card["kind"] == "adapter" and card["parent"] == "../pretrain-stage1"
    names = set(load_file(str(adapter / "adapter_model.safetensors")))
    assert names and all("lora_" in n or "trainable_tokens" in n for n in names)

    metrics = export.run(config)
    assert metrics["max_logit_diff"] < 1e-4
    stage1 = load_model(config.run_dir / "pretrain-stage1")
    merged = load_model(config.run_dir / "export")
    first_new = len(load_tokenizer(tiny_base))
    before, after = weights(stage1), weights(merged)
    assert torch.equal(
        before["model.embed_tokens.weight"][:first_new],
        after["model.embed_tokens.weight"][:first_new],
    )
    assert not torch.equal(
        before["model.embed_tokens.weight"][first_new:],
        after["model.embed_tokens.weight"][first_new:],
    )
    for name in before:  # LoRA on attention and MLP (the default targets): only norms untouched
        untouched = "norm" in name
        assert torch.equal(before[name], after[name]) == untouched or "embed" in name, name
    assert (config.run_dir / "export" / "model.safetensors").exists()
    assert (config.run_dir / "export" / "tokenizer.json").exists()


@pytest.mark.slow
def test_full_training_from_scratch_lowers_the_loss(prepare_run):
    config = prepare_run(None, init={"size": "tiny"}, pretrain={"full": {"steps": 12, "lr": 3e-3}})
    metrics = pretrain.run(config)["full"]
    log = [json.loads(line) for line in (config.run_dir / "pretrain-full" / "log.jsonl").open()]
    assert log[-1]["loss"] < log[0]["loss"]
    assert {"lr", "grad_norm", "tokens_per_s", "mfu"} <= set(log[0])
    assert "eval_loss" in metrics and metrics["tokens"] == 12 * 2 * 32
    record = json.loads((config.run_dir / "manifest.json").read_text())["stages"]["pretrain-full"]
    assert record["status"] == "done" and record["energy"]["measured"] is False


def test_energy_is_measured_for_a_real_training_stage(prepare_run):
    pytest.importorskip("codecarbon")
    config = prepare_run(
        None,
        init={"size": "tiny"},
        pretrain={"full": {"steps": 2}, "energy": {"enabled": True}},
    )
    pretrain.run(config)
    energy = json.loads((config.run_dir / "manifest.json").read_text())["stages"]["pretrain-full"][
        "energy"
    ]
    assert energy["measured"] is True, energy.get("reason")
    assert energy["kwh"] > 0 and energy["kg_co2"] > 0 and "cpu" in energy["method"]


def test_a_tracker_that_never_started_says_so(monkeypatch):
    pytest.importorskip("codecarbon")
    from lowlm.training.energy import track_energy

    monkeypatch.setenv("CODECARBON_OUTPUT_DIR", "/nonexistent/codecarbon")
    with track_energy(True, "USA") as energy:
        pass
    assert energy["measured"] is False
    assert energy["reason"].startswith("codecarbon could not start: ")
    assert "/nonexistent/codecarbon" in energy["reason"]


def _bad_gradient_norms(monkeypatch, bad_steps, seen):
    """Make the gradient norm non-finite (loss finite) on the given optimizer steps, and record
    the trainable weights as they are when each step's gradients are ready."""
    from accelerate import Accelerator

    original = Accelerator.clip_grad_norm_
    calls = {"step": 0}

    def clip(self, parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        calls["step"] += 1
        seen.append([p.detach().clone() for p in parameters])
        if calls["step"] in bad_steps:
            parameters[0].grad[0].fill_(float("inf"))
        return original(self, parameters, max_norm, *args, **kwargs)

    monkeypatch.setattr(Accelerator, "clip_grad_norm_", clip)


@pytest.mark.parametrize("guard", ["device", "host"])
def test_a_non_finite_gradient_norm_skips_the_update_and_is_counted(
    monkeypatch, guard, prepare_run
):
    """The fused AdamW skips the update on the device; where the update cannot take a device
    flag (fp16 loss scaling, or no fused kernel), the host decides each step: both skip."""
    if guard == "host":
        from lowlm.training import loop

        monkeypatch.setattr(loop, "fused_adamw_available", lambda accelerator: False)
    config = prepare_run(None, init={"size": "tiny"}, pretrain={"full": {"steps": 5}})
    seen: list = []
    _bad_gradient_norms(monkeypatch, {3}, seen)
    metrics = pretrain.run(config)["full"]
    assert metrics["skipped_steps"] == 1
    # step 3 changed nothing: the weights before step 4 are those before step 3
    assert all(torch.equal(a, b) for a, b in zip(seen[2], seen[3], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(seen[1], seen[2], strict=True))
    weights = load_file(str(config.run_dir / "pretrain-full" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())
    log = [json.loads(line) for line in (config.run_dir / "pretrain-full" / "log.jsonl").open()]
    assert {"step": 3, "skipped": "non-finite"} in log


def test_non_finite_steps_in_a_row_stop_with_the_last_good_checkpoint(monkeypatch, prepare_run):
    config = prepare_run(
        None,
        init={"size": "tiny"},
        pretrain={"full": {"steps": 8}, "save_every": 2, "max_skipped_steps": 2},
    )
    _bad_gradient_norms(monkeypatch, {3, 4, 5, 6, 7, 8}, [])
    with pytest.raises(LowlmError, match=r"non-finite for 2 steps in a row \(steps 3-4.*step-2"):
        pretrain.run(config)
    record = json.loads((config.run_dir / "manifest.json").read_text())["stages"]["pretrain-full"]
    assert record["status"] == "failed" and not (config.run_dir / "pretrain-full").exists()
    checkpoint = config.run_dir / ".pretrain-full.train" / "checkpoints" / "step-2"
    saved = load_file(str(checkpoint / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in saved.values())


# bad input


def test_resize_before_tokenize_is_a_clear_error(write_config, tiny_base):
    config = load_config(write_config(**pipeline_config(tiny_base)))
    with pytest.raises(
        LowlmError,
        match="resize reads tokenize, which has not run; run `lowlm tokenize CONFIG` first",
    ):
        resize.run(config)


def test_pretrain_before_resize_is_a_clear_error(write_config, tiny_base, tokenized_runs):
    raw = pipeline_config(tiny_base, pretrain={"stage1": {"steps": 1}})
    config = load_config(write_config(**raw))
    tokenize_once(config, raw, tokenized_runs)
    with pytest.raises(LowlmError, match="reads resize, which has not run; run `lowlm resize"):
        pretrain.run(config)


def test_missing_base_model_is_a_clear_error(write_config, tmp_path):
    config = load_config(write_config(**pipeline_config(tmp_path / "nowhere")))
    with pytest.raises(LowlmError, match="does not exist"):
        tokenize.run(config)


@pytest.mark.slow
def test_adapter_on_a_model_of_another_vocabulary_is_refused(tiny_base, prepare_run):
    config = prepare_run(tiny_base, pretrain={"stage2": {"steps": 1, "lora": {"r": 2, "alpha": 4}}})
    pretrain.run(config)
    card_path = config.run_dir / "model-resized" / "lowlm_model.json"
    card = json.loads(card_path.read_text())
    card.update(vocab_size=49953, tokenizer_hash="0" * 64)
    card_path.write_text(json.dumps(card))
    with pytest.raises(LowlmError, match=r"tokenizer of \d+ tokens .* but .* has 49953 tokens"):
        export.run(config)
    assert not (config.run_dir / "export").exists()


@pytest.mark.slow
def test_export_refuses_a_swapped_tokenizer(tiny_base, prepare_run):
    config = prepare_run(tiny_base, pretrain={"stage2": {"steps": 1, "lora": {"r": 2, "alpha": 4}}})
    pretrain.run(config)
    adapter = config.run_dir / "pretrain-stage2"
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        (adapter / name).write_bytes((tiny_base / name).read_bytes())
    with pytest.raises(LowlmError, match="pretrain-stage2, which is stale .output changed"):
        export.run(config)  # the graph sees the artifact was touched after it was written
    copy = config.run_dir / "adapter-copy"  # a folder outside the graph: the card decides
    shutil.copytree(adapter, copy)
    with pytest.raises(LowlmError, match="is not the one the model was saved with"):
        export.run(config, source=str(copy))


@pytest.mark.slow
def test_bf16_stage2_with_gradient_checkpointing_keeps_trainable_weights_fp32(
    tiny_base, prepare_run
):
    config = prepare_run(
        tiny_base,
        model={"base": str(tiny_base), "dtype": "bf16"},
        pretrain={
            "gradient_checkpointing": True,
            "stage2": {"steps": 2, "lora": {"r": 2, "alpha": 4}},
        },
    )
    metrics = pretrain.run(config)["2"]
    assert metrics["loss"] == metrics["loss"]  # finite, not NaN
    adapter = load_file(str(config.run_dir / "pretrain-stage2" / "adapter_model.safetensors"))
    assert {t.dtype for t in adapter.values()} == {torch.float32}


def test_fp16_without_a_gpu_is_a_clear_error(tiny_base, prepare_run):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    config = prepare_run(
        tiny_base,
        model={"base": str(tiny_base), "dtype": "fp16"},
        pretrain={"stage2": {"steps": 1}},
    )
    with pytest.raises(LowlmError, match="fp16 needs a CUDA GPU"):
        pretrain.run(config)


def test_lora_directly_on_a_base_model_with_its_own_tokenizer(write_config, tiny_base):
    """The Hyacinth6B path: no new vocabulary, LoRA on the base, then a merged export."""
    config = load_config(
        write_config(
            **pipeline_config(
                tiny_base,
                tokenize={"corpus": [], "merge": False},
                pretrain={
                    "corpus": [str(DEMO / "zh-tw.txt")],
                    "stage2": {
                        "steps": 2,
                        "train_embeddings": "none",
                        "lora": {"r": 2, "alpha": 4},
                    },
                },
            )
        )
    )
    pretrain.run(config)
    card = json.loads((config.run_dir / "pretrain-stage2" / "lowlm_model.json").read_text())
    assert card["vocab_size"] == len(load_tokenizer(tiny_base))
    assert export.run(config)["max_logit_diff"] < 1e-4


@pytest.mark.slow
def test_cache_built_by_two_workers_equals_one(write_config, tmp_path):
    config = load_config(write_config(**pipeline_config(None)))
    tokenize.run(config)
    sources = resolve_sources([str(DEMO / "zh-tw.txt")])
    tokenizer = config.run_dir / "tokenizer"
    one = build_cache(tmp_path / "one", tokenizer, sources, config.data, 32, 1, num_proc=1)
    two = build_cache(tmp_path / "two", tokenizer, sources, config.data, 32, 1, num_proc=2)
    assert one == two
    for split in ("train", "eval"):
        a, b = BlockDataset(tmp_path / "one", split), BlockDataset(tmp_path / "two", split)
        assert all((a[i] == b[i]).all() for i in range(len(a)))
