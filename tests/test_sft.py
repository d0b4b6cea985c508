"""`lowlm sft`, `lowlm generate`, `lowlm chat`: label masks, truncation, packing, overfitting."""

from __future__ import annotations

import json

import numpy as np
import pytest
from transformers import AutoTokenizer, LlamaTokenizer
from typer.testing import CliRunner

from lowlm.cli import app
from lowlm.config import InstructionFields, load_config
from lowlm.data.instructions import read_conversations
from lowlm.data.sft_examples import IGNORE, build_examples, pack, truncate
from lowlm.data.templates import Template
from lowlm.errors import LowlmError
from lowlm.stages import init, sft, tokenize

from .conftest import DEMO, pipeline_config, tokenize_once

CONVERSATION = [
    {"role": "system", "content": "你是助理。"},
    {"role": "user", "content": "你好", "input": "世界"},
    {"role": "assistant", "content": "哈囉，世界！"},
    {"role": "user", "content": "再見"},
    {"role": "assistant", "content": "再見！"},
]


@pytest.fixture(scope="session")
def sp_tokenizer(sp_base):
    return LlamaTokenizer.from_pretrained(str(sp_base), add_bos_token=True)


@pytest.fixture(scope="session")
def chat_tokenizer(byte_base):
    return AutoTokenizer.from_pretrained(byte_base)


def trained_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    runs, current = [], []
    for token, label in zip(ids, labels, strict=True):
        if label != IGNORE:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


@pytest.mark.parametrize(
    ("spec", "ends"),
    [
        ("alpaca", ["</s>", "</s>"]),
        ("llama2", [" </s>", " </s>"]),
        ("chatml", ["<|im_end|></s>", "<|im_end|></s>"]),
        ("<human>: {user}\n<bot>: {assistant}", ["</s>", "</s>"]),
    ],
)
def test_only_responses_and_their_end_tokens_carry_the_loss(sp_tokenizer, spec, ends):
    template = Template(spec, sp_tokenizer)
    rendered = template.render(CONVERSATION)
    ids, labels = template.encode(CONVERSATION)
    runs = [sp_tokenizer.decode(run) for run in trained_runs(ids, labels)]
    assert runs == ["哈囉，世界！" + ends[0], "再見！" + ends[1]]
    prompt = template.prompt(CONVERSATION[:2]).text
    assert rendered.text.startswith(prompt) and not prompt.endswith("哈")
    # what generate sends for the first turn is a prefix of the example, up to the answer
    prompt_ids = template.encode_prompt(CONVERSATION[:2])
    assert ids[: len(prompt_ids)] == prompt_ids and labels[len(prompt_ids)] != IGNORE


def test_alpaca_prompt_strings_with_and_without_input(sp_tokenizer):
    with_input = (
        Template("alpaca", sp_tokenizer)
        .prompt([{"role": "user", "content": "翻譯", "input": "你好"}])
        .text
    )
    assert with_input == (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n翻譯\n\n### Input:\n你好\n\n### Response:\n"
    )
    without = Template("alpaca", sp_tokenizer).prompt([{"role": "user", "content": "翻譯"}]).text
    assert without == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\n翻譯\n\n### Response:\n"
    )
    appended = (
        Template("alpaca", sp_tokenizer, append_input=True)
        .prompt([{"role": "user", "content": "翻譯", "input": "你好"}])
        .text
    )
    assert "### Instruction:\n翻譯\n你好\n\n### Response:\n" in appended
    assert "### Input" not in appended and appended.startswith(
        "Below is an instruction that describes a task. "
    )


def test_llama2_system_block_and_multi_turn(sp_tokenizer):
    text = Template("llama2", sp_tokenizer).render(CONVERSATION).text
    assert text == (
        "<s>[INST] <<SYS>>\n你是助理。\n<</SYS>>\n\n你好\n\n世界 [/INST] 哈囉，世界！ </s>"
        "<s>[INST] 再見 [/INST] 再見！ </s>"
    )


def test_tokenizer_chat_template_masks_assistant_turns(chat_tokenizer):
    template = Template("tokenizer", chat_tokenizer)
    rendered = template.render(
        [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello there"},
            {"role": "user", "content": "bye"},
            {"role": "assistant", "content": "see you"},
        ]
    )
    ids, labels = template.encode(
        [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello there"},
            {"role": "user", "content": "bye"},
            {"role": "assistant", "content": "see you"},
        ]
    )
    assert rendered.text.endswith("see you<|im_end|>\n")
    runs = [chat_tokenizer.decode(run) for run in trained_runs(ids, labels)]
    assert runs == ["hello there<|im_end|>\n", "see you<|im_end|>\n"]


def test_train_on_inputs_trains_every_token(sp_tokenizer):
    ids, labels = Template("alpaca", sp_tokenizer).encode(CONVERSATION, train_on_inputs=True)
    assert labels == ids


def test_truncation_keeps_part_of_the_response_and_counts(sp_tokenizer):
    long_prompt = [
        {"role": "user", "content": "說明" * 300},
        {"role": "assistant", "content": "好的，" * 30},
    ]
    short = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "哈囉" * 200}]
    fits = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "哈囉"}]
    template = Template("alpaca", sp_tokenizer)
    examples, report = build_examples([long_prompt, short, fits], template, 128)
    assert (report.examples, report.truncated, report.dropped) == (3, 2, 0)
    for example in examples:
        assert len(example["input_ids"]) <= 128
        assert (example["labels"] != IGNORE).sum() >= 1
    first = examples[0]
    assert first["input_ids"][0] == sp_tokenizer.bos_token_id  # the start survives
    assert (first["labels"] != IGNORE).sum() >= 128 // 4
    _, _, outcome = truncate(list(range(50)), [IGNORE] * 50, 10)
    assert outcome == "dropped"


def test_packing_keeps_every_label(sp_tokenizer):
    conversations = [
        [{"role": "user", "content": f"問題{i}"}, {"role": "assistant", "content": f"答案{i}"}]
        for i in range(10)
    ]
    examples, _ = build_examples(conversations, Template("alpaca", sp_tokenizer), 256)
    blocks = pack(examples, 256)
    assert len(blocks) < len(examples) and all(len(b["input_ids"]) <= 256 for b in blocks)

    def pieces(ids, labels, positions):
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(ids)]
        return [
            (tuple(ids[a:b]), tuple(labels[a:b]), tuple(positions[a:b]))
            for a, b in zip(starts, starts[1:], strict=False)
        ]

    packed = [
        piece for b in blocks for piece in pieces(b["input_ids"], b["labels"], b["position_ids"])
    ]
    # Every example once, whole, at its own positions, with every label it trains alone
    # (the model shifts: its first token is never a target).
    alone = [
        (
            tuple(e["input_ids"]),
            (IGNORE, *e["labels"][1:]),
            tuple(range(len(e["input_ids"]))),
        )
        for e in examples
    ]
    assert sorted(packed) == sorted(alone)


def test_packing_fills_blocks_tightly():
    rng = np.random.default_rng(0)
    lengths = np.minimum(512, rng.lognormal(5.3, 0.6, 400).astype(int) + 1)
    examples = [{"input_ids": np.ones(n, int), "labels": np.ones(n, int)} for n in lengths]
    blocks = pack(examples, 512)
    assert all(len(b["input_ids"]) <= 512 for b in blocks)
    assert lengths.sum() / (len(blocks) * 512) > 0.95  # in-order greedy packing gave ~0.8


def test_invalid_records_are_counted_with_file_and_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(
        "\n".join(
            [
                json.dumps({"instruction": "甲", "output": "乙"}, ensure_ascii=False),
                '{"instruction": "broken"',
                json.dumps({"instruction": "甲"}, ensure_ascii=False),
                json.dumps(
                    {"messages": [{"role": "assistant", "content": "先說話"}]}, ensure_ascii=False
                ),
                json.dumps(
                    {
                        "messages": [
                            {"from": "human", "value": "嗨"},
                            {"from": "gpt", "value": "你好"},
                        ]
                    },
                    ensure_ascii=False,
                ),
            ]
        )
        + "\n",
        encoding="utf-8",
    )
    fields = InstructionFields()
    conversations, report = read_conversations([str(path)], fields)
    assert (report.records, report.valid, report.invalid) == (5, 1, 4)
    assert report.problems[0].startswith(f"{path}:2: not valid JSON")
    assert report.problems[1] == f"{path}:3: no 'output' text"
    assert "must start with a user turn" in report.problems[2]
    sharegpt = InstructionFields(role="from", content="value")
    conversations, report = read_conversations([str(path)], sharegpt)
    assert conversations[-1] == [
        {"role": "user", "content": "嗨"},
        {"role": "assistant", "content": "你好"},
    ]


def test_no_valid_record_is_an_error(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"question": "a"}\n', encoding="utf-8")
    with pytest.raises(
        LowlmError, match=r"no valid instruction record .*data.jsonl:1: no 'instruction'"
    ):
        read_conversations([str(path)], InstructionFields())


def test_unknown_template_is_a_clear_error(sp_tokenizer):
    with pytest.raises(LowlmError, match="neither alpaca, llama2, chatml, tokenizer nor a custom"):
        Template("vicuna", sp_tokenizer)
    with pytest.raises(LowlmError, match="no chat template"):
        Template("tokenizer", sp_tokenizer)


# A tiny model learns eight answers and says them back.

ANSWERS = [
    ("你好嗎？", "我很好，謝謝。"),
    ("天空是什麼顏色？", "天空是藍色的。"),
    ("一加一等於多少？", "一加一等於二。"),
    ("台灣的首都是哪裡？", "台北。"),
    ("貓會叫什麼？", "喵喵。"),
    ("水在幾度結冰？", "攝氏零度。"),
    ("今天星期幾？", "今天星期五。"),
    ("你喜歡什麼水果？", "我喜歡芒果。"),
]


@pytest.mark.slow
def test_tiny_model_overfits_eight_examples_and_generates_a_trained_answer(write_config, tmp_path):
    data = tmp_path / "eight.jsonl"
    data.write_text(
        "".join(
            json.dumps({"instruction": q, "output": a}, ensure_ascii=False) + "\n"
            for q, a in ANSWERS
        ),
        encoding="utf-8",
    )
    path = write_config(
        **pipeline_config(
            None,
            init={"size": "tiny", "hidden_size": 128, "intermediate_size": 256},
            # A random tiny model's frozen norms and head cap its logits: train them beside LoRA.
            sft={
                "data": [str(data)],
                "steps": 80,
                "lr": 3e-3,
                "batch_size": 8,
                "max_length": 64,
                "modules_to_save": ["lm_head", "norm"],
                "template": "問：{user}\n答：{assistant}",
                "eval_fraction": 0,
                "log_every": 20,
                "save_every": 1000,
                "warmup_steps": 5,
                "lora": {"r": 32, "alpha": 64, "dropout": 0.0},
                "energy": {"enabled": False},
            },
        )
    )
    config = load_config(path)
    tokenize.run(config)
    init.run(config)
    metrics = sft.run(config)
    assert metrics["examples"] == 8 and metrics["truncated"] == 0 and metrics["loss"] < 0.1
    card = json.loads((config.run_dir / "sft" / "lowlm_model.json").read_text())
    assert card["kind"] == "adapter" and card["template"] == "問：{user}\n答：{assistant}"

    result = CliRunner().invoke(
        app, ["generate", str(path), "-p", ANSWERS[3][0], "--greedy", "--max-new-tokens", "12"]
    )
    assert result.exit_code == 0, result.output
    assert ANSWERS[3][1] in result.stdout
    chat = CliRunner().invoke(
        app,
        ["chat", str(path), "--greedy", "--max-new-tokens", "12"],
        input=f"{ANSWERS[1][0]}\n/reset\n{ANSWERS[5][0]}\n/exit\n",
    )
    assert chat.exit_code == 0, chat.output
    assert ANSWERS[1][1] in chat.stdout and ANSWERS[5][1] in chat.stdout


def test_sft_reports_truncated_and_invalid_records(write_config, tmp_path, tokenized_runs):
    data = tmp_path / "mixed.jsonl"
    data.write_text(
        (DEMO / "instructions.jsonl").read_text(encoding="utf-8") + "not json\n", encoding="utf-8"
    )
    raw = pipeline_config(
        None,
        init={"size": "tiny"},
        sft={
            "data": [str(data)],
            "steps": 2,
            "max_length": 40,
            "packing": True,
            "lora": {"r": 2, "alpha": 4},
            "energy": {"enabled": False},
        },
    )
    config = load_config(write_config(**raw))
    tokenize_once(config, raw, tokenized_runs)
    init.run(config)
    metrics = sft.run(config)
    assert metrics["records"] == 22 and metrics["invalid_records"] == 1
    assert metrics["invalid_examples"][0].endswith(
        ":22: not valid JSON or UTF-8 (Expecting value: line 1 column 1 (char 0))"
    )
    assert metrics["truncated"] > 0 and metrics["packed_blocks"] >= 1


@pytest.fixture(scope="session")
def zh_sp_tokenizer(tmp_path_factory):
    """A Chinese SentencePiece tokenizer: its pieces start with ▁, so a prompt's trailing
    space and the answer's first word can merge."""
    from lowlm.config import TokenizeConfig
    from lowlm.tokenization.sentencepiece_merge import train_sentencepiece
    from tests.conftest import CHAT_TEMPLATE

    folder = tmp_path_factory.mktemp("zh-sp")
    model = train_sentencepiece(
        DEMO / "zh-tw.txt", folder / "zh", TokenizeConfig(vocab_size=1500, num_threads=1)
    )
    tokenizer = LlamaTokenizer.from_pretrained(str(model), add_bos_token=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="session")
def zh_sp_legacy_tokenizer(zh_sp_tokenizer, tmp_path_factory):
    """The same, loaded with legacy=True: a `▁` after every special token too."""
    folder = tmp_path_factory.mktemp("zh-sp-legacy")
    zh_sp_tokenizer.save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder, legacy=True)
    assert tokenizer.convert_ids_to_tokens(tokenizer("</s>選取").input_ids)[-1].startswith("▁")
    return tokenizer


@pytest.mark.parametrize(
    "spec", ["alpaca", "llama2", "chatml", "tokenizer", "問： {user} 答： {assistant}"]
)
@pytest.mark.parametrize("kind", ["sentencepiece", "sentencepiece_legacy", "byte_level"])
def test_what_generate_sends_is_a_prefix_of_what_sft_trained(
    spec, kind, zh_sp_tokenizer, zh_sp_legacy_tokenizer, chat_tokenizer
):
    tokenizer = {
        "sentencepiece": zh_sp_tokenizer,
        "sentencepiece_legacy": zh_sp_legacy_tokenizer,
        "byte_level": chat_tokenizer,
    }[kind]
    template = Template(spec, tokenizer)
    # answers that start with pieces the SentencePiece model has as `▁選取`, `▁如果`
    merging = [
        {"role": "user", "content": "怎麼做？"},
        {"role": "assistant", "content": "選取儲存格。"},
        {"role": "user", "content": "然後呢？"},
        {"role": "assistant", "content": "如果需要，再按一次。"},
    ]
    cases = [
        (conversation, turn)
        for conversation in (CONVERSATION, merging)
        for turn, message in enumerate(conversation)
        if message["role"] == "assistant"
    ]
    for conversation, turn in cases:
        ids, labels = template.encode(conversation[: turn + 1])
        prompt = template.encode_prompt(conversation[:turn])
        assert ids[: len(prompt)] == prompt, (spec, kind, turn)
        assert labels[len(prompt)] != IGNORE and labels[len(prompt) - 1] == IGNORE
        # and the answer is spelled exactly: no swallowed or doubled space at the seam
        first = tokenizer.convert_ids_to_tokens(ids[len(prompt)])
        assert not first.startswith("▁"), (spec, kind, first)  # no space the text lacks
        answer = tokenizer.decode(ids[len(prompt) :], skip_special_tokens=True)
        assert answer.lstrip().startswith(conversation[turn]["content"])
        assert not answer.startswith("  ")
        spelled = tokenizer.decode(prompt + ids[len(prompt) :])
        assert spelled == tokenizer.decode(ids)


def test_the_seam_keeps_the_prompts_trailing_space_as_its_own_token(zh_sp_tokenizer):
    """llama2 prompts end in a space: as one string, `[/INST] 選取` tokenizes `▁選取` and the
    prompt's ids (which end in `▁`) are not a prefix. Built from the prompt's ids, they are."""
    template = Template("llama2", zh_sp_tokenizer)
    assert "▁選取" in zh_sp_tokenizer.get_vocab()
    messages = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "選取儲存格"}]
    whole = zh_sp_tokenizer(template.render(messages).text, add_special_tokens=False).input_ids
    prompt_text = template.prompt(messages[:1]).text
    alone = zh_sp_tokenizer(prompt_text, add_special_tokens=False).input_ids
    assert whole[: len(alone)] != alone  # the defect of tokenizing the whole string
    ids, _ = template.encode(messages)
    assert ids[: len(alone)] == template.encode_prompt(messages[:1]) == alone
