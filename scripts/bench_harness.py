"""Harness tasks through `lowlm eval` against lm-evaluation-harness run by hand, and native eval
on two ranks against one.

1. The same harness task (a local multiple-choice task in the harness's MMLU template over
   the first N questions of the asset MMLU test set) on the same model (the asset
   SmolLM2-135M, fp32): `lowlm eval` (the whole stage: task built, model loaded once,
   scored through the harness, results written) against the harness by hand (its task
   manager on the same folder, `simple_evaluate(model="hf", ...)` loading the model
   itself). Both in this process, alternated, each run twice; prints both wall times, the
   ratio (goal <= 1.05x) and whether every per-question score is identical.
2. `lowlm eval` of a native mc task over the same questions in one process and under
   `accelerate launch --multi_gpu --num_processes 2` (gloo ranks on a CPU), both as fresh
   processes; prints both wall times and each rank's share.

    .venv/bin/python scripts/bench_harness.py --questions 100
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from _bench_common import ASSETS, smollm2_folder

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where lowlm eval puts the model
TEMPLATE = {
    "dataset_path": "json",
    "test_split": "test",
    "output_type": "multiple_choice",
    "doc_to_text": "{{question.strip()}}\nA. {{answer_a}}\nB. {{answer_b}}\nC. {{answer_c}}\n"
    "D. {{answer_d}}\nAnswer:",
    "doc_to_choice": ["A", "B", "C", "D"],
    "doc_to_target": "{{['A', 'B', 'C', 'D'].index(correct_answer)}}",
    "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    "metadata": {"version": 1.0},
}


def write_task(folder: Path, questions: int) -> Path:
    rows = (ASSETS / "bench" / "mmlu" / "test.jsonl").read_text(encoding="utf-8").splitlines()
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "test.jsonl"
    data.write_text("\n".join(rows[:questions]) + "\n", encoding="utf-8")
    task = {"task": "bench_mmlu", **TEMPLATE, "dataset_kwargs": {"data_files": {"test": str(data)}}}
    (folder / "bench_mmlu.yaml").write_text(json.dumps(task, indent=1), encoding="utf-8")
    return data


def lowlm_once(config: Path) -> tuple[float, float, list]:
    """(whole stage, the harness's simple_evaluate inside it, per-question scores)."""
    from lowlm.config import load_config
    from lowlm.stages import eval as stage

    started = time.perf_counter()
    results = stage.run(load_config(config), force=True)
    seconds = time.perf_counter() - started
    samples = load_config(config).run_dir / "eval" / "samples-bench_mmlu_0shot.jsonl"
    scores = [json.loads(line)["scores"] for line in samples.open(encoding="utf-8")]
    task = results["tasks"]["bench_mmlu_0shot"]
    assert task["n"] == len(scores)
    return seconds, task["seconds"], scores


def by_hand_once(model: Path, folder: Path, batch_size: int) -> tuple[float, float, list]:
    """(load and evaluate, simple_evaluate alone, per-question scores): the harness's HFLM
    loading the folder, then its simple_evaluate, as its CLI does."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    started = time.perf_counter()
    lm = HFLM(pretrained=str(model), dtype="float32", device=DEVICE, batch_size=batch_size)
    evaluating = time.perf_counter()
    output = simple_evaluate(
        model=lm,
        tasks=["bench_mmlu"],
        num_fewshot=0,
        task_manager=TaskManager(include_path=[str(folder)], include_defaults=False),
    )
    ended = time.perf_counter()
    scores = [[float(r[0]) for r in s["filtered_resps"]] for s in output["samples"]["bench_mmlu"]]
    return ended - started, ended - evaluating, scores


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ranks_once(config: Path, processes: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "lowlm.cli", "eval", str(config), "--force"]
    if processes > 1:
        launcher = Path(sys.executable).parent / "accelerate"
        command = [
            str(launcher), "launch", "--multi_gpu", "--num_processes", str(processes),
            "--main_process_port", str(free_port()), "-m", "lowlm.cli", "eval", str(config),
            "--force",
        ]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="HF model folder (default: SmolLM2-135M)")
    parser.add_argument("--questions", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--parts", nargs="+", choices=["harness", "ranks"], default=["harness", "ranks"]
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-harness-"))
    model = args.model or smollm2_folder(Path.home() / ".cache" / "lowlm")
    data = write_task(work / "tasks", args.questions)

    def config(name: str, task: dict, include: list[str]) -> Path:
        path = work / f"{name}.yaml"
        section = {"model": str(model), "batch_size": args.batch_size, "tasks": [task]}
        raw = {
            "run": {"name": name, "root": str(work / "runs")},
            "model": {"dtype": "fp32"},
            "eval": {**section, "harness_include": include},
        }
        path.write_text(yaml.safe_dump(raw), encoding="utf-8")
        return path

    print(f"{args.questions} questions, model {model}, batch {args.batch_size}, fp32, {DEVICE}")
    if "harness" in args.parts:
        harness = config("harness", {"harness": "bench_mmlu"}, [str(work / "tasks")])
        compare_harness(harness, model, work / "tasks", args)
    if "ranks" in args.parts:
        compare_ranks(config, data, args)


def compare_harness(harness: Path, model: Path, folder: Path, args) -> None:
    ours, theirs = [], []
    for repeat in range(args.repeats):  # alternated, each first in turn
        runs = [lambda: ours.append(lowlm_once(harness))]
        runs.append(lambda: theirs.append(by_hand_once(model, folder, args.batch_size)))
        for run in runs if repeat % 2 == 0 else runs[::-1]:
            run()
    same = all(o[2] == t[2] for o, t in zip(ours, theirs, strict=True))
    best_ours, best_theirs = min(o[0] for o in ours), min(t[0] for t in theirs)
    rounded = lambda runs, i: [round(r[i], 1) for r in runs]  # noqa: E731
    print(
        f"harness task: lowlm eval {best_ours:.1f} s, lm_eval by hand {best_theirs:.1f} s "
        f"(best of {args.repeats}); ratio {best_ours / best_theirs:.3f}x (goal <= 1.05x); "
        f"per-question scores identical: {same}\n"
        f"  every run, whole: lowlm {rounded(ours, 0)}, by hand {rounded(theirs, 0)}\n"
        f"  of which the harness's simple_evaluate: lowlm {rounded(ours, 1)}, "
        f"by hand {rounded(theirs, 1)}\n"
        f"  the rest (lowlm: key, task built, model loaded, results written; by hand: model "
        f"loaded): lowlm {[round(o[0] - o[1], 1) for o in ours]}, "
        f"by hand {[round(t[0] - t[1], 1) for t in theirs]}"
    )


def compare_ranks(config, data: Path, args) -> None:
    mc = {
        "name": "mc",
        "path": str(data),
        "fields": {
            "question": "question",
            "choices": ["answer_a", "answer_b", "answer_c", "answer_d"],
            "answer": "correct_answer",
        },
    }
    native = config("native", mc, [])
    one = min(ranks_once(native, 1) for _ in range(args.repeats))
    two = min(ranks_once(native, 2) for _ in range(args.repeats))
    share = (args.questions + 1) // 2
    print(
        f"native mc, {args.questions} questions: 1 process {one:.1f} s, 2 ranks {two:.1f} s "
        f"(each rank scores {share} and {args.questions - share}); 1 / 2 = {one / two:.2f}x "
        "(whole commands, start-up included)"
    )


if __name__ == "__main__":
    main()
