"""lm-evaluation-harness tasks in `lowlm eval`: the same scores as the harness run by hand,
recorded beside the native tasks, keyed by the task's YAML, and bad input in one line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lowlm.cli import app
from lowlm.config import load_config
from lowlm.errors import LowlmError
from lowlm.graph import Graph

from .conftest import DEMO, write_harness_task

lm_eval = pytest.importorskip("lm_eval")
runner = CliRunner()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where lowlm eval puts the model


def eval_config(write_config, model: Path, folder: Path, *tasks: dict) -> Path:
    return write_config(
        model={"dtype": "fp32"},  # on a GPU too: the same weights as the harness loads them
        eval={
            "model": str(model),
            "batch_size": 2,
            "tasks": list(tasks),
            "harness_include": [str(folder)],
        },
    )


def test_a_harness_task_scores_identically_through_lowlm_eval_and_lm_eval(
    write_config, tiny_base, tmp_path
):
    folder = tmp_path / "tasks"
    yaml_path = write_harness_task(folder)
    path = eval_config(
        write_config,
        tiny_base,
        folder,
        {"harness": "demo_mc", "shots": 2},
        {"name": "ppl", "path": str(DEMO / "en.txt")},
    )
    result = runner.invoke(app, ["eval", str(path)])
    assert result.exit_code == 0, result.output
    eval_dir = tmp_path / "runs" / "t" / "eval"
    ours = json.loads((eval_dir / "results.json").read_text())["tasks"]
    assert set(ours) == {"demo_mc_2shot", "ppl_en"}  # beside a native task
    task = ours["demo_mc_2shot"]

    # The harness by hand, as its CLI runs it: the model loaded from the folder by lm_eval.
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    theirs = simple_evaluate(
        model="hf",
        model_args={"pretrained": str(tiny_base), "dtype": "float32", "device": DEVICE},
        tasks=["demo_mc"],
        num_fewshot=2,
        batch_size=2,
        task_manager=TaskManager(include_path=[str(folder)], include_defaults=False),
    )
    row = theirs["results"]["demo_mc"]
    assert (
        task["metric"] == "acc" and task["n"] == 12 == theirs["n-samples"]["demo_mc"]["effective"]
    )
    for metric in ("acc", "acc_norm"):
        assert task["metrics"][metric]["value"] == row[f"{metric},none"]
        assert task["metrics"][metric]["stderr"] == row[f"{metric}_stderr,none"]
    assert task["harness_version"] == lm_eval.__version__ and len(task["config_hash"]) == 64
    assert task["subtasks"]["demo_mc"]["shots"] == 2
    samples = [json.loads(x) for x in (eval_dir / "samples-demo_mc_2shot.jsonl").open()]
    by_hand = theirs["samples"]["demo_mc"]
    assert [s["index"] for s in samples] == [s["doc_id"] for s in by_hand]
    for sample, reference in zip(samples, by_hand, strict=True):
        scores = [float(r[0]) for r in reference["filtered_resps"]]
        assert sample["scores"] == scores
        assert sample["prediction"] == scores.index(max(scores))
        assert sample["acc"] == reference["acc"] and sample["target"] == reference["target"]
    assert "| demo_mc_2shot | harness | 2 | 12 |" in (eval_dir / "results.md").read_text()

    compared = runner.invoke(
        app, ["eval", "--compare", str(eval_dir / "results.json"), str(eval_dir / "results.json")]
    )
    assert "| demo_mc_2shot | acc_norm |" in compared.stdout
    assert runner.invoke(app, ["report", str(path)]).exit_code == 0
    page = (tmp_path / "runs" / "t" / "report.html").read_text(encoding="utf-8")
    stderr = task["metrics"]["acc"]["stderr"]
    assert (
        f"<td>demo_mc_2shot</td><td>acc</td><td class='num'>{task['acc']:.4g} ± {stderr:.4g}"
        in page
    )

    # The task's YAML is an input of the stage: editing it makes eval stale.
    config = load_config(path)
    assert Graph(config).state("eval").status == "done"
    yaml_path.write_text(yaml_path.read_text().replace('"{{question}}"', '"Q: {{question}}"'))
    state = Graph(load_config(path)).state("eval")
    assert state.status == "stale" and "harness:demo_mc" in state.reason


def fails(path: Path) -> str:
    result = runner.invoke(app, ["eval", str(path)])
    assert result.exit_code == 1, result.output
    errors = [x for x in result.output.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert result.output.strip().endswith(errors[0])
    return errors[0]


def test_a_limit_over_the_tasks_size_is_refused(write_config, tiny_base, tmp_path):
    write_harness_task(tmp_path / "tasks")
    path = eval_config(
        write_config, tiny_base, tmp_path / "tasks", {"harness": "demo_mc", "limit": 13}
    )
    assert "limit 13 is over the 12 questions of demo_mc" in fails(path)


def test_data_on_the_hub_while_offline_is_refused_before_the_model_loads(
    write_config, tiny_base, tmp_path, monkeypatch
):
    import datasets
    import huggingface_hub

    folder = tmp_path / "tasks"
    write_harness_task(folder, "hub_mc", dataset_path="facebook/belebele", dataset_kwargs={})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("lowlm.stages.eval.load_for_inference", no_model)
    line = fails(eval_config(write_config, tiny_base, folder, {"harness": "hub_mc"}))
    assert "harness task 'hub_mc' needs its data from the Hugging Face Hub" in line
    assert "facebook/belebele" in line


def test_a_generative_task_needing_a_chat_template_the_model_lacks_is_refused(
    write_config, tiny_base, tmp_path
):
    folder = tmp_path / "tasks"
    write_harness_task(
        folder,
        "demo_gen",
        output_type="generate_until",
        doc_to_target="{{choices[label]}}",
        doc_to_choice=None,
        generation_kwargs={"until": ["\n"], "max_gen_toks": 8},
        metric_list=[{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
    )
    path = eval_config(
        write_config, tiny_base, folder, {"harness": "demo_gen", "chat_template": True}
    )
    line = fails(path)
    assert "'demo_gen' is generative (demo_gen)" in line and "tokenizer has none" in line


def test_an_unknown_harness_task_suggests_the_nearest_names(write_config, tiny_base):
    # no user folder: the harness's built-in index (~14,000 task files parsed, seconds) is
    # then the one the recipe test below reads too, built once per process
    path = write_config(eval={"model": str(tiny_base), "tasks": [{"harness": "belebele_por_latn"}]})
    line = fails(path)
    assert "unknown lm-evaluation-harness task or group 'belebele_por_latn'" in line
    assert "belebele_por_Latn" in line


def test_without_the_harness_a_harness_task_names_the_extra(
    write_config, tiny_base, tmp_path, monkeypatch
):
    monkeypatch.setitem(__import__("sys").modules, "lm_eval", None)  # import fails
    path = eval_config(write_config, tiny_base, tmp_path, {"harness": "arc_easy"})
    assert "needs lm-evaluation-harness, which is not installed" in fails(path)
    assert "lowlm[harness]" in fails(path)


@pytest.mark.parametrize(
    ("task", "message"),
    [
        ({"harness": "arc_easy", "name": "mmlu"}, "either `name` (native) or `harness`"),
        ({"harness": "arc_easy", "path": "x"}, "path applies to native tasks only"),
        ({"name": "mmlu", "shots": 6}, "native tasks take at most 5 shots"),
    ],
)
def test_a_task_is_native_or_harness_not_both(write_config, task, message):
    with pytest.raises(LowlmError, match=re.escape(message)):
        load_config(write_config(eval={"tasks": [task]}))


def test_every_harness_task_a_recipe_names_is_in_the_harness_index():
    from lowlm.evaluation.harness import manager_for

    recipes = sorted((Path(__file__).parents[1] / "configs" / "recipes").glob("*.yaml"))
    names = {t.harness for r in recipes for t in load_config(r).eval.tasks if t.harness}
    assert {"belebele_por_Latn", "belebele_zho_Hant", "belebele_zho_Hans", "arc_pt"} <= names
    for name in names:
        assert name in manager_for(name, []).task_index


def test_harness_tasks_are_not_scored_during_training():
    from lowlm.config import EvalTask
    from lowlm.evaluation.runners import periodic_eval

    with pytest.raises(LowlmError, match="harness task 'arc_easy' is not scored during training"):
        periodic_eval([EvalTask(harness="arc_easy")], tokenizer=None)
