"""Benchmark `lowlm tokenize`: training time and MB/s, then batched encode throughput of the
merged fast tokenizer against the base's, measured in the same process.

    .venv/bin/python scripts/bench_tokenizer.py                      # bundled demo data
    .venv/bin/python scripts/bench_tokenizer.py \
        --base ~/.cache/lowlm-assets/tokenizers/mistral-v1/tokenizer.model \
        --corpus '~/.cache/lowlm-assets/corpus/zh-TW/*.txt' --vocab-size 20000
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import yaml

from lowlm.config import load_config
from lowlm.data.corpus import iter_documents, resolve_sources
from lowlm.stages import tokenize as tokenize_stage
from lowlm.tokenization.base import resolve_base_tokenizer

REPO = Path(__file__).resolve().parents[1]


def encode_rate(tokenizer, lines: list[str], batch_size: int, repeats: int) -> tuple[float, float]:
    """(MB/s, tokens/s) of batched encoding, best of `repeats` passes."""
    size = sum(len(line.encode("utf-8")) for line in lines)
    best, tokens = float("inf"), 0
    for _ in range(repeats):
        started = time.perf_counter()
        tokens = 0
        for start in range(0, len(lines), batch_size):
            ids = tokenizer(lines[start : start + batch_size], add_special_tokens=False)[
                "input_ids"
            ]
            tokens += sum(len(row) for row in ids)
        best = min(best, time.perf_counter() - started)
    return size / 1e6 / best, tokens / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default=str(REPO / "data/demo/zh-tw.txt"))
    parser.add_argument(
        "--base", default=None, help="base tokenizer (default: a demo English base)"
    )
    parser.add_argument("--english", default=str(REPO / "data/demo/en.txt"))
    parser.add_argument("--vocab-size", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-tokenizer-"))
    base = args.base
    if base is None:
        base_config = work / "base.yaml"
        base_config.write_text(
            yaml.safe_dump(
                {
                    "run": {"name": "base", "root": str(work)},
                    "tokenize": {
                        "corpus": [args.english],
                        "vocab_size": 1500,
                        "merge": False,
                        "holdout_lines": 0,
                    },
                }
            )
        )
        tokenize_stage.run(load_config(base_config))
        base = str(work / "base" / "tokenizer" / "tokenizer.model")

    config_path = work / "run.yaml"
    config_path.write_text(
        yaml.safe_dump(
            {
                "run": {"name": "merged", "root": str(work)},
                "model": {"tokenizer": os.path.expanduser(base)},
                "tokenize": {
                    "corpus": [os.path.expanduser(args.corpus)],
                    "vocab_size": args.vocab_size,
                    "eval_texts": {"en": args.english},
                },
            }
        )
    )
    config = load_config(config_path)
    started = time.perf_counter()
    report = tokenize_stage.run(config)
    stage_seconds = time.perf_counter() - started

    from transformers import AutoTokenizer

    merged = AutoTokenizer.from_pretrained(config.run_dir / "tokenizer")
    base_hf = resolve_base_tokenizer(config.model).load_hf()
    target = list(iter_documents(resolve_sources([os.path.expanduser(args.corpus)]), config.data))
    english = Path(args.english).read_text(encoding="utf-8").splitlines()

    print("\n== training ==")
    if "train_seconds" in report:
        print(
            f"sentencepiece training: {report['train_seconds']:.2f} s, "
            f"{report['train_mb_per_s']:.2f} MB/s of training text"
        )
    print(
        f"whole stage (train, merge, verify, report): {stage_seconds:.2f} s; "
        f"{report['new_tokens']} new tokens, vocabulary {report['vocab_size']}"
    )
    print(f"\n== batched encode, batch {args.batch_size}, best of {args.repeats} ==")
    for label, lines in (("target", target), ("english", english)):
        base_mb, base_tok = encode_rate(base_hf, lines, args.batch_size, args.repeats)
        new_mb, new_tok = encode_rate(merged, lines, args.batch_size, args.repeats)
        print(f"{label:<8} base   {base_mb:7.2f} MB/s {base_tok:12,.0f} tokens/s")
        print(
            f"{label:<8} merged {new_mb:7.2f} MB/s {new_tok:12,.0f} tokens/s   "
            f"speed ratio merged/base {new_mb / base_mb:.2f}"
        )


if __name__ == "__main__":
    main()
