"""`lowlm report` on a tiny run through every stage, live tracking, and the page in Chromium."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from lowlm.cli import app
from lowlm.config import load_config
from lowlm.graph import Graph

from .conftest import CHROMIUM_FLAGS, DEMO, pipeline_config, rendered_dom, report_images

# Every test reads one run through every model stage (tokenize to eval): whole-pipeline tests.
pytestmark = pytest.mark.slow
runner = CliRunner()
TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
QUESTIONS = [
    ("geography", "最大的海洋是？", "太平洋", "大西洋", "印度洋", "北冰洋", "A"),
    ("geography", "台灣最高的山是？", "雪山", "玉山", "合歡山", "大霸尖山", "B"),
    ("arithmetic", "2 + 3 = ?", "4", "6", "5", "7", "C"),
    ("arithmetic", "3 x 3 = ?", "6", "8", "12", "9", "D"),
]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_base) -> Path:
    """A tiny run through tokenize, resize, pretrain 1 and 2, export, sft and eval (a ppl and a
    multiple-choice task with subjects), with TensorBoard tracking when it is installed."""
    root = tmp_path_factory.mktemp("report")
    english = root / "en.txt"
    english.write_text("\n".join(DEMO.joinpath("en.txt").read_text().split("\n")[:40]) + "\n")
    ppl = root / "ppl.txt"
    ppl.write_text("第一行測試文字。\n第二行測試文字。\n", encoding="utf-8")
    mc = root / "mc.jsonl"
    mc.write_text(
        "".join(
            json.dumps(
                dict(zip(("subject", "question", "A", "B", "C", "D", "answer"), q, strict=True)),
                ensure_ascii=False,
            )
            + "\n"
            for q in QUESTIONS
        ),
        encoding="utf-8",
    )
    sections = pipeline_config(
        tiny_base,
        run={
            "root": str(root / "runs"),
            "name": "r",
            "report_to": ["tensorboard"] if TENSORBOARD else [],
        },
        tokenize={"eval_texts": {"en": str(english)}, "num_threads": 1},
        pretrain={"stage1": {"steps": 2}, "stage2": {"steps": 2, "lora": {"r": 2, "alpha": 4}}},
        sft={
            "data": [str(DEMO / "instructions.jsonl")],
            "steps": 2,
            "batch_size": 2,
            "max_length": 64,
            "log_every": 1,
            "lora": {"r": 2, "alpha": 4},
            "energy": {"enabled": False},
        },
        eval={
            "batch_size": 4,
            "tasks": [
                {"name": "ppl", "path": str(ppl)},
                {"name": "mc", "path": str(mc), "fields": {"subject": "subject"}},
            ],
        },
    )
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(sections, allow_unicode=True), encoding="utf-8")
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 0, result.output
    # `lowlm run` prints each stage's summary when it finishes and the report's path at the end
    assert "pretrain-stage2 done (" in result.output and "held-out loss" in result.output
    assert result.output.strip().endswith(str(root / "runs" / "r" / "report.html"))
    return path


def _report(config: Path, *extra: str) -> str:
    result = runner.invoke(app, ["report", str(config), *extra])
    assert result.exit_code == 0, result.output
    page = Path(result.output.split("report: ")[1].split(" (")[0])
    assert page == load_config(config).run_dir / "report.html"
    return page.read_text(encoding="utf-8")


def _statuses(page: str) -> dict[str, str]:
    return dict(re.findall(r'data-stage="([^"]+)" data-status="([^"]+)"', page))


def test_report_shows_every_stage_with_its_status_and_the_charts(run):
    page = _report(run)
    stages = Graph(load_config(run)).enabled()
    assert stages == [
        "tokenize",
        "resize",
        "pretrain-stage1",
        "pretrain-stage2",
        "export",
        "sft",
        "eval",
    ]
    assert _statuses(page) == dict.fromkeys(stages, "done")
    assert [m for m in re.findall(r'data-stage="([^"]+)"', page)] == stages  # graph order
    for section in ("Tokenizer", "Held-out loss per character", "Pre-training"):
        assert f">{section}</h2>" in page
    assert ">Instruction tuning</h2>" in page and ">Evaluation</h2>" in page
    # tokenizer chart, held-out loss, training curves, sft, eval scores (acc and bits/char),
    # and the multiple-choice task's per-subject bars
    assert len(report_images(page)) == 7
    assert "mc_0shot per subject" in page and "ppl_ppl" in page
    assert "new tokens" in page and "held-out loss/char, base" in page
    assert "not measured: disabled by pretrain.energy.enabled: false" in page
    assert ">Recorded answers</h2>" in page  # eval's samples, read, not generated


def test_a_changed_input_shows_the_stage_as_stale_with_its_reason(run):
    page = _report(run, "--set", "sft.lr=0.5")
    statuses = _statuses(page)
    assert statuses["sft"] == "stale" and statuses["eval"] == "stale"
    assert all(statuses[s] == "done" for s in ("tokenize", "resize", "export"))
    row = page[page.index('data-stage="sft"') :].split("</tr>")[0]
    assert "changed: config.sft" in row
    assert _statuses(_report(run))["sft"] == "done"  # the report follows the config it is given


def test_status_names_the_report_and_the_baseline_is_compared(run, tmp_path):
    results = json.loads((load_config(run).run_dir / "eval" / "results.json").read_text())
    baseline = json.loads(json.dumps(results))
    baseline["model"] = "the-base"
    baseline["tasks"]["ppl_ppl"]["bits_per_char"] += 1.0
    for subject in baseline["tasks"]["mc_0shot"]["subjects"].values():
        subject["acc"] = 0.25
    path = tmp_path / "base-results.json"
    path.write_text(json.dumps(baseline))
    page = _report(run, "--baseline", str(path))
    assert "the-base" in page and ">baseline</th>" in page and ">change</th>" in page
    assert "class='num better'>-1</td>" in page  # one bit per character fewer
    assert len(report_images(page)) == 7

    status = runner.invoke(app, ["status", str(run)])
    assert status.exit_code == 0 and "report: " in status.output

    missing = runner.invoke(app, ["report", str(run), "--baseline", str(tmp_path / "no.json")])
    assert missing.exit_code == 1
    assert missing.output.count("\n") == 1 and "no.json does not exist" in missing.output
    never = runner.invoke(app, ["report", str(run), "--set", "run.name=never-run"])
    assert never.exit_code == 1 and never.output.count("\n") == 1
    assert "there is no run directory" in never.output
    assert not (load_config(run).run_dir.parent / "never-run").exists()


def test_the_page_is_self_contained(run):
    page = _report(run)
    assert "default-src 'none'; img-src data:; style-src 'unsafe-inline'" in page
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert "<script" not in page and "<link" not in page and "url(" not in page


def test_the_page_renders_in_headless_chromium_with_every_chart(run, chromium, tmp_path):
    from PIL import Image

    page = load_config(run).run_dir / "report.html"
    _report(run)
    base = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = rendered_dom(chromium, page, tmp_path / "profile")
    assert set(_statuses(dom)) == set(Graph(load_config(run)).enabled())
    assert len(report_images(dom)) == 7
    shot = tmp_path / "shot.png"
    result = subprocess.run(
        [*base, "--hide-scrollbars", "--window-size=1200,3000", f"--screenshot={shot}"]
        + [page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    image = Image.open(shot).convert("L")
    histogram = image.histogram()
    dark = sum(histogram[:200]) / (image.width * image.height)
    assert 0.005 < dark < 0.6  # text and charts drawn, not a blank or black page


def test_tensorboard_receives_the_logged_scalars_once(run):
    if not TENSORBOARD:
        pytest.skip("tensorboard is not installed (it is in the dev extra)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = load_config(run).run_dir
    for stage in ("pretrain-stage1", "pretrain-stage2", "sft"):
        folder = run_dir / "tracking" / stage
        assert list(folder.glob("events.out.tfevents.*")), stage
        events = EventAccumulator(str(folder))
        events.Reload()
        logged = [json.loads(line) for line in (run_dir / stage / "log.jsonl").open()]
        steps = [e["step"] for e in logged if "loss" in e]
        assert [s.step for s in events.Scalars("loss")] == steps
        assert [s.value for s in events.Scalars("loss")] == pytest.approx(
            [e["loss"] for e in logged if "loss" in e]
        )


def test_a_tracker_that_is_not_installed_stops_in_one_line(run, monkeypatch):
    monkeypatch.setattr("accelerate.utils.is_wandb_available", lambda: False)
    manifest = (load_config(run).run_dir / "manifest.json").read_text()
    for command in (["pretrain", "--force"], ["sft", "--force"], ["run", "--force"]):
        result = runner.invoke(
            app, [command[0], str(run), "--set", "run.report_to=[wandb]", *command[1:]]
        )
        assert result.exit_code == 1
        assert result.output.count("\n") == 1, result.output
        assert "run.report_to names wandb, which is not installed" in result.output
    assert (load_config(run).run_dir / "manifest.json").read_text() == manifest  # nothing ran
    unknown = runner.invoke(app, ["validate", str(run), "--set", "run.report_to=[neptune]"])
    assert unknown.exit_code == 1 and "report_to" in unknown.output
