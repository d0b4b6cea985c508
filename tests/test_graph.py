"""The stage graph: content-chained keys, stale states, refusals, and the run directory's writes."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lowlm.cli import app
from lowlm.config import load_config
from lowlm.errors import LowlmError
from lowlm.graph import ORDER, STAGES, Graph
from lowlm.models.load import load_model
from lowlm.rundir import atomic_dir, atomic_write_text, recover_dir
from lowlm.stages import eval as eval_stage
from lowlm.stages import init, sft, tokenize

from .conftest import DEMO, pipeline_config, tokenize_once

runner = CliRunner()
PIPELINE = ["tokenize", "resize", "pretrain-stage1", "pretrain-stage2", "export", "sft", "eval"]


@pytest.mark.slow
def test_stage_order_and_parents_are_declared_in_one_module():
    """No stage module keeps its own list of which stage feeds which."""
    source = Path(__file__).resolve().parents[1] / "src" / "lowlm"
    for path in source.rglob("*.py"):
        if path.name == "graph.py":
            continue
        text = path.read_text(encoding="utf-8")
        for name in ("PARENTS", "SOURCES", "STAGE_FOLDERS", ".newest("):
            assert name not in text, f"{path} declares {name}"
        assert '["export", "pretrain-full"' not in text and "'pretrain-stage2'," not in text
    assert ORDER[:2] == ["prepare", "tokenize"] and ORDER[-1] == "eval"
    assert all(p in ORDER[: ORDER.index(s)] for s in ORDER for p in STAGES[s].needs)
    assert all(p in ORDER[: ORDER.index(s)] for s in ORDER for p in STAGES[s].models_from)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_base):
    """One tiny run through every model stage, with its inputs in files the tests may edit."""
    root = tmp_path_factory.mktemp("graph")
    base = root / "base"
    shutil.copytree(tiny_base, base)
    corpus = root / "zh.txt"
    corpus.write_text((DEMO / "zh-tw.txt").read_text(encoding="utf-8"), encoding="utf-8")
    english = root / "en.txt"
    english.write_text("\n".join(DEMO.joinpath("en.txt").read_text().split("\n")[:40]) + "\n")
    data = root / "instructions.jsonl"
    data.write_text((DEMO / "instructions.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    ppl = root / "ppl.txt"
    ppl.write_text("第一行測試文字。\n第二行測試文字。\n", encoding="utf-8")
    sections = pipeline_config(
        base,
        run={"root": str(root / "runs"), "name": "g"},
        tokenize={"corpus": [str(corpus)], "eval_texts": {"en": str(english)}, "num_threads": 1},
        pretrain={
            "stage1": {"steps": 1},
            "stage2": {"steps": 1, "lora": {"r": 2, "alpha": 4}},
        },
        sft={
            "data": [str(data)],
            "steps": 1,
            "batch_size": 2,
            "max_length": 64,
            "lora": {"r": 2, "alpha": 4},
            "energy": {"enabled": False},
        },
        eval={"tasks": [{"name": "ppl", "path": str(ppl)}]},
    )
    import yaml

    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(sections, allow_unicode=True), encoding="utf-8")
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 0, result.output
    files = {"base": base, "corpus": corpus, "english": english, "data": data, "ppl": ppl}
    return path, files


def states(path: Path, overrides: list[str] | None = None) -> dict[str, str]:
    graph = Graph(load_config(path, overrides))
    return {name: graph.state(name).status for name in graph.enabled()}


def stale_after(path: Path, overrides: list[str] | None = None) -> list[str]:
    found = states(path, overrides)
    assert set(found) == set(PIPELINE)
    assert set(found.values()) <= {"done", "stale"}, found
    return [name for name in PIPELINE if found[name] == "stale"]


@pytest.mark.slow
def test_every_stage_is_done_after_run(pipeline):
    path, _ = pipeline
    assert stale_after(path) == []
    result = runner.invoke(app, ["status", str(path)])
    assert result.exit_code == 0 and result.stdout.count(" done ") == len(PIPELINE)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("override", "first"),
    [
        ("tokenize.vocab_size=1400", "tokenize"),
        ("data.min_chars=2", "tokenize"),
        ("run.seed=7", "tokenize"),
        ("resize.init=mean", "resize"),
        ("model.dtype=fp32", "resize"),
        ("pretrain.block_size=24", "pretrain-stage1"),
        ("pretrain.stage1.lr=0.001", "pretrain-stage1"),
        ("pretrain.stage2.lr=0.002", "pretrain-stage2"),
        ("pretrain.stage2.lora.r=4", "pretrain-stage2"),
        ("export.tolerance=0.01", "export"),
        ("sft.lr=0.001", "sft"),
        ("sft.template=chatml", "sft"),
        ("eval.add_bos=true", "eval"),
        # bookkeeping: how a stage logs or saves is not what it computes
        ("pretrain.log_every=3", None),
        ("sft.save_every=7", None),
        ("sft.packing=false", "sft"),
        ("sft.quantize_base=4bit", "sft"),
        ("pretrain.isolate_documents=true", "pretrain-stage1"),
        # speed and memory switches compute the same thing: a run resumes across them
        ("pretrain.gradient_checkpointing=true", None),
        ("sft.compile=true", None),
        ("sft.liger_kernel=true", None),
        ("model.attn_implementation=eager", None),
    ],
)
def test_a_config_change_makes_exactly_its_stage_and_those_below_stale(pipeline, override, first):
    path, _ = pipeline
    expected = PIPELINE[PIPELINE.index(first) :] if first else []
    assert stale_after(path, [override]) == expected


@pytest.mark.slow  # reads the whole-pipeline run
@pytest.mark.parametrize(
    ("name", "first"),
    [
        ("corpus", "tokenize"),
        ("english", "tokenize"),
        ("base", "resize"),  # the base's weights: not the tokenizer, which reads only its files
        ("data", "sft"),
        ("ppl", "eval"),
    ],
)
def test_a_changed_file_makes_exactly_its_readers_and_those_below_stale(pipeline, name, first):
    path, files = pipeline
    target = files[name] / "model.safetensors" if name == "base" else files[name]
    original = target.read_bytes()
    try:
        target.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # one bit, same size
        stale = stale_after(path)
        assert stale == PIPELINE[PIPELINE.index(first) :]
        graph = Graph(load_config(path))
        assert "changed:" in graph.state(first).reason
    finally:
        target.write_bytes(original)
    assert stale_after(path) == []  # the same bytes again: done again, whatever the mtime


@pytest.mark.slow  # reads the whole-pipeline run
def test_an_artifact_touched_after_its_stage_is_stale_and_refused_downstream(pipeline):
    path, _ = pipeline
    config = load_config(path)
    card = config.run_dir / "pretrain-stage2" / "lowlm_model.json"
    original = card.read_bytes()
    try:
        card.write_bytes(original + b" ")
        assert stale_after(path) == ["pretrain-stage2"]
        assert "output changed" in Graph(config).state("pretrain-stage2").reason
        result = runner.invoke(app, ["export", str(path), "--force"])
        assert result.exit_code == 1
        assert "export reads pretrain-stage2, which is stale (output changed" in result.output
    finally:
        card.write_bytes(original)


@pytest.mark.slow
def test_sft_after_a_changed_parent_refuses_and_generate_refuses_the_old_adapter(
    write_config, tmp_path
):
    """The reported case: init changed and rerun, then sft said 'already done' and generate ran
    the old adapter on the new model."""
    data = tmp_path / "qa.jsonl"
    data.write_text(
        json.dumps({"instruction": "你好", "output": "哈囉"}, ensure_ascii=False) + "\n",
        encoding="utf-8",
    )
    sections = pipeline_config(
        None,
        init={"size": "tiny"},
        sft={
            "data": [str(data)],
            "steps": 1,
            "batch_size": 1,
            "max_length": 64,
            "eval_fraction": 0,
            "lora": {"r": 2, "alpha": 4},
            "energy": {"enabled": False},
        },
    )
    path = write_config(**sections)
    config = load_config(path)
    tokenize.run(config)
    init.run(config)
    sft.run(config)
    assert (
        runner.invoke(
            app, ["generate", str(path), "-p", "你好", "--greedy", "--max-new-tokens", "2"]
        ).exit_code
        == 0
    )

    changed = load_config(path, ["init.hidden_size=96"])
    result = runner.invoke(app, ["sft", str(path), "--set", "init.hidden_size=96"])
    assert result.exit_code == 1
    assert "sft reads init, which is stale (changed: config.init); run `lowlm init" in result.output
    init.run(changed)  # the parent is rebuilt; sft is not yet
    # the old adapter is refused over the rebuilt model, by default and by path
    result = runner.invoke(
        app, ["generate", str(path), "--set", "init.hidden_size=96", "-p", "你好"]
    )
    assert result.exit_code == 1 and "sft, which is stale" in result.output
    with pytest.raises(LowlmError, match="trained on another version of"):
        load_model(config.run_dir / "sft")
    result = runner.invoke(app, ["sft", str(path), "--set", "init.hidden_size=96"])
    assert result.exit_code == 0 and "already done" not in result.output
    load_model(config.run_dir / "sft")  # rebuilt on the new model: loads


def test_eval_reruns_when_its_data_changes_in_place(write_config, tmp_path, tiny_base):
    ppl = tmp_path / "ppl.txt"
    ppl.write_text("第一行。\n", encoding="utf-8")
    path = write_config(
        model={"base": str(tiny_base)}, eval={"tasks": [{"name": "ppl", "path": str(ppl)}]}
    )
    first = eval_stage.run(load_config(path))
    assert first["tasks"]["ppl_ppl"]["lines"] == 1
    ppl.write_text("第一行。\n第二行。\n", encoding="utf-8")
    again = eval_stage.run(load_config(path))
    assert again["tasks"]["ppl_ppl"]["lines"] == 2


def test_status_shows_interrupted_and_not_run(write_config, tmp_path):
    path = write_config(**pipeline_config(None, init={"size": "tiny"}))
    config = load_config(path)
    tokenize.run(config)
    manifest = json.loads((config.run_dir / "manifest.json").read_text())
    manifest["stages"]["init"] = {"status": "running", "pid": 2**22 + 12345, "host": os.uname()[1]}
    (config.run_dir / "manifest.json").write_text(json.dumps(manifest))
    result = runner.invoke(app, ["status", str(path)])
    lines = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    assert " done " in lines["tokenize"] and "interrupted" in lines["init"]
    assert set(lines) == {"tokenize", "init"}


# ----- the run directory's writes ---------------------------------------------------------------


def test_artifacts_honour_the_umask(tmp_path, monkeypatch):
    import lowlm.rundir

    monkeypatch.setattr(lowlm.rundir, "_UMASK", 0o022)  # read once, when lowlm starts
    atomic_write_text(tmp_path / "a.json", "{}")
    with atomic_dir(tmp_path / "folder") as out:
        (out / "x").write_text("x")
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "folder").stat().st_mode) == 0o755


def test_a_kill_between_the_two_moves_keeps_the_previous_artifact(tmp_path, monkeypatch):
    target = tmp_path / "model"
    with atomic_dir(target) as out:
        (out / "weights").write_text("old")
    real_replace = os.replace
    calls = []

    def killed_after_first(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies between moving aside and moving in
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_after_first)
    with pytest.raises(KeyboardInterrupt), atomic_dir(target) as out:
        (out / "weights").write_text("new")
    monkeypatch.setattr(os, "replace", real_replace)
    assert not target.exists()  # at this instant only the moved-aside copy exists...
    recover_dir(target)  # ...and the next start puts it back
    assert (target / "weights").read_text() == "old"
    with atomic_dir(target) as out:
        (out / "weights").write_text("new")
    assert (target / "weights").read_text() == "new"
    assert not any(p.name.endswith(".old") for p in tmp_path.iterdir())


def test_a_tokenizer_left_by_an_earlier_config_is_not_read(write_config, tiny_base, tokenized_runs):
    """The run folder still holds a merged tokenizer from before; this config builds none, so
    stage 2 trains on the base with the base's own tokenizer, not the leftover."""
    from lowlm.stages import pretrain

    raw = pipeline_config(tiny_base)
    first = load_config(write_config(**raw))
    tokenize_once(first, raw, tokenized_runs)
    assert (first.run_dir / "tokenizer" / "tokenizer.json").exists()
    sections = pipeline_config(
        tiny_base,
        tokenize={"corpus": [], "merge": False},
        pretrain={
            "corpus": [str(DEMO / "zh-tw.txt")],
            "stage2": {"steps": 1, "train_embeddings": "none", "lora": {"r": 2, "alpha": 4}},
        },
    )
    second = load_config(write_config(**sections))
    pretrain.run(second)
    card = json.loads((second.run_dir / "pretrain-stage2" / "lowlm_model.json").read_text())
    assert card["vocab_size"] == 800  # the base's vocabulary, not the leftover merge's
