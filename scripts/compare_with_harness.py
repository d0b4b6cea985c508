"""Run lowlm eval and lm-evaluation-harness on the same MMLU files and model; compare them.

lm-eval is the one beside this Python (the `lowlm[harness]` extra) or, without it, one
installed into its own virtualenv (default .venv-harness, torch==2.13.0 first); it reads the
local MMLU release layout through generated task YAMLs that copy the harness's own MMLU
template (dataset_path: csv). Prints per-question agreement of the
predictions, both accuracies and both wall times, for each number of shots.

    .venv/bin/python scripts/compare_with_harness.py --shots 0 5 --limit 10
    .venv/bin/python scripts/compare_with_harness.py --model path/to/hf-model --limit 0   # all
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from _bench_common import smollm2_folder

ASSETS = Path.home() / ".cache" / "lowlm-assets"
REPO = Path(__file__).resolve().parents[1]
HARNESS_TEMPLATE = {
    "output_type": "multiple_choice",
    "test_split": "test",
    "fewshot_split": "dev",
    "fewshot_config": {"sampler": "first_n"},
    "doc_to_text": "{{question.strip()}}\nA. {{A}}\nB. {{B}}\nC. {{C}}\nD. {{D}}\nAnswer:",
    "doc_to_choice": ["A", "B", "C", "D"],
    "doc_to_target": "{{['A', 'B', 'C', 'D'].index(answer)}}",
    "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    "metadata": {"version": 1.0},
}


def ensure_harness(venv: Path) -> Path:
    beside = Path(sys.executable).parent / "lm_eval"  # the lowlm[harness] extra, if installed
    if beside.exists():
        return beside
    lm_eval = venv / "bin" / "lm_eval"
    if lm_eval.exists():
        return lm_eval
    print(f"installing lm-eval into {venv} (once) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "pip"), "install", "-q"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)
    subprocess.run([*pip, "lm-eval[hf]", "transformers", "accelerate"], check=True)
    return lm_eval


def write_tasks(folder: Path, mmlu: Path) -> list[str]:
    from lowlm.evaluation.benchmarks import BENCHMARKS

    data = mmlu / "data" if (mmlu / "data").is_dir() else mmlu
    names = []
    for subject in BENCHMARKS["mmlu"].subjects:
        test = data / "test" / f"{subject}_test.csv"
        if not test.exists():
            continue
        task = dict(HARNESS_TEMPLATE)
        task.update(
            task=f"lowlm_mmlu_{subject}",
            dataset_path="csv",
            dataset_kwargs={
                "data_files": {"test": str(test), "dev": str(data / "dev" / f"{subject}_dev.csv")},
                "column_names": ["question", "A", "B", "C", "D", "answer"],
                "keep_default_na": False,
            },
            description=f"The following are multiple choice questions (with answers) about "
            f"{subject.replace('_', ' ')}.\n\n",
        )
        (folder / f"lowlm_mmlu_{subject}.yaml").write_text(yaml.safe_dump(task, allow_unicode=True))
        names.append(task["task"])
    return names


def harness_predictions(output: Path) -> dict[tuple[str, int], str]:
    predictions = {}
    for path in output.rglob("samples_lowlm_mmlu_*.jsonl"):
        subject = path.name.removeprefix("samples_lowlm_mmlu_").rsplit("_", 1)[0]
        for line in path.read_text().split("\n"):
            if not line.strip():
                continue
            sample = json.loads(line)
            lls = [float(r[0]) for r in sample["filtered_resps"]]
            predictions[(subject, int(sample["doc_id"]))] = "ABCD"[lls.index(max(lls))]
    return predictions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="HF model folder (default: SmolLM2-135M)")
    parser.add_argument("--mmlu", default=str(ASSETS / "bench" / "mmlu"))
    parser.add_argument("--shots", type=int, nargs="+", default=[0, 5])
    parser.add_argument("--limit", type=int, default=10, help="questions a subject (0: all)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--dtype",
        choices=["fp32", "bf16"],
        default="fp32",
        help="weights dtype, the same for both (bf16: AMX / GPU tensor cores)",
    )
    parser.add_argument("--harness-venv", default=str(REPO / ".venv-harness"))
    parser.add_argument("--work", default=None)
    args = parser.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="compare-harness-"))
    work.mkdir(parents=True, exist_ok=True)
    lm_eval = ensure_harness(Path(args.harness_venv))
    model = Path(args.model) if args.model else smollm2_folder(Path.home() / ".cache" / "lowlm")
    tasks_dir = work / "tasks"
    tasks_dir.mkdir(exist_ok=True)
    task_names = write_tasks(tasks_dir, Path(args.mmlu))

    from lowlm.config import load_config
    from lowlm.stages import eval as eval_stage

    for shots in args.shots:
        config_path = work / f"lowlm-{shots}.yaml"
        task = {"name": "mmlu", "path": args.mmlu, "shots": shots}
        if args.limit:
            task["limit"] = args.limit
        config_path.write_text(
            yaml.safe_dump(
                {
                    "run": {"name": f"lowlm-{shots}shot", "root": str(work)},
                    "model": {"base": str(model), "dtype": args.dtype},
                    "eval": {"model": str(model), "tasks": [task], "batch_size": args.batch_size},
                }
            )
        )
        started = time.perf_counter()
        ours = eval_stage.run(load_config(config_path), force=True)
        lowlm_seconds = time.perf_counter() - started
        result = ours["tasks"][f"mmlu_{shots}shot"]
        samples = work / f"lowlm-{shots}shot" / "eval" / f"samples-mmlu_{shots}shot.jsonl"
        our_predictions, targets = {}, {}
        for line in samples.read_text().split("\n"):
            if not line.strip():
                continue
            sample = json.loads(line)
            key = (sample["subject"], sample["index"])
            our_predictions[key], targets[key] = sample["prediction"], sample["target"]

        output = work / f"harness-{shots}shot"
        command = [
            str(lm_eval),
            "--model",
            "hf",
            "--model_args",
            f"pretrained={model},dtype={'bfloat16' if args.dtype == 'bf16' else 'float32'}",
            "--tasks",
            ",".join(task_names),
            "--include_path",
            str(tasks_dir),
            "--num_fewshot",
            str(shots),
            "--batch_size",
            str(args.batch_size),
            "--device",
            "cpu" if not os.environ.get("CUDA_VISIBLE_DEVICES") else "cuda",
            "--log_samples",
            "--output_path",
            str(output),
        ]
        if args.limit:
            command += ["--limit", str(args.limit)]
        env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
        started = time.perf_counter()
        completed = subprocess.run(command, env=env, capture_output=True, text=True)
        harness_seconds = time.perf_counter() - started
        if completed.returncode != 0:
            sys.exit(f"lm_eval failed:\n{completed.stderr[-4000:]}")
        theirs = harness_predictions(output)
        shared = sorted(set(theirs) & set(our_predictions))
        agree = sum(theirs[k] == our_predictions[k] for k in shared)
        harness_acc = sum(theirs[k] == targets[k] for k in shared) / len(shared)
        print(
            f"\n== MMLU, {shots}-shot, {args.dtype}, {len(shared)} questions "
            f"({len(our_predictions)} scored by lowlm, {len(theirs)} by the harness) =="
        )
        print(f"prediction agreement: {agree}/{len(shared)} = {agree / len(shared):.2%}")
        print(
            f"accuracy: lowlm {result['acc']:.4f}, harness {harness_acc:.4f}, "
            f"difference {100 * (result['acc'] - harness_acc):+.2f} points"
        )
        print(
            f"wall time (model loading included): lowlm {lowlm_seconds:.1f} s, "
            f"harness {harness_seconds:.1f} s, ratio harness/lowlm "
            f"{harness_seconds / lowlm_seconds:.2f}"
        )


if __name__ == "__main__":
    main()
