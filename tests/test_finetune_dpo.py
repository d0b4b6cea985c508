"""`lowlm finetune` (downstream classification) and `lowlm dpo` (preference tuning)."""

from __future__ import annotations

import json
import random

import pytest

from lowlm.config import load_config
from lowlm.errors import LowlmError
from lowlm.stages import dpo, finetune, init
from lowlm.training.classification import scores

from .conftest import DEMO, pipeline_config, tokenize_once

LINES = [line for line in (DEMO / "zh-tw.txt").read_text(encoding="utf-8").split("\n") if line]


def labelled(path, count: int, seed: int) -> None:
    """Sentences ending in one of two marks: the label is the mark, the rest is noise."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as handle:
        for _ in range(count):
            label = rng.choice(["正面", "負面"])
            text = rng.choice(LINES)[:30] + ("好好好" if label == "正面" else "壞壞壞")
            handle.write(json.dumps({"text": text, "label": label}, ensure_ascii=False) + "\n")


@pytest.fixture
def from_scratch(write_config, tokenized_runs):
    """from_scratch(**sections): the config of a tokenized and initialised tiny run."""

    def make(**sections):
        raw = pipeline_config(None, init={"size": "tiny"}, **sections)
        config = load_config(write_config(**raw))
        tokenize_once(config, raw, tokenized_runs)
        init.run(config)
        return config

    return make


@pytest.mark.slow
def test_finetune_beats_the_majority_class_and_writes_its_results(from_scratch, tmp_path):
    labelled(tmp_path / "train.jsonl", 96, 0)
    labelled(tmp_path / "test.jsonl", 60, 1)
    config = from_scratch(
        finetune={
            "train": str(tmp_path / "train.jsonl"),
            "test": str(tmp_path / "test.jsonl"),
            "epochs": 2,
            "lr": 2e-3,
            "batch_size": 16,
            "max_length": 64,
            "energy": {"enabled": False},
        },
    )
    metrics = finetune.run(config)
    folder = config.run_dir / "finetune"
    results = json.loads((folder / "results.json").read_text())
    assert results["accuracy"] == metrics["accuracy"]
    assert results["accuracy"] >= 0.85 > results["majority_class_accuracy"] + 0.2
    assert set(results["labels"]) == {"正面", "負面"} and results["n"] == 60
    matrix = results["confusion_matrix"]["rows_gold_columns_predicted"]
    assert sum(map(sum, matrix)) == 60
    assert json.loads((folder / "labels.json").read_text())["labels"] == ["正面", "負面"]
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(folder)
    assert model.config.id2label[0] == "正面"


def test_finetune_bad_labels_are_one_line(from_scratch, write_config, tmp_path):
    labelled(tmp_path / "train.jsonl", 20, 0)
    (tmp_path / "test.jsonl").write_text('{"text": "中立的句子", "label": "中立"}\n')
    config = from_scratch(
        finetune={"train": str(tmp_path / "train.jsonl"), "test": str(tmp_path / "test.jsonl")},
    )
    with pytest.raises(LowlmError, match=r"test.jsonl:1: test label '中立' never occurs"):
        finetune.run(config)
    (tmp_path / "one.jsonl").write_text('{"text": "一", "label": 1}\n{"text": "二", "label": 1}\n')
    config = load_config(
        write_config(
            **pipeline_config(
                None,
                init={"size": "tiny"},
                finetune={
                    "train": str(tmp_path / "one.jsonl"),
                    "test": str(tmp_path / "one.jsonl"),
                },
            )
        )
    )
    with pytest.raises(LowlmError, match="one label"):
        finetune.run(config)
    (tmp_path / "nofield.jsonl").write_text('{"sentence": "一", "label": 1}\n')
    config = load_config(
        write_config(
            **pipeline_config(
                None, init={"size": "tiny"}, finetune={"train": str(tmp_path / "nofield.jsonl")}
            )
        )
    )
    with pytest.raises(LowlmError, match=r"nofield.jsonl:1: no field 'text'"):
        finetune.run(config)


def test_the_metrics_of_a_known_confusion():
    result = scores([0, 0, 1, 1, 2], [0, 1, 1, 1, 0], ["a", "b", "c"])
    assert result["accuracy"] == pytest.approx(3 / 5)
    assert result["labels"]["a"]["precision"] == pytest.approx(1 / 2)
    assert result["labels"]["b"]["recall"] == pytest.approx(1.0)
    assert result["labels"]["c"]["f1"] == 0.0
    assert result["confusion_matrix"]["rows_gold_columns_predicted"] == [
        [1, 1, 0],
        [0, 2, 0],
        [1, 0, 0],
    ]


def preference_pairs(path, count: int, seed: int) -> None:
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as handle:
        for _ in range(count):
            prompt = rng.choice(LINES)[:20] + "？"
            record = {"prompt": prompt, "chosen": "是的，沒錯。", "rejected": "不知道啦。"}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


@pytest.mark.slow
def test_dpo_raises_the_held_out_reward_accuracy(from_scratch, tmp_path):
    preference_pairs(tmp_path / "pairs.jsonl", 48, 0)
    config = from_scratch(
        dpo={
            "data": [str(tmp_path / "pairs.jsonl")],
            "template": "問：{user}\n答：{assistant}",
            "steps": 12,
            "lr": 5e-3,
            "beta": 0.5,
            "batch_size": 4,
            "eval_fraction": 0.25,
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
            "energy": {"enabled": False},
        },
    )
    metrics = dpo.run(config)
    assert metrics["heldout_reward_accuracy_before"] == 0.0  # a fresh adapter: no preference
    assert metrics["heldout_reward_accuracy"] > 0.5 and metrics["heldout_reward_margin"] > 0
    card = json.loads((config.run_dir / "dpo" / "lowlm_model.json").read_text())
    assert card["kind"] == "adapter" and card["template"] == "問：{user}\n答：{assistant}"
    from lowlm.models.load import load_model

    load_model(config.run_dir / "dpo")  # generate / eval load it like any adapter


def test_dpo_bad_pairs_are_one_line(from_scratch, tmp_path):
    (tmp_path / "pairs.jsonl").write_text('{"prompt": "你好", "chosen": "好", "rejected": "好"}\n')
    config = from_scratch(dpo={"data": [str(tmp_path / "pairs.jsonl")], "template": "alpaca"})
    with pytest.raises(LowlmError, match=r"pairs.jsonl:1: chosen and rejected are the same"):
        dpo.run(config)
