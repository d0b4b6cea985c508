"""`lowlm eval --checkpoints`: every checkpoint of a pre-training stage scored, recorded, and
drawn in the report against training tokens."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from lowlm.cli import app
from lowlm.config import EvalTask, load_config
from lowlm.models.load import load_for_inference
from lowlm.stages import eval as eval_stage

from .conftest import (
    DEMO,
    pipeline_config,
    rendered_dom,
    report_images,
    write_harness_task,
)

runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny from-scratch run, pre-trained 8 steps with a checkpoint every 2."""
    root = tmp_path_factory.mktemp("curves")
    text = root / "en.txt"
    text.write_text("\n".join(DEMO.joinpath("en.txt").read_text().split("\n")[:60]) + "\n")
    raw = pipeline_config(
        None,
        init={"size": "tiny"},
        pretrain={"full": {"steps": 8}, "save_every": 2, "keep_checkpoints": 10},
        eval={"batch_size": 2, "tasks": [{"name": "ppl", "path": str(text)}]},
    )
    if importlib.util.find_spec("lm_eval") is not None:  # a harness task on each checkpoint too
        write_harness_task(root / "tasks")
        raw["eval"]["tasks"].append({"harness": "demo_mc", "limit": 4})
        raw["eval"]["harness_include"] = [str(root / "tasks")]
    raw["run"] = {"name": "c", "root": str(root / "runs")}
    raw["tokenize"]["num_threads"] = 1
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 0, result.output
    return path


@pytest.mark.slow
def test_each_checkpoint_is_scored_recorded_and_drawn_against_tokens(trained):
    result = runner.invoke(app, ["eval", str(trained), "--checkpoints"])
    assert result.exit_code == 0, result.output
    config = load_config(trained)
    record = json.loads((config.run_dir / "eval-checkpoints" / "results.json").read_text())
    points = record["points"]
    assert record["stage"] == "pretrain-full"
    assert [p["label"] for p in points] == ["step-2", "step-4", "step-6", "final"]
    assert [p["tokens"] for p in points] == [128, 256, 384, 512]  # 2 x 32 tokens a step
    # The final point is the stage's model, as `lowlm eval` scored it.
    final = json.loads((config.run_dir / "eval" / "results.json").read_text())["tasks"]
    assert points[-1]["tasks"]["ppl_en"]["bits_per_char"] == pytest.approx(
        final["ppl_en"]["bits_per_char"], rel=1e-6
    )
    # A checkpoint's point is its own weights: the same figure from the checkpoint loaded
    # onto the stage's model by hand, and not the final model's.
    checkpoint = config.run_dir / "pretrain-full" / "checkpoints" / "step-4"
    model, tokenizer, _ = load_for_inference(str(config.run_dir / "pretrain-full"), config.model)
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(checkpoint / "model.safetensors")), strict=False)
    task = EvalTask(name="ppl", path=config.eval.tasks[0].path)
    by_hand = eval_stage.run_ppl(model, tokenizer, task)["bits_per_char"]
    assert points[1]["tasks"]["ppl_en"]["bits_per_char"] == pytest.approx(by_hand, rel=1e-6)
    assert len({round(p["tasks"]["ppl_en"]["bits_per_char"], 6) for p in points}) == 4
    if "demo_mc_0shot" in final:
        assert [p["tasks"]["demo_mc_0shot"]["n"] for p in points] == [4, 4, 4, 4]
        assert points[-1]["tasks"]["demo_mc_0shot"]["metrics"] == final["demo_mc_0shot"]["metrics"]

    page = runner.invoke(app, ["report", str(trained)])
    assert page.exit_code == 0, page.output
    html = (config.run_dir / "report.html").read_text(encoding="utf-8")
    assert "Benchmarks over training" in html
    curves = html[html.index("benchmark-curves") :]
    assert len(report_images(curves)) == 1


@pytest.mark.slow
def test_the_curves_render_in_headless_chromium(trained, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("chromium is not installed (make test installs Debian's chromium package)")
    config = load_config(trained)
    if not (config.run_dir / "eval-checkpoints").is_dir():
        assert runner.invoke(app, ["eval", str(trained), "--checkpoints"]).exit_code == 0
    assert runner.invoke(app, ["report", str(trained)]).exit_code == 0
    page = config.run_dir / "report.html"
    dom = rendered_dom(chromium, page, tmp_path / "profile")
    rendered = dom[dom.index("benchmark-curves") :]
    assert re.search(r'<img src="data:image/png;base64,', rendered)
    assert len(report_images(rendered)) == 1


def test_checkpoints_without_a_pretraining_stage_is_one_line(write_config, tiny_base):
    path = write_config(
        eval={"model": str(tiny_base), "tasks": [{"name": "ppl", "path": str(DEMO / "en.txt")}]}
    )
    result = runner.invoke(app, ["eval", str(path), "--checkpoints"])
    assert result.exit_code == 1
    assert result.output.startswith("error: --checkpoints scores the checkpoints of a pre-training")
