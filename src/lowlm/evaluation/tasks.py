"""Tasks as the eval stage runs them: questions and few-shot pools of a benchmark or a local
multiple-choice file, and the aggregation of per-question results.

Every row the user gave is scored or the run stops with the file, the row and what to do;
a subject file with no question is reported in the results and on the terminal, never
averaged away silently.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from lowlm.config import EvalTask
from lowlm.data.records import read_records
from lowlm.errors import LowlmError
from lowlm.evaluation.benchmarks import (
    BENCHMARKS,
    LETTERS,
    Benchmark,
    Question,
    load_hub,
    load_local,
    local_subjects,
)

# The lm-evaluation-harness release whose prompts and scoring these tasks reproduce.
HARNESS_PROTOCOL = "lm-evaluation-harness 0.4.13"
# Splits whose answers are not public: the task writes a submission file instead of a score.
SUBMISSION_SPLITS = {("ceval", "test")}


@dataclass
class TaskQuestions:
    """What a task scores: questions and few-shot examples by subject, and what it reports."""

    evaluated: dict[str, list[Question]]
    pools: dict[str, list[Question]]
    split: str
    fewshot_source: str | None
    describe: object  # subject -> description
    answer_cue: str
    categories: dict[str, str]
    submission: bool = False
    empty_subjects: list[str] = field(default_factory=list)


def benchmark_questions(task: EvalTask) -> TaskQuestions:
    benchmark: Benchmark = BENCHMARKS[task.name]
    split = task.split or benchmark.default_split
    fewshot_split = task.fewshot_split or benchmark.fewshot_split
    submission = (task.name, split) in SUBMISSION_SPLITS
    path = Path(task.path) if task.path else None
    if path is not None and not path.exists():
        raise LowlmError(
            f"{task.name}: path {path} does not exist; fix the path, or omit it to use the "
            f"Hugging Face dataset {benchmark.hf_dataset}."
        )
    subjects = local_subjects(benchmark, path, split) if path else list(benchmark.subjects)
    if task.subjects:
        unknown = [s for s in task.subjects if s not in subjects]
        if unknown:
            raise LowlmError(f"{task.name}: unknown or missing subjects {', '.join(unknown)}.")
        subjects = list(task.subjects)

    def load(subject: str, which: str, answers: bool = True) -> list[Question]:
        if path is not None:
            return load_local(benchmark, path, subject, which, answers)
        return load_hub(benchmark, subject, which, answers)

    evaluated, pools, empty = {}, {}, []
    source = None
    for subject in subjects:
        questions = load(subject, split, answers=not submission)
        if not questions:
            empty.append(subject)
            continue
        evaluated[subject] = questions[: task.limit]
        if not task.shots:
            pools[subject] = []
            continue
        try:
            pool, source = load(subject, fewshot_split), fewshot_split
        except LowlmError:
            if task.name != "tmmluplus":
                raise
            pool, source = load(subject, "dev"), "dev"  # the harness's copy
        if len(pool) < task.shots:
            raise LowlmError(
                f"{task.name}: subject {subject} has {len(pool)} questions in its "
                f"'{source}' split, fewer than shots={task.shots}; lower shots."
            )
        pools[subject] = pool[: task.shots]
    if not evaluated:
        raise LowlmError(f"{task.name}: every subject file of split '{split}' is empty.")
    return TaskQuestions(
        evaluated,
        pools,
        split,
        f"{source} split, first {task.shots}" if task.shots else None,
        benchmark.description,
        benchmark.answer_cue,
        benchmark.subjects,
        submission,
        empty,
    )


def mc_questions(task: EvalTask) -> TaskQuestions:
    """A local multiple-choice file, with configurable fields; the first `shots` questions of
    each subject are its examples."""
    if not task.path or not Path(task.path).is_file():
        raise LowlmError(
            f"mc: path {task.path!r} is not a file; point it at a .csv, .jsonl or .parquet."
        )
    path, fields = Path(task.path), task.fields
    by_subject: dict[str, list[Question]] = defaultdict(list)
    for index, (where, row) in enumerate(read_records(str(path))):
        values = {}
        for name in [fields.question, *fields.choices, fields.answer]:
            if name not in row:
                raise LowlmError(f"{where}: no field '{name}'; set the task's fields.")
            value = row[name]
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise LowlmError(
                    f"{where}: field '{name}' holds {type(value).__name__}, not text; fix the row."
                )
            values[name] = str(value)
        question = values[fields.question]
        if not question.strip():
            raise LowlmError(f"{where}: the question is empty; fix or remove the row.")
        choices = [values[name] for name in fields.choices]
        raw_answer = values[fields.answer].strip()
        letters = LETTERS[: len(choices)]
        answer = (
            letters[int(raw_answer)]
            if raw_answer.isdigit() and int(raw_answer) < len(letters)
            else raw_answer
        )
        if answer not in letters:
            raise LowlmError(f"{where}: answer {raw_answer!r} is not one of {', '.join(letters)}.")
        subject = str(row.get(fields.subject, "all")) if fields.subject else "all"
        by_subject[subject].append(Question(subject, index, question, choices, answer))
    if not by_subject:
        raise LowlmError(f"{path} holds no question.")
    evaluated, pools = {}, {}
    for subject, questions in by_subject.items():
        if task.shots and len(questions) <= task.shots:
            raise LowlmError(
                f"{path}: subject '{subject}' has {len(questions)} questions, not more than "
                f"shots={task.shots} (the first ones are the examples); lower shots."
            )
        pools[subject] = questions[: task.shots]
        evaluated[subject] = questions[task.shots :][: task.limit]
    return TaskQuestions(
        evaluated,
        pools,
        "file",
        f"first {task.shots} of each subject" if task.shots else None,
        lambda s: task.description,
        task.answer_cue,
        {},
    )


def aggregate(samples: list[dict], categories: dict[str, str]) -> dict:
    per_subject: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for sample in samples:
        tally = per_subject[sample["subject"]]
        tally[0] += sample["correct"]
        tally[1] += sample["correct_norm"]
        tally[2] += 1
    subjects = {
        s: {"acc": c / n, "acc_norm": cn / n, "n": n} for s, (c, cn, n) in per_subject.items()
    }
    total = sum(v["n"] for v in subjects.values())
    by_category: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for subject, (correct, _, n) in per_subject.items():
        category = categories.get(subject, "other")
        by_category[category][0] += correct
        by_category[category][1] += n
    return {
        "acc": sum(v["acc"] * v["n"] for v in subjects.values()) / total,
        "acc_norm": sum(v["acc_norm"] * v["n"] for v in subjects.values()) / total,
        "acc_macro": sum(v["acc"] for v in subjects.values()) / len(subjects),
        "n": total,
        "subjects": subjects,
        "categories": {c: {"acc": k / n, "n": n} for c, (k, n) in sorted(by_category.items())},
    }


def question_texts(task: EvalTask) -> dict[str, list[str]]:
    """The texts of a multiple-choice task: its questions, and its choices and question +
    choices (what a copied exam item in a corpus would contain)."""
    loaded = mc_questions(task) if task.name == "mc" else benchmark_questions(task)
    texts: dict[str, list[str]] = {"questions": [], "other": []}
    for group in (*loaded.evaluated.values(), *loaded.pools.values()):
        for q in group:
            texts["questions"].append(q.question)
            texts["other"] += [*q.choices, " ".join([q.question, *q.choices])]
    return texts
