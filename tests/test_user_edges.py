"""What a new user tries in the first hour: overrides that are not YAML, `~` and `$VARS` in
paths, run names that leave the root, --help and --version, usage mistakes, misnamed files
and no network. Each answer is one line that starts with "error:" (or plain help)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from lowlm.cli import app
from lowlm.config import load_config

from .conftest import DEMO

runner = CliRunner()
SRC = Path(__file__).resolve().parents[1] / "src"


def _one_error_line(result, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_an_override_that_is_not_yaml_is_one_line(write_config):
    result = runner.invoke(
        app, ["validate", str(write_config()), "--set", "pretrain.batch_size=[1"]
    )
    _one_error_line(result, "--set 'pretrain.batch_size=[1'", "not valid YAML")


def test_home_and_variables_expand_in_every_path_field(write_config, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LOWLM_TEST_DATA", str(DEMO))
    path = write_config(
        run={"root": "~/runs", "name": "x"},
        model={"base": "$LOWLM_TEST_DATA/base", "tokenizer": "${LOWLM_TEST_DATA}/tok"},
        tokenize={"corpus": ["$LOWLM_TEST_DATA/zh-tw.txt"], "eval_texts": {"en": "~/en.txt"}},
        finetune={"train": "~/train.jsonl"},
        eval={"tasks": [{"name": "ppl", "path": "~/held.txt"}]},
    )
    config = load_config(path)
    home = tmp_path / "home"
    assert config.run_dir == home / "runs" / "x"
    assert config.model.base == f"{DEMO}/base" and config.model.tokenizer == f"{DEMO}/tok"
    assert config.tokenize.corpus == [str(DEMO / "zh-tw.txt")]
    assert config.tokenize.eval_texts == {"en": str(home / "en.txt")}
    assert config.finetune.train == str(home / "train.jsonl")
    assert config.eval.tasks[0].path == str(home / "held.txt")
    assert config.model.base != "HuggingFaceTB/SmolLM2-135M"  # names without ~ or $ stay


def test_an_unset_variable_in_a_path_is_refused(write_config):
    result = runner.invoke(app, ["validate", str(write_config(run={"root": "$LOWLM_UNSET_X/r"}))])
    _one_error_line(result, "run.root", "$LOWLM_UNSET_X is not set")


@pytest.mark.parametrize("name", ["../escape", "/tmp/elsewhere", "a/../../b", "."])
def test_a_run_name_that_leaves_the_root_is_refused(write_config, name):
    result = runner.invoke(app, ["validate", str(write_config(run={"name": name}))])
    _one_error_line(result, "run.name", "inside run.root")


def test_help_shows_plain_flags_and_version_prints_it():
    from lowlm import __version__

    helped = runner.invoke(app, ["pretrain", "--help"])
    assert helped.exit_code == 0
    assert "<bool>" not in helped.output and "--force " in helped.output
    assert "--set SECTION.KEY=VALUE" in helped.output
    version = runner.invoke(app, ["--version"])
    assert version.exit_code == 0 and version.output.strip() == f"lowlm {__version__}"


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["pretrain"], "Missing argument 'CONFIG'"),
        (["tokenize", "x.yaml", "--bogus"], "No such option: --bogus"),
        (["generate", "x.yaml", "--max-new-tokens", "many"], "'--max-new-tokens'"),
    ],
)
def test_usage_mistakes_are_one_error_line(args, fragment):
    result = runner.invoke(app, args, prog_name="lowlm")
    _one_error_line(result, fragment, f"`lowlm {args[0]} --help` shows the usage")
    assert "Error:" not in result.output


def test_a_missing_file_names_the_field_it_comes_from(write_config, tmp_path):
    from lowlm.errors import LowlmError
    from lowlm.graph import Graph

    missing = str(tmp_path / "nope.jsonl")
    for section, field in (
        ({"finetune": {"train": missing}}, "finetune.train"),
        ({"finetune": {"train": str(DEMO / "en.txt"), "test": missing}}, "finetune.test"),
        ({"sft": {"data": [missing]}}, "sft.data"),
        ({"dpo": {"data": [missing]}}, "dpo.data"),
        ({"tokenize": {"corpus": [missing], "merge": False}}, "tokenize.corpus"),
    ):
        graph = Graph(load_config(write_config(**section)))
        stage = field.split(".")[0]
        state = graph.state(stage)
        assert state.status == "error" and state.reason.startswith(f"{field} file '"), state
    with pytest.raises(LowlmError, match="^sft.data file '.*nope.jsonl' does not exist"):
        from lowlm.data.instructions import read_conversations

        read_conversations([missing], None)


def _lowlm(args: list[str], **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSF"))}
    environment.update(PYTHONPATH=str(SRC), **env)
    return subprocess.run(
        [sys.executable, "-m", "lowlm.cli", *args],
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
    )


@pytest.mark.parametrize(
    "env, reason",
    [
        ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
        ({"HF_ENDPOINT": "https://lowlm-no-such-host.invalid"}, "no connection to"),
    ],
)
def test_offline_a_hub_name_fails_at_once_and_says_why(tmp_path, byte_base, env, reason):
    # a local tokenizer: the model's Hub lookup (transformers' retries) is the one tested
    model = {"base": "lowlm-test/no-model", "tokenizer": str(byte_base)}
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump({"run": {"root": str(tmp_path / "runs")}, "model": model}),
        encoding="utf-8",
    )
    done = _lowlm(["generate", str(config), "-p", "hi"], HF_HOME=str(tmp_path / "hf"), **env)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert "cannot load model 'lowlm-test/no-model'" in lines[0] and reason in lines[0]
    assert "retry" not in done.stderr.lower()


@pytest.mark.parametrize(
    "finetune, lr",
    [
        ({"method": "lora"}, 2e-4),
        ({"method": "full"}, 2e-5),
        ({"method": "lora", "lr": 1e-3}, 1e-3),
    ],
)
def test_the_finetune_learning_rate_defaults_by_method(write_config, finetune, lr):
    config = load_config(write_config(finetune=finetune))
    assert config.finetune.lr == lr
    recorded = yaml.safe_load(
        runner.invoke(app, ["validate", str(write_config(finetune=finetune))]).stdout
    )
    assert recorded["finetune"]["lr"] == lr  # the resolved config records the rate used
