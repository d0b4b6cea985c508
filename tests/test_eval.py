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
from lowlm.evaluation.tasks import aggregate, benchmark_questions, mc_questions
from lowlm.models.load import load_pretrained, load_tokenizer
from lowlm.stages import eval as eval_stage

from .conftest import MC_QUESTIONS


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
        write_csv(mmlu / "data" / "test" / f"{subject}_test.csv", MC_QUESTIONS)
        write_csv(mmlu / "data" / "dev" / f"{subject}_dev.csv", MC_QUESTIONS[::-1])
    roots["mmlu"] = mmlu
    ceval = tmp_path / "ceval"
    header = ["id", "question", "A", "B", "C", "D", "answer", "explanation"]
    for subject in ("logic", "physician"):
        for split in ("val", "dev"):
            rows = [
                [str(i), *q, ""]
                for i, q in enumerate(MC_QUESTIONS if split == "val" else MC_QUESTIONS[::-1])
            ]
            write_csv(ceval / split / f"{subject}_{split}.csv", rows, header)
    roots["ceval"] = ceval
    cmmlu = tmp_path / "cmmlu"
    for subject in ("arts", "virology"):
        for split in ("test", "dev"):
            rows = [
                [str(i), *q]
                for i, q in enumerate(MC_QUESTIONS if split == "test" else MC_QUESTIONS[::-1])
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
            rows = MC_QUESTIONS if split == "test" else MC_QUESTIONS[::-1]
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
    loaded = benchmark_questions(task)
    evaluated, pools, benchmark = loaded.evaluated, loaded.pools, BENCHMARKS[name]
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


def test_a_subjects_shared_prefix_is_computed_once_with_the_same_scores(tiny, monkeypatch):
    """Few-shot questions of one subject reuse the key/value cache of their common prefix;
    the scores are those of the whole prompt, and so are those of questions without a group."""
    import lowlm.evaluation.scoring as scoring

    model, tokenizer = tiny
    shots = "".join(
        f"Example question {i}?\nA. x\nB. y\nC. z\nD. w\nAnswer: B\n\n" for i in range(3)
    )
    questions = ["What is one?", "A far longer question with many more words in it?", "Why?"]
    contexts = [f"About things.\n\n{shots}{q}\nA. a\nB. b\nC. c\nD. d\nAnswer:" for q in questions]
    # one token each in the tiny vocabulary (" B" is two): the one-pass path
    grouped = [Request(c, [" A", " C", " D"], group="things") for c in contexts]
    calls = []
    original = scoring._forward_last_cached
    monkeypatch.setattr(
        scoring,
        "_forward_last_cached",
        lambda *a: calls.append(len(a[3])) or original(*a),
    )
    cached = score_requests(model, tokenizer, grouped, batch_size=2, max_length=512)
    assert calls == [2, 1]  # two batches of suffixes, one prefix
    plain = score_requests(
        model, tokenizer, grouped, batch_size=2, max_length=512, prefix_cache=False
    )
    for row, context, expected in zip(cached, contexts, plain, strict=True):
        assert row == pytest.approx(expected, abs=1e-4)
        assert row[0] == pytest.approx(
            direct_loglikelihood(model, tokenizer, context, " A"), abs=1e-4
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
    result = aggregate(samples, {"a": "stem", "b": "other"})
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


@pytest.mark.slow
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
            for q in MC_QUESTIONS
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
        benchmark_questions(EvalTask(name="mmlu", path=str(releases["mmlu"]), shots=1))


def test_malformed_rows_name_file_and_line(releases):
    path = releases["mmlu"] / "data" / "test" / "anatomy_test.csv"
    write_csv(path, [*MC_QUESTIONS, ["only", "three", "columns"]])
    with pytest.raises(LowlmError, match=r"anatomy_test.csv:4: 3 columns, expected 6"):
        benchmark_questions(EvalTask(name="mmlu", path=str(releases["mmlu"])))
    write_csv(path, [*MC_QUESTIONS[:1], ["q", "a", "b", "c", "d", "E"]])
    with pytest.raises(
        LowlmError, match=r"anatomy_test.csv:2: answer 'E' is not one of A, B, C, D"
    ):
        benchmark_questions(EvalTask(name="mmlu", path=str(releases["mmlu"])))


def test_unknown_task_lists_the_known_ones(write_config):
    with pytest.raises(
        LowlmError,
        match="'eval.tasks.0.name' must be 'mmlu', 'ceval', 'cmmlu', 'tmmluplus', 'mc' or 'ppl'",
    ):
        load_config(write_config(eval={"tasks": [{"name": "hellaswag"}]}))


def test_question_dataclass_keeps_the_row_index():
    assert Question("s", 7, "q", ["a", "b", "c", "d"], "A").index == 7
    assert BENCHMARKS["ceval"].default_split == "val"


# inputs that once gave a wrong score or a traceback: each is a score or one clear line


def ceval_with(releases, header, rows):
    path = releases["ceval"] / "val" / "logic_val.csv"
    write_csv(path, rows, header)
    return EvalTask(name="ceval", path=str(releases["ceval"]), subjects=["logic"])


def test_an_extra_choice_column_is_refused_not_dropped(releases):
    header = ["id", "question", "A", "B", "C", "D", "E", "answer"]
    task = ceval_with(releases, header, [["0", "q", "a", "b", "c", "d", "e", "E"]])
    with pytest.raises(LowlmError, match=r"logic_val.csv:1: choice column E beyond A-D"):
        benchmark_questions(task)
    tmmlu = releases["tmmluplus"] / "data" / "music_test.csv"
    write_csv(tmmlu, [["q", "a", "b", "c", "d", "e", "A"]], [*"question A B C D E answer".split()])
    with pytest.raises(LowlmError, match=r"music_test.csv:1: choice column E"):
        benchmark_questions(EvalTask(name="tmmluplus", path=str(releases["tmmluplus"])))


def test_a_misnamed_header_names_the_missing_column(releases):
    header = ["id", "Questions", "A", "B", "C", "D", "answer"]
    task = ceval_with(releases, header, [["0", "q", "a", "b", "c", "d", "A"]])
    with pytest.raises(LowlmError, match=r"logic_val.csv:1: no column question in the header"):
        benchmark_questions(task)
    header[1] = "Question"  # case is not a misnomer
    task = ceval_with(releases, header, [["0", "q", "a", "b", "c", "d", "A"]])
    assert benchmark_questions(task).evaluated["logic"][0].question == "q"


def test_an_empty_subject_is_reported_not_averaged_away(releases, write_config, tiny_base):
    (releases["mmlu"] / "data" / "test" / "virology_test.csv").write_text("")
    loaded = benchmark_questions(EvalTask(name="mmlu", path=str(releases["mmlu"])))
    assert loaded.empty_subjects == ["virology"] and list(loaded.evaluated) == ["anatomy"]
    path = write_config(
        model={"base": str(tiny_base)},
        eval={"tasks": [{"name": "mmlu", "path": str(releases["mmlu"])}], "batch_size": 2},
    )
    result = CliRunner().invoke(app, ["eval", str(path)])
    assert result.exit_code == 0, result.output
    assert "subject virology has no question" in result.stdout
    results = json.loads((load_config(path).run_dir / "eval" / "results.json").read_text())
    assert results["tasks"]["mmlu_0shot"]["empty_subjects"] == ["virology"]
    assert results["tasks"]["mmlu_0shot"]["n"] == 3


def test_control_bytes_and_invalid_utf8_name_the_line(releases):
    path = releases["mmlu"] / "data" / "test" / "anatomy_test.csv"
    path.write_bytes(b"q1,a,b,c,d,A\nq\x00 2,a,b,c,d,B\n")
    task = EvalTask(name="mmlu", path=str(releases["mmlu"]), subjects=["anatomy"])
    with pytest.raises(LowlmError, match=r"anatomy_test.csv:2: control character U\+0000"):
        benchmark_questions(task)
    path.write_bytes(b"q1,a,b,c,d,A\nq2,a,\xff,c,d,B\n")
    with pytest.raises(LowlmError, match=r"anatomy_test.csv:2: invalid UTF-8 at byte 18"):
        benchmark_questions(task)


def test_bad_mc_rows_name_the_row(tmp_path):
    jsonl = tmp_path / "mc.jsonl"
    jsonl.write_text(
        '{"question": "q", "A": "a", "B": "b", "C": "c", "D": "d", "answer": 0}\n[1, 2]\n'
    )
    with pytest.raises(LowlmError, match=r"mc.jsonl:2: a JSON list, not an object"):
        mc_questions(EvalTask(name="mc", path=str(jsonl)))
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = tmp_path / "mc.parquet"
    table = {"question": ["q", None], **{c: ["a", "b"] for c in "ABCD"}, "answer": ["A", "B"]}
    pq.write_table(pa.table(table), parquet)
    with pytest.raises(LowlmError, match=r"mc.parquet row 1: field 'question' holds NoneType"):
        mc_questions(EvalTask(name="mc", path=str(parquet)))
    table["question"] = ["q", "r"]
    pq.write_table(pa.table(table), parquet)
    assert [
        q.answer for q in mc_questions(EvalTask(name="mc", path=str(parquet))).evaluated["all"]
    ] == ["A", "B"]


def test_shots_beyond_the_examples_and_limit_zero_are_refused(releases, tmp_path, write_config):
    with pytest.raises(
        LowlmError, match=r"subject anatomy has 3 questions in its 'dev' split, fewer than shots=5"
    ):
        benchmark_questions(EvalTask(name="mmlu", path=str(releases["mmlu"]), shots=5))
    mc = tmp_path / "mc.csv"
    write_csv(mc, [q[:5] + ["B"] for q in MC_QUESTIONS], ["question", "A", "B", "C", "D", "answer"])
    with pytest.raises(LowlmError, match=r"has 3 questions, not more than shots=3"):
        mc_questions(EvalTask(name="mc", path=str(mc), shots=3))
    with pytest.raises(
        LowlmError,
        match=r"eval.tasks.0.limit': Input should be greater than or equal to 1 \(got 0\)",
    ):
        load_config(write_config(eval={"tasks": [{"name": "mmlu", "limit": 0}]}))


def test_a_corrupt_gz_and_a_mistyped_folder_are_one_line(tmp_path, write_config, tiny_base):
    broken = tmp_path / "text.txt.gz"
    import gzip

    broken.write_bytes(gzip.compress("第一行。\n".encode() * 50)[:-12])
    path = write_config(
        model={"base": str(tiny_base)}, eval={"tasks": [{"name": "ppl", "path": str(broken)}]}
    )
    result = CliRunner().invoke(app, ["eval", str(path)])
    assert result.exit_code == 1 and "is the file complete?" in result.output
    assert "Traceback" not in result.output
    assert not (load_config(path).run_dir / "eval").exists()  # nothing half-written
    path = write_config(
        model={"base": str(tiny_base)},
        eval={"tasks": [{"name": "mmlu", "path": str(tmp_path / "mmlu-typo")}]},
    )
    result = CliRunner().invoke(app, ["eval", str(path)])
    assert result.exit_code == 1 and "mmlu-typo does not exist" in result.output


def test_ceval_test_split_writes_the_leaderboard_submission(releases, write_config, tiny_base):
    header = ["id", "question", "A", "B", "C", "D", "answer", "explanation"]
    for subject in ("logic", "physician"):
        rows = [[str(10 + i), q[0], *q[1:5], "", ""] for i, q in enumerate(MC_QUESTIONS)]
        write_csv(releases["ceval"] / "test" / f"{subject}_test.csv", rows, header)
    path = write_config(
        model={"base": str(tiny_base)},
        eval={"tasks": [{"name": "ceval", "path": str(releases["ceval"]), "split": "test"}]},
    )
    result = CliRunner().invoke(app, ["eval", str(path)])
    assert result.exit_code == 0, result.output
    out = load_config(path).run_dir / "eval"
    submission = json.loads((out / "submission-ceval_0shot.json").read_text())
    assert set(submission) == {"logic", "physician"}
    assert set(submission["logic"]) == {"10", "11", "12"}
    assert set(submission["logic"].values()) <= set("ABCD")
    task = json.loads((out / "results.json").read_text())["tasks"]["ceval_0shot"]
    assert task["submission"] and "acc" not in task


@pytest.mark.slow
def test_pretrain_and_sft_score_eval_tasks_every_eval_every_steps(write_config, tmp_path):
    from lowlm.stages import init, pretrain, sft, tokenize

    from .conftest import DEMO, pipeline_config

    mc = tmp_path / "mc.csv"
    write_csv(
        mc, [q[:5] + [q[5]] for q in MC_QUESTIONS * 4], ["question", "A", "B", "C", "D", "answer"]
    )
    text = tmp_path / "ppl.txt"
    text.write_text("第一行文字。\n第二行文字。\n", encoding="utf-8")
    tasks = [{"name": "mc", "path": str(mc), "limit": 5}, {"name": "ppl", "path": str(text)}]
    config = load_config(
        write_config(
            **pipeline_config(
                None,
                init={"size": "tiny"},
                pretrain={"full": {"steps": 4}, "eval_every": 2, "eval_tasks": tasks},
                sft={
                    "data": [str(DEMO / "instructions.jsonl")],
                    "steps": 2,
                    "batch_size": 2,
                    "eval_every": 2,
                    "eval_fraction": 0,
                    "lora": {"r": 2, "alpha": 4},
                    "eval_tasks": tasks[:1],
                    "energy": {"enabled": False},
                },
            )
        )
    )
    tokenize.run(config)
    init.run(config)
    pretrain.run(config)
    log = [json.loads(x) for x in (config.run_dir / "pretrain-full" / "log.jsonl").open()]
    scored = [entry for entry in log if "eval/mc_0shot" in entry]
    assert [entry["step"] for entry in scored] == [2, 4]
    assert all(0 <= e["eval/mc_0shot"] <= 1 and e["eval/ppl_ppl"] > 0 for e in scored)
    from lowlm.stages import export

    export.run(config)
    sft.run(config)
    log = [json.loads(x) for x in (config.run_dir / "sft" / "log.jsonl").open()]
    assert any("eval/mc_0shot" in entry for entry in log)
