"""The task runners: a multiple-choice task or a perplexity text scored on a loaded model.

Used by `lowlm eval` and by training stages' eval during training (periodic_eval), so that no
stage imports another stage.
"""

from __future__ import annotations

import gzip
import math
import time
import zlib
from collections import defaultdict
from pathlib import Path

from lowlm.config import EvalTask
from lowlm.errors import LowlmError
from lowlm.evaluation.benchmarks import LETTERS, Question, build_context
from lowlm.evaluation.ranks import Ranks
from lowlm.evaluation.scoring import Request, score_requests
from lowlm.evaluation.tasks import (
    HARNESS_PROTOCOL,
    TaskQuestions,
    aggregate,
    benchmark_questions,
    mc_questions,
)
from lowlm.models.metrics import text_nll

_AGGREGATION = "acc: micro (questions, as the harness's groups); acc_macro: mean of subjects"


def run_multiple_choice(
    model,
    tokenizer,
    task: EvalTask,
    batch_size: int,
    max_length: int,
    add_bos: bool,
    progress_factory,
    ranks: Ranks | None = None,
) -> tuple[dict, list[dict]]:
    loaded = mc_questions(task) if task.name == "mc" else benchmark_questions(task)
    for subject in loaded.empty_subjects:
        print(
            f"{task.name}: subject {subject} has no question in split '{loaded.split}'; "
            "it is left out of the averages (listed as empty_subjects in results.json)."
        )
    questions = [q for qs in loaded.evaluated.values() for q in qs]
    requests = [_request(loaded, q, tokenizer, task.chat_template) for q in questions]
    ranks = ranks or Ranks()
    mine = ranks.share(requests)  # all of them on one process
    progress = progress_factory(len(mine), task.name)
    started = time.perf_counter()
    scores = score_requests(model, tokenizer, mine, batch_size, max_length, add_bos, progress)
    scores = ranks.gather(scores)
    seconds = time.perf_counter() - started
    progress.close()
    samples = [_sample(q, lls) for q, lls in zip(questions, scores, strict=True)]
    if loaded.submission:
        result: dict = {"n": len(samples), "submission": True}
    else:
        result = aggregate(samples, loaded.categories)
    result.update(
        task=task.name,
        split=loaded.split,
        shots=task.shots,
        empty_subjects=loaded.empty_subjects,
        seconds=round(seconds, 2),
        questions_per_s=round(len(samples) / max(seconds, 1e-9), 2),
        template="lm-evaluation-harness" + (" + chat template" if task.chat_template else ""),
        fewshot="first_n" if task.shots else None,
        aggregation=_AGGREGATION,
        protocol=_protocol(task, loaded.fewshot_source),
        example_prompt=requests[0].context if requests else None,
    )
    return result, samples


def _request(loaded: TaskQuestions, question: Question, tokenizer, chat_template: bool) -> Request:
    """One question as the harness asks it: its context (few-shot examples first, in the chat
    template if asked) and the continuations ' A', ' B', ..."""
    context = build_context(
        loaded.describe(question.subject),
        loaded.pools[question.subject],
        question,
        loaded.answer_cue,
    )
    if chat_template:
        context = tokenizer.apply_chat_template(
            [{"role": "user", "content": context}], tokenize=False, add_generation_prompt=True
        )
    choices = [f" {letter}" for letter in LETTERS[: len(question.choices)]]
    return Request(context, choices, group=question.subject)


def _sample(question: Question, lls: list[float]) -> dict:
    """A question's record: the likeliest letter, raw and normalised by choice length."""
    letters = LETTERS[: len(lls)]
    prediction = letters[max(range(len(lls)), key=lambda i: lls[i])]
    lengths = [len(letter) for letter in letters]  # the harness normalises by choice length
    normalised = letters[max(range(len(lls)), key=lambda i: lls[i] / lengths[i])]
    sample = {
        "subject": question.subject,
        "index": question.index,
        "target": question.answer,
        "prediction": prediction,
        "scores": lls,
        "correct": int(prediction == question.answer),
        "correct_norm": int(normalised == question.answer),
    }
    if question.key is not None:
        sample["id"] = question.key
    return sample


def _protocol(task: EvalTask, fewshot_source: str | None) -> dict:
    return {
        "reproduces": HARNESS_PROTOCOL,
        "template": "description + first-n examples + question, continuations ' A'..' D'"
        + (" inside the tokenizer's chat template" if task.chat_template else ""),
        "shots": task.shots,
        "fewshot_source": fewshot_source,
        "scoring": "sum of continuation log-likelihoods; highest wins",
        "normalisation": "acc: none; acc_norm: divided by the choice's length in characters",
        "aggregation": _AGGREGATION,
    }


def periodic_eval(tasks: list[EvalTask], tokenizer, max_length: int = 2048):
    """What a training stage runs every eval_every steps: each task's accuracy (or bits per
    character), keyed `eval/<task>` in the log; None when no task is configured."""
    if not tasks:
        return None
    for task in tasks:  # refused when the stage starts, not at its first eval step
        if task.harness:
            raise LowlmError(
                f"harness task '{task.harness}' is not scored during training; list it under "
                "eval.tasks."
            )

    def run(model) -> dict:
        model.eval()
        results: dict = {}
        for task in tasks:
            name = task_key(task, results)
            if task.name == "ppl":
                results[f"eval/{name}"] = run_ppl(model, tokenizer, task)["bits_per_char"]
                continue
            result, _ = run_multiple_choice(
                model, tokenizer, task, 8, max_length, False, quiet_progress
            )
            results[f"eval/{name}"] = result.get("acc")
        return results

    return run


def ceval_submission(samples: list[dict]) -> dict:
    """The C-Eval leaderboard's format: {subject: {id: letter}}."""
    submission: dict[str, dict[str, str]] = defaultdict(dict)
    for sample in samples:
        key = sample.get("id", str(sample["index"]))
        submission[sample["subject"]][str(key)] = sample["prediction"]
    return dict(submission)


def run_ppl(model, tokenizer, task: EvalTask, ranks: Ranks | None = None) -> dict:
    if not task.path or not Path(task.path).is_file():
        raise LowlmError(f"ppl: path {task.path!r} is not a file; point it at a text file.")
    try:
        raw = Path(task.path).read_bytes()
        if task.path.endswith(".gz"):
            raw = gzip.decompress(raw)
        lines = [line for line in raw.decode("utf-8").split("\n") if line.strip()]
    except UnicodeDecodeError as exc:
        raise LowlmError(
            f"{task.path}: invalid UTF-8 at byte {exc.start}; re-encode it as UTF-8."
        ) from None
    except (OSError, EOFError, zlib.error) as exc:
        raise LowlmError(f"cannot read {task.path} ({exc}); is the file complete?") from None
    if not lines:
        raise LowlmError(f"{task.path} holds no text.")
    started = time.perf_counter()
    ranks = ranks or Ranks()
    shares = ranks.gather([text_nll(model, tokenizer, ranks.share(lines))])
    nll, chars, tokens = (sum(share[i] for share in shares) for i in range(3))
    return {
        "task": "ppl",
        "path": task.path,
        "lines": len(lines),
        "chars": chars,
        "tokens": tokens,
        "bits_per_char": nll / chars / math.log(2),
        "nats_per_char": nll / chars,
        "token_perplexity": math.exp(nll / tokens),
        "chars_per_token": chars / tokens,
        "seconds": round(time.perf_counter() - started, 2),
    }


def task_key(task: EvalTask, taken: dict) -> str:
    if task.harness:
        key = f"{task.harness}_{task.shots}shot"
    elif task.name != "ppl":
        key = f"{task.name}_{task.shots}shot"
    else:
        key = f"ppl_{Path(task.path or '').stem}"
    return key if key not in taken else f"{key}_{len(taken)}"


def quiet_progress(total: int, name: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=name, disable=True)
