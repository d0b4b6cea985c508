"""End-to-end: every `lowlm` command through the real Typer app on tiny inputs."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from lowlm.cli import app
from lowlm.models.load import load_model, load_tokenizer

from .conftest import DEMO

runner = CliRunner()


def test_validate_prints_the_resolved_config(write_config):
    path = write_config(tokenize={"corpus": [str(DEMO / "zh-tw.txt")]})
    result = runner.invoke(app, ["validate", str(path), "--set", "tokenize.vocab_size=777"])
    assert result.exit_code == 0, result.output
    assert "vocab_size: 777" in result.stdout


def test_validate_rejects_a_typo_with_one_sentence(write_config):
    result = runner.invoke(app, ["validate", str(write_config(tokenize={"vocab": 1}))])
    assert result.exit_code == 1
    assert "error: unknown key 'tokenize.vocab'" in result.output
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_tokenize_run_and_status_commands(write_config, sp_base, tmp_path):
    path = write_config(
        model={"tokenizer": str(sp_base)},
        tokenize={"corpus": [str(DEMO / "zh-tw.txt")], "eval_texts": {"en": str(DEMO / "en.txt")}},
    )
    result = runner.invoke(app, ["tokenize", str(path), "--set", "tokenize.vocab_size=1500"])
    assert result.exit_code == 0, result.output
    assert "new tokens" in result.stdout and "heldout" in result.stdout
    run_dir = tmp_path / "runs" / "t"
    assert (run_dir / "tokenizer" / "report.json").exists()
    assert "vocab_size: 1500" in (run_dir / "config.yaml").read_text()

    result = runner.invoke(app, ["run", str(path), "--set", "tokenize.vocab_size=1500"])
    assert result.exit_code == 0 and "already done" in result.stdout

    result = runner.invoke(app, ["status", str(path), "--set", "tokenize.vocab_size=1500"])
    assert result.exit_code == 0
    assert "tokenize" in result.stdout and "done" in result.stdout
    result = runner.invoke(app, ["status", str(path)])  # without the override: another input
    assert "stale" in result.stdout and "changed: config.tokenize" in result.stdout
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stages"]["tokenize"]["metrics"]["en.lines_changed"] == 0


def test_bad_input_exits_with_one_readable_line(write_config, tmp_path):
    path = write_config(tokenize={"corpus": [str(tmp_path / "missing.txt")], "merge": False})
    result = runner.invoke(app, ["tokenize", str(path)])
    assert result.exit_code == 1
    assert "missing.txt' does not exist" in result.output
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_run_command_goes_from_corpus_to_exported_model(write_config, tiny_base, tmp_path):
    from .conftest import pipeline_config

    path = write_config(
        **pipeline_config(
            tiny_base,
            pretrain={"stage1": {"steps": 2}, "stage2": {"steps": 2, "lora": {"r": 2, "alpha": 4}}},
        )
    )
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "runs" / "t"
    tokenizer = load_tokenizer(run_dir / "tokenizer")
    for folder in ("model-resized", "pretrain-stage1", "pretrain-stage2", "export"):
        assert (run_dir / folder / "lowlm_model.json").exists(), folder
    # the exported model is a whole model over the run's merged tokenizer
    exported = load_model(run_dir / "export")
    assert exported.get_input_embeddings().weight.shape[0] >= len(tokenizer)
    assert len(tokenizer) > len(load_tokenizer(tiny_base))
    assert load_tokenizer(run_dir / "export").get_vocab() == tokenizer.get_vocab()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert [s for s, r in manifest["stages"].items() if r["status"] == "done"] == [
        "tokenize",
        "resize",
        "pretrain-stage1",
        "pretrain-stage2",
        "export",
    ]
    again = runner.invoke(app, ["run", str(path)])
    assert again.exit_code == 0 and again.stdout.count("already done") == 5


@pytest.mark.slow
def test_separate_commands_tokenize_init_pretrain_export(write_config, tmp_path):
    from .conftest import pipeline_config

    path = write_config(
        **pipeline_config(None, init={"size": "tiny"}, pretrain={"full": {"steps": 2}})
    )
    for command in (["tokenize"], ["init"], ["pretrain", "--stage", "full"], ["export"]):
        result = runner.invoke(app, [*command, str(path)])
        assert result.exit_code == 0, (command, result.output)
    assert (tmp_path / "runs" / "t" / "export" / "model.safetensors").exists()
    result = runner.invoke(app, ["pretrain", str(path), "--stage", "3"])
    assert result.exit_code == 1 and "unknown pretrain stage '3'" in result.output


def test_resize_command(write_config, tiny_base, tmp_path):
    from .conftest import pipeline_config

    path = write_config(**pipeline_config(tiny_base))
    assert runner.invoke(app, ["tokenize", str(path)]).exit_code == 0
    result = runner.invoke(app, ["resize", str(path), "--set", "resize.init=mean"])
    assert result.exit_code == 0, result.output
    assert "init mean" in result.stdout


@pytest.mark.slow
def test_finetune_and_dpo_commands(write_config, tmp_path):
    import json

    from .conftest import pipeline_config

    labelled = tmp_path / "labelled.jsonl"
    labelled.write_text(
        "".join(
            json.dumps({"text": f"第{i}句" + ("好" if i % 2 else "壞"), "label": i % 2}) + "\n"
            for i in range(24)
        )
    )
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(
            json.dumps({"prompt": f"問題{i}", "chosen": "是的。", "rejected": "不是。"}) + "\n"
            for i in range(12)
        )
    )
    path = write_config(
        **pipeline_config(
            None,
            init={"size": "tiny"},
            finetune={"train": str(labelled), "epochs": 1, "energy": {"enabled": False}},
            dpo={
                "data": [str(pairs)],
                "template": "alpaca",
                "steps": 2,
                "batch_size": 2,
                "energy": {"enabled": False},
            },
        )
    )
    for command in ("tokenize", "init", "finetune", "dpo"):
        result = runner.invoke(app, [command, str(path)])
        assert result.exit_code == 0, (command, result.output)
    run = tmp_path / "runs" / "t"
    assert (run / "finetune" / "results.json").exists() and (
        run / "dpo" / "adapter_config.json"
    ).exists()
    result = runner.invoke(app, ["dpo", str(path), "--set", "dpo.beta=-1"])
    assert result.exit_code == 1 and "dpo.beta" in result.output
