"""The plain-LoRA baseline run, the base language's drift per stage, and `lowlm report
--baseline RUN_DIR`, on tiny runs built by `lowlm run`."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from lowlm.cli import app
from lowlm.config import load_config
from lowlm.data.corpus import iter_documents, resolve_sources
from lowlm.data.heldout import heldout_document_lines, read_heldout
from lowlm.models.load import read_card, tokenizer_hash
from lowlm.rundir import RunDir
from lowlm.stages.pretrain import stage_flops_per_token

from .conftest import DEMO, pipeline_config, rendered_dom, report_images

runner = CliRunner()
pytestmark = pytest.mark.slow  # two whole runs through `lowlm run`


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_base) -> dict[str, Path]:
    """Two runs on the same zh-TW corpus and held-out rule: plain LoRA on the base tokenizer,
    and the merge path (tokenize, resize, stage 1, stage 2), both scoring English text."""
    root = tmp_path_factory.mktemp("adapt")
    english = root / "en.txt"
    english.write_text("\n".join(DEMO.joinpath("en.txt").read_text().split("\n")[:30]) + "\n")
    common = {
        "tokenize": {"eval_texts": {"en": str(english)}, "num_threads": 1},
        "pretrain": {"corpus": [str(DEMO / "zh-tw.txt")], "stage2": {"lora": {"r": 2}}},
    }
    configs = {
        "plain": pipeline_config(
            tiny_base,
            **copy.deepcopy(common),
            run={"root": str(root / "runs"), "name": "plain"},
        ),
        "merge": pipeline_config(
            tiny_base,
            **copy.deepcopy(common),
            run={"root": str(root / "runs"), "name": "merge"},
        ),
    }
    configs["plain"]["tokenize"].update(corpus=[], merge=False)
    configs["plain"]["pretrain"]["stage2"].update(steps=4, train_embeddings="none")
    configs["merge"]["pretrain"]["stage1"] = {"steps": 2}
    configs["merge"]["pretrain"]["stage2"].update(steps=4, train_embeddings="new")
    paths = {}
    for name, sections in configs.items():
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(sections, allow_unicode=True), encoding="utf-8")
        result = runner.invoke(app, ["run", str(path)])
        assert result.exit_code == 0, result.output
        paths[name] = path
    return paths


def _stages(path: Path) -> dict:
    return RunDir(load_config(path)).read_manifest()["stages"]


def test_plain_lora_run_is_scored_on_the_merge_runs_heldout_lines(runs, tiny_base):
    plain, merge = load_config(runs["plain"]), load_config(runs["merge"])
    assert not (plain.run_dir / "tokenizer").exists()
    card = read_card(plain.run_dir / "pretrain-stage2")
    assert card["tokenizer_hash"] == tokenizer_hash(tiny_base)  # the base tokenizer, unchanged
    documents = iter_documents(resolve_sources(plain.pretrain.corpus), plain.data)
    lines = heldout_document_lines(documents, plain.run.seed, plain.data.heldout_fraction, 20)
    assert lines == read_heldout(merge.run_dir / "tokenizer")  # the same held-out text
    metrics = _stages(runs["plain"])["pretrain-stage2"]["metrics"]
    assert set(metrics["loss_per_char_before"]) == {"heldout", "en"}
    assert metrics["heldout_loss_per_char"] == metrics["loss_per_char_after"]["heldout"]
    # Before training, the plain arm is the base model: the figure resize gives the base.
    resize = _stages(runs["merge"])["resize"]["metrics"]
    assert metrics["loss_per_char_before"]["heldout"] == pytest.approx(
        resize["heldout_loss_per_char_base"], rel=1e-5
    )


def test_every_stage_records_its_drift_and_its_training_flops(runs):
    stages = _stages(runs["merge"])
    stage1, stage2 = stages["pretrain-stage1"]["metrics"], stages["pretrain-stage2"]["metrics"]
    resize = stages["resize"]["metrics"]
    assert stage1["loss_per_char_before"]["heldout"] == pytest.approx(
        resize["heldout_loss_per_char_resized"], rel=1e-5
    )
    for text in ("heldout", "en"):  # stage 2 starts where stage 1 ended
        assert stage2["loss_per_char_before"][text] == pytest.approx(
            stage1["loss_per_char_after"][text], rel=1e-5
        )
    assert stage1["loss_per_char_after"]["heldout"] != stage1["loss_per_char_before"]["heldout"]
    config = load_config(runs["merge"])
    per_token, per_attended = stage_flops_per_token(config, "2")
    block = config.pretrain.block_size
    assert stage2["tokens"] == 4 * config.pretrain.batch_size * block
    assert stage2["training_flops"] == pytest.approx(
        stage2["tokens"] * (per_token + per_attended * block)
    )

    page = _report(runs["merge"])
    drift = page.split("id='drift'")[1].split("<h2")[0]
    assert drift.count("<tr>") == 1 + 4  # stage 1 and 2, held-out and en
    before, after = stage2["loss_per_char_before"]["en"], stage2["loss_per_char_after"]["en"]
    assert f"{before:.4f}" in drift and f"{after / before - 1:+.2%}" in drift


def _report(config: Path, *extra: str) -> str:
    result = runner.invoke(app, ["report", str(config), *extra])
    assert result.exit_code == 0, result.output
    return (load_config(config).run_dir / "report.html").read_text(encoding="utf-8")


def test_report_compares_the_run_with_a_baseline_run_directory(runs, tmp_path):
    plain_dir = load_config(runs["plain"]).run_dir
    page = _report(runs["merge"], "--baseline", str(plain_dir))
    section = page.split("id='baseline'")[1].split("<h2")[0]
    assert len(report_images(section)) == 1
    rows = re.findall(r"<tr>(.*?)</tr>", section)
    merge, plain = _stages(runs["merge"]), _stages(runs["plain"])
    base = merge["resize"]["metrics"]["heldout_loss_per_char_base"]
    after = merge["pretrain-stage2"]["metrics"]["heldout_loss_per_char"]
    plain_after = plain["pretrain-stage2"]["metrics"]["heldout_loss_per_char"]
    assert any("this run" in r and "stage2" in r and f"{after / base:.3f}" in r for r in rows)
    assert any(plain_dir.name in r and f"{plain_after:.4f}" in r for r in rows)
    assert sum("base model" in r for r in rows) == 2
    assert _report(runs["merge"]).count("id='baseline'") == 0  # only when asked

    empty = tmp_path / "not-a-run"
    empty.mkdir()
    result = runner.invoke(app, ["report", str(runs["merge"]), "--baseline", str(empty)])
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert "without manifest.json" in result.output


def test_the_baseline_comparison_renders_in_headless_chromium(runs, chromium, tmp_path):  # noqa: F811
    plain_dir = load_config(runs["plain"]).run_dir
    _report(runs["merge"], "--baseline", str(plain_dir))
    page = load_config(runs["merge"]).run_dir / "report.html"
    dom = rendered_dom(chromium, page, tmp_path / "profile")
    section = dom.split('id="baseline"')[1].split("<h2")[0]
    assert len(report_images(section)) == 1 and "this run" in section
    assert section.count("<tr>") >= 4  # both runs' base and stages
