"""`lowlm eval`: harness-identical prompts, exact scoring, aggregation, bits per character."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lowlm.cli import app
from lowlm.config import EvalTask, load_config
from lowlm.errors import LowlmError
from lowlm.evaluation.benchmarks import BENCHMARKS, Question, build_context
from lowlm.evaluation.scoring import Request, encode_pair, score_requests
from lowlm.models.load import load_pretrained, load_tokenizer
from lowlm.stages import eval as eval_stage

QUESTIONS = [
    ["What is 1 + 1? ", "1", "2", "3", "4", "B"],
    ["Which is a colour?", "red", "dog", "run", "up", "A"],
    ["Pick the vowel.", "b", "c", "e", "d", "C"],
]


def write_csv(path: Path, rows: list[list[str]], header: list[str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        if header:
            writer.writerow(header)
        writer.writerows(rows)


@pytest.fixture
def releases(tmp_path) -> dict[str, Path]:
    """The same three questions in each benchmark's official layout (two subjects each)."""
    roots = {}
    mmlu = tmp_path / "mmlu"
    for subject in ("anatomy", "virology"):
        write_csv(mmlu / "data" / "test" / f"{subject}_test.csv", QUESTIONS)
        write_csv(mmlu / "data" / "dev" / f"{subject}_dev.csv", QUESTIONS[::-1])
    roots["mmlu"] = mmlu
    ceval = tmp_path / "ceval"
    header = ["id", "question", "A", "B", "C", "D", "answer", "explanation"]
    for subject in ("logic", "physician"):
        for split in ("val", "dev"):
            rows = [
                [str(i), *q, ""]
                for i, q in enumerate(QUESTIONS if split == "val" else QUESTIONS[::-1])
            ]
            write_csv(ceval / split / f"{subject}_{split}.csv", rows, header)
    roots["ceval"] = ceval
    cmmlu = tmp_path / "cmmlu"
    for subject in ("arts", "virology"):
        for split in ("test", "dev"):
            rows = [
                [str(i), *q]
                for i, q in enumerate(QUESTIONS if split == "test" else QUESTIONS[::-1])
            ]
            write_csv(
                cmmlu / split / f"{subject}.csv",
                rows,
                ["", "Question", "A", "B", "C", "D", "Answer"],
            )
    roots["cmmlu"] = cmmlu
    tmmlu = tmp_path / "tmmluplus"
    for subject in ("music", "physics"):
        for split in ("test", "train"):
            rows = QUESTIONS if split == "test" else QUESTIONS[::-1]
            write_csv(
                tmmlu / "data" / f"{subject}_{split}.csv",
                rows,
                ["question", "A", "B", "C", "D", "answer"],
            )
    roots["tmmluplus"] = tmmlu
    return roots


EXPECTED_0 = {
    "mmlu": "The following are multiple choice questions (with answers) about anatomy.\n\n"
    "What is 1 + 1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:",
    "ceval": "以下是中国关于逻辑学的单项选择题，请选出其中的正确答案。\n\n"
    "What is 1 + 1?\nA. 1\nB. 2\nC. 3\nD. 4\n答案：",
    "cmmlu": "以下是关于艺术学的单项选择题，请直接给出正确答案的选项。\n\n"
    "What is 1 + 1?\nA. 1\nB. 2\nC. 3\nD. 4\n答案：",
    "tmmluplus": "以下為音樂科的單選題，請提供正確答案的選項。\n\n"
    "What is 1 + 1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:",
}
TWO_SHOTS = {
    "mmlu": "Pick the vowel.\nA. b\nB. c\nC. e\nD. d\nAnswer: C\n\n"
    "Which is a colour?\nA. red\nB. dog\nC. run\nD. up\nAnswer: A\n\n",
    "ceval": "Pick the vowel.\nA. b\nB. c\nC. e\nD. d\n答案： C\n\n"
    "Which is a colour?\nA. red\nB. dog\nC. run\nD. up\n答案： A\n\n",
}
TWO_SHOTS["cmmlu"] = TWO_SHOTS["ceval"]
TWO_SHOTS["tmmluplus"] = TWO_SHOTS["mmlu"]


@pytest.mark.parametrize("name", ["mmlu", "ceval", "cmmlu", "tmmluplus"])
@pytest.mark.parametrize("shots", [0, 2])
def test_prompts_equal_the_harness_strings(releases, name, shots):
    task = EvalTask(name=name, path=str(releases[name]), shots=shots)
    evaluated, pools, benchmark = eval_stage._questions(task)
    subject = {"mmlu": "anatomy", "ceval": "logic", "cmmlu": "arts", "tmmluplus": "music"}[name]
    first = evaluated[subject][0]
    context = build_context(
        benchmark.description(subject), pools[subject], first, benchmark.answer_cue
    )
    description, _, question = EXPECTED_0[name].partition("\n\n")
    expected = f"{description}\n\n{TWO_SHOTS[name] if shots else ''}{question}"
    assert context == expected
    assert [q.answer for q in evaluated[subject]] == ["B", "A", "C"]
    assert [q.index for q in evaluated[subject]] == [0, 1, 2]


@pytest.fixture(scope="module")
def tiny(tiny_base):
    return load_pretrained(str(tiny_base)), load_tokenizer(tiny_base)


def direct_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    context_ids, continuation_ids = encode_pair(tokenizer, context, continuation, add_bos=False)
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    return sum(
        log_probs[len(context_ids) - 1 + i, t].item() for i, t in enumerate(continuation_ids)
    )


def test_scores_equal_a_direct_computation(tiny):
    model, tokenizer = tiny
    requests = [
        Request("Question one?\nAnswer:", [" A", " B", " C", " D"]),
        Request(
            "A much longer question that needs more tokens than the first?\nAnswer:",
            [" A", " B", " C", " D"],
        ),
        Request("Multi-token choices:", [" the red one", " blue", " a green thing", " none"]),
    ]
    scores = score_requests(model, tokenizer, requests, batch_size=2, max_length=256)
    for request, row in zip(requests, scores, strict=True):
        for continuation, score in zip(request.continuations, row, strict=True):
            assert score == pytest.approx(
                direct_loglikelihood(model, tokenizer, request.context, continuation), abs=1e-4
            )


def test_trailing_space_moves_into_the_continuation(tiny):
    _, tokenizer = tiny
    assert encode_pair(tokenizer, "Answer: ", "A", False) == encode_pair(
        tokenizer, "Answer:", " A", False
    )


def test_micro_and_macro_aggregation():
    samples = (
        [{"subject": "a", "correct": 1, "correct_norm": 1}] * 3
        + [{"subject": "a", "correct": 0, "correct_norm": 0}]
        + [{"subject": "b", "correct": 0, "correct_norm": 1}]
    )
    result = eval_stage._aggregate(samples, {"a": "stem", "b": "other"})
    assert result["acc"] == pytest.approx(3 / 5)  # micro: over questions
    assert result["acc_macro"] == pytest.approx((3 / 4 + 0) / 2)  # macro: over subjects
    assert result["acc_norm"] == pytest.approx(4 / 5)
    assert result["categories"] == {"other": {"acc": 0.0, "n": 1}, "stem": {"acc": 0.75, "n": 4}}


def test_bits_per_character_of_a_known_text(tiny, tmp_path):
    model, tokenizer = tiny
    text = tmp_path / "t.txt"
    lines = ["The quick brown fox.", "Jumps over the lazy dog."]
    text.write_text("\n".join(lines), encoding="utf-8")
    result = eval_stage.run_ppl(model, tokenizer, EvalTask(name="ppl", path=str(text)))
    nll, tokens = 0.0, 0
    for line in lines:
        ids = [tokenizer.bos_token_id, *tokenizer.encode(line, add_special_tokens=False)]
        with torch.no_grad():
            log_probs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], dim=-1)
        nll -= sum(log_probs[i, ids[i + 1]].item() for i in range(len(ids) - 1))
        tokens += len(ids) - 1
    chars = sum(len(line) for line in lines)
    assert result["bits_per_char"] == pytest.approx(nll / chars / math.log(2), rel=1e-5)
    assert result["token_perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)


def test_eval_command_writes_results_samples_and_compares(
    write_config, tiny_base, releases, tmp_path
):
    mc = tmp_path / "mc.jsonl"
    mc.write_text(
        "".join(
            json.dumps(
                {
                    "q": q[0],
                    "opts": q[1:5],
                    "gold": "ABCD".index(q[5]),
                    "o1": q[1],
                    "o2": q[2],
                    "o3": q[3],
                    "o4": q[4],
                }
            )
            + "\n"
            for q in QUESTIONS
        ),
        encoding="utf-8",
    )
    path = write_config(
        eval={
            "model": str(tiny_base),
            "batch_size": 2,
            "tasks": [
                {"name": "mmlu", "path": str(releases["mmlu"]), "shots": 2},
                {"name": "ceval", "path": str(releases["ceval"]), "shots": 0},
                {
                    "name": "mc",
                    "path": str(mc),
                    "fields": {
                        "question": "q",
                        "choices": ["o1", "o2", "o3", "o4"],
                        "answer": "gold",
                    },
                },
                {"name": "ppl", "path": str(Path(__file__).parents[1] / "data/demo/en.txt")},
            ],
        }
    )
    result = CliRunner().invoke(app, ["eval", str(path)])
    assert result.exit_code == 0, result.output
    eval_dir = tmp_path / "runs" / "t" / "eval"
    results = json.loads((eval_dir / "results.json").read_text())
    assert set(results["tasks"]) == {"mmlu_2shot", "ceval_0shot", "mc_0shot", "ppl_en"}
    mmlu = results["tasks"]["mmlu_2shot"]
    assert (
        mmlu["n"] == 6 and mmlu["shots"] == 2 and set(mmlu["subjects"]) == {"anatomy", "virology"}
    )
    assert {"template", "aggregation", "split"} <= set(mmlu)
    samples = [json.loads(line) for line in (eval_dir / "samples-mmlu_2shot.jsonl").open()]
    assert len(samples) == 6
    assert {"subject", "index", "target", "prediction", "scores"} <= set(samples[0])
    assert len(samples[0]["scores"]) == 4
    assert "| mmlu_2shot | test | 2 | 6 |" in (eval_dir / "results.md").read_text()
    assert results["tasks"]["ppl_en"]["bits_per_char"] > 0

    other = tmp_path / "other.json"
    changed = dict(results, tasks={k: dict(v) for k, v in results["tasks"].items()})
    changed["tasks"]["mmlu_2shot"]["acc"] = mmlu["acc"] + 0.5
    other.write_text(json.dumps(changed))
    compared = CliRunner().invoke(
        app, ["eval", "--compare", str(eval_dir / "results.json"), str(other)]
    )
    assert compared.exit_code == 0, compared.output
    assert "| mmlu_2shot | acc |" in compared.stdout and "+0.5000" in compared.stdout


# bad input


def test_missing_subject_file_names_it(releases):
    (releases["mmlu"] / "data" / "dev" / "virology_dev.csv").unlink()
    with pytest.raises(LowlmError, match="subject file .*virology_dev.csv is missing"):
        eval_stage._questions(EvalTask(name="mmlu", path=str(releases["mmlu"]), shots=1))


def test_malformed_rows_name_file_and_line(releases):
    path = releases["mmlu"] / "data" / "test" / "anatomy_test.csv"
    write_csv(path, [*QUESTIONS, ["only", "three", "columns"]])
    with pytest.raises(LowlmError, match=r"anatomy_test.csv:4: 3 columns, expected 6"):
        eval_stage._questions(EvalTask(name="mmlu", path=str(releases["mmlu"])))
    write_csv(path, [*QUESTIONS[:1], ["q", "a", "b", "c", "d", "E"]])
    with pytest.raises(
        LowlmError, match=r"anatomy_test.csv:2: answer 'E' is not one of A, B, C, D"
    ):
        eval_stage._questions(EvalTask(name="mmlu", path=str(releases["mmlu"])))


def test_unknown_task_lists_the_known_ones(write_config):
    with pytest.raises(
        LowlmError,
        match="'eval.tasks.0.name' must be 'mmlu', 'ceval', 'cmmlu', 'tmmluplus', 'mc' or 'ppl'",
    ):
        load_config(write_config(eval={"tasks": [{"name": "hellaswag"}]}))


def test_ceval_test_split_is_refused(releases):
    with pytest.raises(LowlmError, match="test answers are not public"):
        eval_stage._questions(EvalTask(name="ceval", path=str(releases["ceval"]), split="test"))


def test_question_dataclass_keeps_the_row_index():
    assert Question("s", 7, "q", ["a", "b", "c", "d"], "A").index == 7
    assert BENCHMARKS["ceval"].default_split == "val"
