"""Does `lowlm finetune` learn with its defaults under LoRA? A line-language classifier on a real
small model, run through the CLI: accuracy, training loss, time and peak memory, for the
method's default learning rate and, in the same invocation, a baseline rate (default 2e-5, the
old one-for-all default, a full fine-tuning rate).

    .venv/bin/python scripts/bench_finetune_lora.py                  # SmolLM2-135M, 4 languages
    .venv/bin/python scripts/bench_finetune_lora.py --baseline-lr 0  # the default only
    .venv/bin/python scripts/bench_finetune_lora.py --per-label 60 --test-per-label 30

Model: SmolLM2-135M as a dense HF folder (~/.cache/lowlm/smollm2-135m-hf, made once from the
asset GGUF in ~/.cache/lowlm-assets), or --model FOLDER.

Data: one paragraph a line, labelled by language: zh-TW, zh-CN and pt-BR from the asset
corpora (~/.cache/lowlm-assets/corpus), English from the bundled data/demo/en.txt; lines of
--min-chars to --max-chars characters, sampled with a fixed seed, each line in one set only.
Chance is 1/labels (the test set is balanced); "majority" is printed beside the accuracy.

Each run is `lowlm finetune CONFIG` in a child process with finetune.method lora, the given
epochs and, apart from the learning rate of the baseline run, every other finetune field at
its default. "peak RSS" is the child's maximum resident set size (getrusage), which includes
the model load; the stage's own log gives the loss.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from _bench_common import ASSETS, smollm2_folder

REPO = Path(__file__).resolve().parents[1]
CACHE = Path.home() / ".cache" / "lowlm"
SOURCES = {
    "zh-TW": sorted((ASSETS / "corpus" / "zh-TW").glob("*.txt")),
    "zh-CN": sorted((ASSETS / "corpus" / "zh-CN").glob("*.txt")),
    "pt-BR": sorted((ASSETS / "corpus" / "pt-BR").glob("*.txt")),
    "en": [REPO / "data" / "demo" / "en.txt"],
}


def labelled_sets(per_label: int, test_per_label: int, min_chars: int, max_chars: int, seed: int):
    """Balanced train and test rows {text, label}; no line in both, none twice."""
    rng = random.Random(seed)
    train, test = [], []
    for label, files in SOURCES.items():
        if not files or not all(f.exists() for f in files):
            sys.exit(f"the {label} text is missing ({files}): run ../shared/tools/get-assets.")
        lines = sorted(
            {
                line.strip()
                for f in files
                for line in f.read_text(encoding="utf-8").splitlines()
                if min_chars <= len(line.strip()) <= max_chars
            }
        )
        if len(lines) < per_label + test_per_label:
            sys.exit(f"only {len(lines)} {label} lines of the wanted length; ask for fewer.")
        chosen = rng.sample(lines, per_label + test_per_label)
        train += [{"text": t, "label": label} for t in chosen[:per_label]]
        test += [{"text": t, "label": label} for t in chosen[per_label:]]
    rng.shuffle(train)
    return train, test


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return path


def run_finetune(folder: Path, model: Path, train: Path, test: Path, epochs: float, lr) -> dict:
    """`lowlm finetune` in a child process; its results, loss log, seconds and peak RSS."""
    finetune = {"train": str(train), "test": str(test), "method": "lora", "epochs": epochs}
    if lr is not None:
        finetune["lr"] = lr
    config = {
        "run": {"root": str(folder), "name": "bench"},
        "model": {"base": str(model)},
        "finetune": finetune,
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "lowlm.cli", "finetune", str(path)], capture_output=True, text=True
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"lowlm finetune failed:\n{done.stdout}\n{done.stderr}")
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    out = folder / "bench" / "finetune"
    log = [json.loads(line) for line in (out / "log.jsonl").open(encoding="utf-8")]
    losses = [entry["loss"] for entry in log if "loss" in entry]
    resolved = yaml.safe_load((folder / "bench" / "config.yaml").read_text(encoding="utf-8"))
    return {
        "lr": resolved["finetune"]["lr"],
        "results": json.loads((out / "results.json").read_text(encoding="utf-8")),
        "losses": losses,
        "steps": log[-1].get("step"),
        "seconds": seconds,
        # ru_maxrss of children is the largest child so far: valid for the first run, and an
        # upper bound for later ones unless they grew past it.
        "peak_rss_gb": peak_kb / 2**20 if peak_kb > before else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="An HF model folder (default: SmolLM2-135M).")
    parser.add_argument("--per-label", type=int, default=100, help="Training lines per label.")
    parser.add_argument("--test-per-label", type=int, default=50, help="Test lines per label.")
    parser.add_argument("--min-chars", type=int, default=20)
    parser.add_argument("--max-chars", type=int, default=200)
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument(
        "--baseline-lr", type=float, default=2e-5, help="Second run's lr (0: no second run)."
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model = args.model or smollm2_folder(CACHE)
    train, test = labelled_sets(
        args.per_label, args.test_per_label, args.min_chars, args.max_chars, args.seed
    )
    labels = len(SOURCES)
    print(
        f"data: {len(train)} training and {len(test)} test lines, {labels} labels "
        f"({', '.join(SOURCES)}), {args.min_chars}-{args.max_chars} characters; chance "
        f"{1 / labels:.3f}, ln {labels} = {__import__('math').log(labels):.3f}"
    )
    runs = {"default lr": None}
    if args.baseline_lr > 0:
        runs[f"lr {args.baseline_lr:g}"] = args.baseline_lr
    for name, lr in runs.items():
        with tempfile.TemporaryDirectory(prefix="bench-finetune-") as tmp:
            folder = Path(tmp)
            result = run_finetune(
                folder,
                model,
                write_jsonl(folder / "train.jsonl", train),
                write_jsonl(folder / "test.jsonl", test),
                args.epochs,
                lr,
            )
        scores, losses = result["results"], result["losses"]
        peak = f"{result['peak_rss_gb']:.2f} GB" if result["peak_rss_gb"] else "n/a"
        print(
            f"{name:<12} lr {result['lr']:g}: accuracy {scores['accuracy']:.3f} "
            f"(macro F1 {scores['macro_f1']:.3f}, majority {scores['majority_class_accuracy']:.3f}"
            f", {scores['n']} test lines); loss {losses[0]:.3f} -> {losses[-1]:.3f} over "
            f"{result['steps']} steps; {result['seconds']:.0f} s; peak RSS {peak}"
        )


if __name__ == "__main__":
    main()
