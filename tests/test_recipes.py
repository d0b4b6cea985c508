"""The source projects' recipes run end to end, scaled down by --set on tiny local stand-ins,
so that no recipe rots: Chinese-LLaMA-2, TeenyTinyLlama 160m / 460m, Hyacinth6B (a ChatGLM
stand-in that ships its own modeling code, loaded only with model.trust_remote_code)."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lowlm.cli import app

from .conftest import DEMO

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "configs" / "recipes"
runner = CliRunner()

QUESTIONS = [
    ["一加一等於多少？", "一", "二", "三", "四", "B"],
    ["哪一個是顏色？", "紅", "狗", "跑", "上", "A"],
    ["哪一個是動物？", "桌", "書", "貓", "雲", "C"],
]

MODELING = '''
import torch
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast


class TinyGLMConfig(PretrainedConfig):
    model_type = "tinyglm"

    def __init__(self, vocab_size=100, hidden_size=32, num_layers=2, **kwargs):
        self.vocab_size, self.hidden_size, self.num_layers = vocab_size, hidden_size, num_layers
        super().__init__(**kwargs)


class Block(nn.Module):
    """ChatGLM's module names: query_key_value, dense, dense_h_to_4h, dense_4h_to_h."""

    def __init__(self, size):
        super().__init__()
        self.norm = nn.LayerNorm(size)
        self.query_key_value = nn.Linear(size, 3 * size)
        self.dense = nn.Linear(size, size)
        self.dense_h_to_4h = nn.Linear(size, 4 * size)
        self.dense_4h_to_h = nn.Linear(4 * size, size)

    def forward(self, x, mask):
        q, k, v = self.query_key_value(self.norm(x)).chunk(3, dim=-1)
        scores = q @ k.transpose(1, 2) / q.shape[-1] ** 0.5
        causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device).tril()
        keep = causal[None] & mask[:, None, :].bool()
        scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
        x = x + self.dense(scores.softmax(-1) @ v)
        return x + self.dense_4h_to_h(torch.relu(self.dense_h_to_4h(x)))


class TinyGLMForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = TinyGLMConfig
    _no_split_modules = ["Block"]

    def __init__(self, config):
        super().__init__(config)
        self.embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config.hidden_size) for _ in range(config.num_layers))
        self.output_layer = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.embedding

    def get_output_embeddings(self):
        return self.output_layer

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        x = self.embedding(input_ids)
        for layer in self.layers:
            x = layer(x, attention_mask)
        logits = self.output_layer(x)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                labels[:, 1:].reshape(-1),
                ignore_index=-100,
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits)
'''


@pytest.fixture(scope="module")
def glm_standin(tmp_path_factory, sp_base) -> Path:
    """A tiny model whose architecture exists only in its folder's own Python file."""
    from transformers import LlamaTokenizer

    folder = tmp_path_factory.mktemp("tinyglm")
    (folder / "modeling_tinyglm.py").write_text(MODELING, encoding="utf-8")
    tokenizer = LlamaTokenizer.from_pretrained(str(sp_base), add_bos_token=True)
    tokenizer.save_pretrained(folder)
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(
        "modeling_tinyglm", folder / "modeling_tinyglm.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["modeling_tinyglm"] = module
    spec.loader.exec_module(module)
    config = module.TinyGLMConfig(
        vocab_size=len(tokenizer),
        auto_map={
            "AutoConfig": "modeling_tinyglm.TinyGLMConfig",
            "AutoModelForCausalLM": "modeling_tinyglm.TinyGLMForCausalLM",
        },
        eos_token_id=tokenizer.eos_token_id,
    )
    module.TinyGLMForCausalLM(config).save_pretrained(folder)
    del sys.modules["modeling_tinyglm"]
    return folder


@pytest.fixture(scope="module")
def local_data(tmp_path_factory) -> dict[str, Path]:
    """Small local stand-ins for what the recipes read from the Hub or from big corpora."""
    root = tmp_path_factory.mktemp("recipe-data")
    for name, header, layout in (
        (
            "ceval",
            ["id", "question", "A", "B", "C", "D", "answer", "explanation"],
            "{split}/logic_{split}.csv",
        ),
        ("cmmlu", ["", "Question", "A", "B", "C", "D", "Answer"], "{split}/arts.csv"),
        ("tmmluplus", ["question", "A", "B", "C", "D", "answer"], "data/music_{split}.csv"),
    ):
        splits = {"ceval": ("val", "dev"), "cmmlu": ("test", "dev"), "tmmluplus": ("test", "train")}
        for split in splits[name]:
            path = root / name / layout.format(split=split)
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("w", encoding="utf-8", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(header)
                for i, q in enumerate(QUESTIONS):
                    if name == "ceval":
                        writer.writerow([str(i), *q, ""])
                    elif name == "cmmlu":
                        writer.writerow([str(i), *q])
                    else:
                        writer.writerow(q)
    mmlu = root / "mmlu" / "data"
    for split in ("test", "dev"):
        (mmlu / split).mkdir(parents=True)
        with (mmlu / split / f"anatomy_{split}.csv").open(
            "w", encoding="utf-8", newline=""
        ) as handle:
            csv.writer(handle).writerows(QUESTIONS)
    chats = root / "chats.jsonl"
    with chats.open("w", encoding="utf-8") as handle:
        for line in (DEMO / "instructions.jsonl").read_text(encoding="utf-8").split("\n"):
            if line.strip():
                record = json.loads(line)
                messages = record.get("messages") or [
                    {"role": "user", "content": record["instruction"]},
                    {"role": "assistant", "content": record["output"]},
                ]
                handle.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
    rng = random.Random(0)
    lines = [x for x in (DEMO / "zh-tw.txt").read_text(encoding="utf-8").split("\n") if x][:200]
    labelled = root / "hatebr.jsonl"
    with labelled.open("w", encoding="utf-8") as handle:
        for line in lines[:40]:
            label = rng.choice([0, 1])
            handle.write(json.dumps({"text": line[:20], "label": label}, ensure_ascii=False) + "\n")
    return {"root": root, "chats": chats, "labelled": labelled}


def tasks(data: dict, names: list[str]) -> str:
    paths = {
        "ceval": data["root"] / "ceval",
        "cmmlu": data["root"] / "cmmlu",
        "tmmluplus": data["root"] / "tmmluplus",
        "mmlu": data["root"] / "mmlu",
    }
    items = [f"{{name: {n}, path: '{paths[n]}', shots: {s}}}" for n in names for s in (0, 1)]
    return "eval.tasks=[" + ", ".join(items) + "]"


def run_recipe(name: str, tmp_path: Path, overrides: list[str]) -> dict:
    sets = [f"run.root={tmp_path / 'runs'}", "tokenize.num_threads=1", *overrides]
    args = ["run", str(RECIPES / name)]
    for value in sets:
        args += ["--set", value]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output[-3000:]
    manifests = list((tmp_path / "runs").glob("*/manifest.json"))
    return json.loads(manifests[0].read_text())["stages"]


SMALL_TRAINING = [
    "pretrain.block_size=32",
    "pretrain.batch_size=2",
    "pretrain.grad_accum=1",
    "pretrain.warmup_steps=0",
    "pretrain.energy.enabled=false",
    "pretrain.gradient_checkpointing=false",
]


@pytest.mark.parametrize("recipe", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_every_recipe_validates(recipe):
    result = runner.invoke(app, ["validate", str(RECIPES / recipe)])
    assert result.exit_code == 0, result.output


@pytest.mark.slow
def test_chinese_llama_2_recipe_runs_scaled_down(tmp_path, tiny_base, local_data):
    stages = run_recipe(
        "chinese-llama-2-7b.yaml",
        tmp_path,
        [
            f"model.base={tiny_base}",
            "model.dtype=fp32",
            f"tokenize.corpus=[{DEMO / 'zh-tw.txt'}]",
            "tokenize.vocab_size=1500",
            *SMALL_TRAINING,
            "pretrain.stage1.steps=1",
            "pretrain.stage2.steps=1",
            "pretrain.stage2.lora.r=2",
            f"sft.data=[{DEMO / 'instructions.jsonl'}]",
            "sft.steps=1",
            "sft.batch_size=2",
            "sft.max_length=128",
            "sft.lora.r=2",
            "sft.warmup_steps=0",
            "sft.gradient_checkpointing=false",
            "sft.energy.enabled=false",
            tasks(local_data, ["ceval", "cmmlu"]),
        ],
    )
    expected = ["tokenize", "resize", "pretrain-stage1", "pretrain-stage2", "export", "sft"]
    assert all(stages[s]["status"] == "done" for s in [*expected, "eval"])
    assert set(stages["eval"]["metrics"]) == {
        "ceval_0shot",
        "ceval_1shot",
        "cmmlu_0shot",
        "cmmlu_1shot",
    }


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["teenytinyllama-160m.yaml", "teenytinyllama-460m.yaml"])
def test_teenytinyllama_recipes_run_scaled_down_with_a_downstream_finetune(
    recipe, tmp_path, local_data
):
    stages = run_recipe(
        recipe,
        tmp_path,
        [
            f"tokenize.corpus=[{DEMO / 'zh-tw.txt'}]",
            "tokenize.vocab_size=1500",
            "init.size=tiny",
            *SMALL_TRAINING,
            "pretrain.full.steps=2",
            f"finetune.train={local_data['labelled']}",
            "finetune.epochs=1",
            "finetune.batch_size=8",
            "finetune.max_length=32",
            "finetune.energy.enabled=false",
            # the recipe's first task; its harness tasks need data from the Hub
            "eval.tasks=[{name: ppl, heldout: true}]",
        ],
    )
    for stage in ("tokenize", "init", "pretrain-full", "export", "finetune", "eval"):
        assert stages[stage]["status"] == "done", stage
    # the classifier was fine-tuned from this run's exported model, and its accuracy is the
    # share of the test examples its confusion matrix holds on the diagonal
    run_dir = tmp_path / "runs" / recipe.removesuffix(".yaml")
    card = json.loads((run_dir / "finetune" / "lowlm_model.json").read_text())
    assert Path(card["trained_from"]).resolve() == (run_dir / "export").resolve()
    confusion = json.loads((run_dir / "finetune" / "results.json").read_text())
    confusion = confusion["confusion_matrix"]["rows_gold_columns_predicted"]
    metrics = stages["finetune"]["metrics"]
    assert sum(map(sum, confusion)) == metrics["test_examples"] > 0
    correct = sum(row[i] for i, row in enumerate(confusion))
    assert metrics["accuracy"] == correct / metrics["test_examples"]
    # bits per character on the run's own held-out documents (the recipe's heldout: true)
    assert set(stages["eval"]["metrics"]) == {"ppl_heldout"}


@pytest.mark.slow
def test_hyacinth_recipe_needs_the_remote_code_flag_and_runs_on_a_standin(
    tmp_path, glm_standin, local_data
):
    common = [
        f"model.base={glm_standin}",
        "model.dtype=fp32",
        f"sft.data=[{local_data['chats']}]",
        "sft.steps=2",
        "sft.batch_size=2",
        "sft.max_length=96",
        "sft.energy.enabled=false",
        tasks(local_data, ["tmmluplus", "ceval"]),
    ]
    refused = runner.invoke(
        app,
        [
            "run",
            str(RECIPES / "hyacinth6b.yaml"),
            *[
                x
                for s in [
                    f"run.root={tmp_path / 'refused'}",
                    "model.trust_remote_code=false",
                    *common,
                ]
                for x in ("--set", s)
            ],
        ],
    )
    assert refused.exit_code == 1
    assert "ships its own code; set model.trust_remote_code: true" in refused.output
    assert "Traceback" not in refused.output
    stages = run_recipe("hyacinth6b.yaml", tmp_path, common)
    assert stages["sft"]["status"] == "done" and stages["eval"]["status"] == "done"
    card = json.loads((tmp_path / "runs" / "hyacinth6b" / "sft" / "lowlm_model.json").read_text())
    assert card["kind"] == "adapter"
    adapter = json.loads(
        (tmp_path / "runs" / "hyacinth6b" / "sft" / "adapter_config.json").read_text()
    )
    assert adapter["target_modules"] == ["query_key_value"]
