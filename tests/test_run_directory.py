"""The run directory speaks for itself: status, report, generate, chat and eval --compare read
a run from its folder (the config it recorded), a differing config says so, and a report that
cannot be made never replaces a good one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from lowlm.cli import app

from .conftest import DEMO, pipeline_config

runner = CliRunner()


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path]:
    """(config, run directory) of a tiny run: a tokenizer alone, a tiny model, 2 steps."""
    root = tmp_path_factory.mktemp("rundir")
    sections = pipeline_config(
        None,
        run={"root": str(root / "runs"), "name": "r"},
        init={"size": "tiny"},
        tokenize={"num_threads": 1},
        pretrain={"full": {"steps": 2}},
        eval={"tasks": [{"name": "ppl", "heldout": True}], "batch_size": 4},
    )
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(sections, allow_unicode=True), encoding="utf-8")
    result = runner.invoke(app, ["run", str(config)])
    assert result.exit_code == 0, result.output
    return config, root / "runs" / "r"


@pytest.mark.slow  # reads the module's `lowlm run` through every stage
def test_status_and_report_read_the_run_directory_alone(finished, tmp_path):
    config, run_dir = finished
    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(run_dir, moved)
    for folder in (run_dir, moved):
        status = runner.invoke(app, ["status", str(folder)])
        assert status.exit_code == 0, status.output
        assert "pretrain-full    done" in status.output and "note:" not in status.output
        assert "eval             done" in status.output  # the held-out text is the run's own
        report = runner.invoke(app, ["report", str(folder)])
        assert report.exit_code == 0, report.output
        assert f"report: {folder / 'report.html'}" in report.output
        assert 'data-stage="pretrain-full" data-status="done"' in (
            folder / "report.html"
        ).read_text(encoding="utf-8")


@pytest.mark.slow  # reads the module's `lowlm run` through every stage
def test_a_differing_config_says_so_and_never_replaces_a_good_report(finished, tmp_path):
    config, run_dir = finished
    assert runner.invoke(app, ["report", str(run_dir)]).exit_code == 0
    page = run_dir / "report.html"
    good = page.read_bytes()

    status = runner.invoke(app, ["status", str(config), "--set", "pretrain.full.lr=0.5"])
    assert status.exit_code == 0, status.output
    notes = [line for line in status.output.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "pretrain.full.lr" in notes[0]
    assert f"lowlm status {run_dir}" in notes[0] and "stale" in status.output

    missing = str(tmp_path / "gone" / "*.txt")
    broken = runner.invoke(app, ["report", str(config), "--set", f"tokenize.corpus=[{missing}]"])
    assert broken.exit_code == 1
    lines = broken.output.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("note:") and "tokenize.corpus" in lines[0]
    assert lines[1].startswith("error: cannot report") and "Traceback" not in broken.output
    assert page.read_bytes() == good  # the good page stays

    unreadable = runner.invoke(
        app, ["status", str(config), "--set", f"tokenize.corpus=[{missing}]"]
    )
    assert unreadable.exit_code == 1 and "error" in unreadable.output


def test_a_folder_without_a_recorded_config_is_refused_in_one_line(tmp_path):
    for command in ("status", "report"):
        result = runner.invoke(app, [command, str(tmp_path)])
        assert result.exit_code == 1
        assert result.output.count("\n") == 1 and "without config.yaml" in result.output


@pytest.mark.slow  # reads the module's `lowlm run` through every stage
def test_generate_and_chat_take_the_run_directory(finished):
    _, run_dir = finished
    generated = runner.invoke(
        app, ["generate", str(run_dir), "-p", "hello", "--greedy", "--max-new-tokens", "3"]
    )
    assert generated.exit_code == 0, generated.output
    chat = runner.invoke(
        app, ["chat", str(run_dir), "--greedy", "--max-new-tokens", "3"], input="hi\n/exit\n"
    )
    assert chat.exit_code == 0, chat.output
    assert "lowlm chat" in chat.output


def test_eval_compare_takes_run_directories(tmp_path):
    for name, bits in (("a", 1.5), ("b", 1.25)):
        results = tmp_path / name / "eval" / "results.json"
        results.parent.mkdir(parents=True)
        task = {"task": "ppl", "bits_per_char": bits}
        results.write_text(json.dumps({"tasks": {"ppl_ppl": task}}), encoding="utf-8")
    result = runner.invoke(app, ["eval", "--compare", str(tmp_path / "a"), str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    assert "| ppl_ppl | bits_per_char | 1.5000 | 1.2500 | -0.2500 |" in result.output
    empty = runner.invoke(app, ["eval", "--compare", str(tmp_path), str(tmp_path / "b")])
    assert empty.exit_code == 1 and "holds no eval/results.json" in empty.output


@pytest.mark.slow
def test_ctrl_c_in_training_is_recorded_as_interrupted_and_resumes(write_config, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from lowlm.config import load_config
    from lowlm.stages import init, tokenize

    path = write_config(
        **pipeline_config(
            None, init={"size": "tiny"}, pretrain={"full": {"steps": 200}, "save_every": 5}
        )
    )
    config = load_config(path)
    tokenize.run(config)
    init.run(config)
    checkpoints = config.run_dir / ".pretrain-full.train" / "checkpoints"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    # The child's output goes to a file: a pipe nobody reads while we wait could fill up with
    # progress lines and stall the child.
    log = tmp_path / "child-stderr.txt"
    with log.open("w") as sink:
        child = subprocess.Popen(
            [sys.executable, "-m", "lowlm.cli", "pretrain", str(path)],
            stdout=subprocess.DEVNULL,
            stderr=sink,
            text=True,
            env=env,
            # A shell without job control starts background commands with SIGINT ignored, and
            # a child inherits that: give it the default, as a terminal would.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        deadline = time.time() + 120
        while not any(checkpoints.glob("step-*/state.json")) and time.time() < deadline:
            if child.poll() is not None:
                break
            time.sleep(0.05)
        child.send_signal(signal.SIGINT)
        child.wait(timeout=60)
    stderr = log.read_text()
    assert child.returncode == 130, stderr[-2000:]
    said = [x for x in stderr.splitlines() if x.startswith("pretrain-full: interrupted")]
    assert len(said) == 1 and "Traceback" not in stderr, repr(stderr[-600:])
    line = said[0]
    assert line.startswith("pretrain-full: interrupted (Ctrl-C) after step ")
    assert "the next run resumes from the checkpoint at step " in line
    record = json.loads((config.run_dir / "manifest.json").read_text())["stages"]["pretrain-full"]
    assert record["status"] == "interrupted" and record["reason"] in line
    status = runner.invoke(app, ["status", str(config.run_dir)])
    assert "pretrain-full    interrupted" in status.output

    resumed = runner.invoke(app, ["pretrain", str(path)])
    assert resumed.exit_code == 0, resumed.output
    step = line.split("checkpoint at step ")[1].rstrip(".")
    assert f"at step {step}." in resumed.output  # "resuming from <checkpoint> at step N."


@pytest.mark.slow  # reads the module's `lowlm run` through every stage
def test_ppl_scores_the_runs_own_heldout_text(finished, tmp_path):
    config, run_dir = finished
    results = json.loads((run_dir / "eval" / "results.json").read_text(encoding="utf-8"))
    assert list(results["tasks"]) == ["ppl_heldout"]
    assert results["tasks"]["ppl_heldout"]["path"] == str(run_dir / "tokenizer" / "heldout.txt")

    other = tmp_path / "other.yaml"
    raw = yaml.safe_load(config.read_text(encoding="utf-8"))
    raw["run"]["name"] = "never-tokenized"
    other.write_text(yaml.safe_dump(raw), encoding="utf-8")
    from lowlm.config import load_config
    from lowlm.errors import LowlmError
    from lowlm.stages import eval as eval_stage

    with pytest.raises(LowlmError, match="never-tokenized/tokenizer/heldout.txt does not exist"):
        eval_stage.run(load_config(other))


@pytest.mark.parametrize(
    "task, message",
    [
        ({"name": "ppl"}, "a ppl task needs a path (a text file) or heldout: true"),
        ({"name": "mmlu", "heldout": True}, "heldout: true is for a ppl task without a path"),
    ],
)
def test_a_ppl_task_names_its_text(write_config, task, message):
    result = runner.invoke(app, ["validate", str(write_config(eval={"tasks": [task]}))])
    assert result.exit_code == 1 and message in result.output


def test_a_missing_ppl_file_gets_no_hub_hint(write_config, tmp_path):
    from lowlm.config import load_config
    from lowlm.errors import LowlmError
    from lowlm.stages import eval as eval_stage

    missing = tmp_path / "missing.txt"
    config = load_config(write_config(eval={"tasks": [{"name": "ppl", "path": str(missing)}]}))
    with pytest.raises(LowlmError) as raised:
        eval_stage.run(config)
    assert "does not exist; fix the path." in str(raised.value)
    assert "Hugging Face" not in str(raised.value)


def test_model_weights_are_readable_by_the_group_under_umask_022(write_config):
    import os
    import stat

    from lowlm.config import load_config
    from lowlm.stages import init, pretrain, tokenize

    previous = os.umask(0o022)
    try:
        config = load_config(
            write_config(
                **pipeline_config(
                    None, init={"size": "tiny"}, pretrain={"full": {"steps": 2}, "save_every": 1}
                )
            )
        )
        tokenize.run(config)
        init.run(config)
        pretrain.run(config)
    finally:
        os.umask(previous)
    weights = [
        config.run_dir / "model-init" / "model.safetensors",
        config.run_dir / "pretrain-full" / "model.safetensors",
    ]
    checkpoints = config.run_dir / "pretrain-full" / "checkpoints"
    weights += sorted(checkpoints.rglob("*.safetensors"))
    assert len(weights) > 2
    for path in weights:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == 0o644, f"{path}: {oct(mode)}"
    for folder in (config.run_dir / "pretrain-full", checkpoints):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755


@pytest.mark.slow  # reads the module's `lowlm run` through every stage
def test_a_tokenizer_trained_alone_is_reported_by_what_matters(write_config, sp_base, finished):
    from lowlm.config import load_config
    from lowlm.report import render
    from lowlm.stages import tokenize

    config = load_config(
        write_config(
            **pipeline_config(
                None,
                model={"tokenizer": str(sp_base)},
                tokenize={"eval_texts": {"en": str(DEMO / "en.txt")}},
            )
        )
    )
    report = tokenize.run(config)
    assert report["merged"] is False and report["reference"] == str(sp_base)
    page = render(config)
    section = page[page.index("<h2 id='tokenizer'>") :].split("<h2", 2)[1]
    assert "A tokenizer trained alone" in section and "new tokens" not in section
    assert f"vocabulary {report['vocab_size']:,}" in section
    assert f"reference tokenizer {sp_base}" in section
    assert section.count("<img ") == 1
    for label in ("heldout", "en"):
        entry = report["texts"][label]
        row = section[section.index(f"<tr><td>{label}</td>") :].split("</tr>")[0]
        ours, theirs = entry["after"]["chars_per_token"], entry["before"]["chars_per_token"]
        assert f"{ours:.4g}" in row and f"{theirs:.4g}" in row
    # the English reference reads English better; the zh-TW tokenizer reads held-out zh-TW better
    assert report["texts"]["heldout"]["token_change"] < 0 < report["texts"]["en"]["token_change"]

    _, run_dir = finished  # alone, and no reference named
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    assert "No reference tokenizer is named" in page and "new tokens" not in page
