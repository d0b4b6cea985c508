"""Benchmark lowlm's training loop against a plain transformers `Trainer`, in one process.

The same Llama (from scratch, seeded), the same packed blocks and the same batch are
trained for the same number of steps by each, alternating A/B/A/B; prints tokens/s of
each (best round), the ratio, the final losses and the peak resident memory growth.

    .venv/bin/python scripts/bench_pretrain.py                 # 4-layer 256-wide Llama, demo data
    .venv/bin/python scripts/bench_pretrain.py --hidden 512 --layers 8 --steps 20
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
import yaml
from _bench_common import PeakRss

REPO = Path(__file__).resolve().parents[1]


def make_model(args, vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64 or 1,
        max_position_embeddings=args.block,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def run_lowlm(args, data, vocab_size) -> tuple[float, float, float]:
    from accelerate import Accelerator

    from lowlm.training.loop import TrainPlan, train

    model = make_model(args, vocab_size)
    plan = TrainPlan(
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch,
        warmup_steps=2,
        log_every=args.steps,
        eval_every=10**9,
        save_every=10**9,
        seed=0,
    )
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    with tempfile.TemporaryDirectory() as folder, PeakRss() as memory:
        started = time.perf_counter()
        metrics, _ = train(accelerator, model, data, None, plan, Path(folder))
        seconds = time.perf_counter() - started
    return args.steps * args.batch * args.block / seconds, metrics["loss"], memory.growth_mb


def run_trainer(args, data, vocab_size) -> tuple[float, float, float]:
    from transformers import Trainer, TrainingArguments

    model = make_model(args, vocab_size)

    class Examples(torch.utils.data.Dataset):
        def __len__(self):
            return len(data)

        def __getitem__(self, index):
            example = data[index]
            return {k: torch.as_tensor(v) for k, v in example.items()}

    with tempfile.TemporaryDirectory() as folder, PeakRss() as memory:
        training_args = TrainingArguments(
            output_dir=folder,
            per_device_train_batch_size=args.batch,
            max_steps=args.steps,
            learning_rate=args.lr,
            lr_scheduler_type="cosine",
            warmup_steps=2,
            weight_decay=0.0,
            max_grad_norm=1.0,
            adam_beta2=0.95,
            logging_steps=args.steps,
            save_strategy="no",
            report_to=[],
            dataloader_num_workers=0,
            seed=0,
            use_cpu=not torch.cuda.is_available(),
            disable_tqdm=True,
        )
        trainer = Trainer(model=model, args=training_args, train_dataset=Examples())
        started = time.perf_counter()
        result = trainer.train()
        seconds = time.perf_counter() - started
    return args.steps * args.batch * args.block / seconds, result.training_loss, memory.growth_mb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default=str(REPO / "data/demo/zh-tw.txt"))
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    from lowlm.config import load_config
    from lowlm.data.blocks import BlockDataset, build_cache
    from lowlm.data.corpus import resolve_sources
    from lowlm.stages import tokenize
    from lowlm.training.pretrain_corpus import Blocks

    work = Path(tempfile.mkdtemp(prefix="bench-pretrain-"))
    config_path = work / "config.yaml"
    config_path.write_text(
        yaml.safe_dump(
            {
                "run": {"name": "bench", "root": str(work)},
                "tokenize": {"corpus": [args.corpus], "vocab_size": 4000, "merge": False},
            }
        )
    )
    config = load_config(config_path)
    tokenize.run(config)
    cache = work / "blocks"
    build_cache(
        cache,
        config.run_dir / "tokenizer",
        resolve_sources([args.corpus]),
        config.data,
        args.block,
        config.run.seed,
    )
    data = Blocks(BlockDataset(cache, "train"))
    vocab_size = 4000
    params = sum(p.numel() for p in make_model(args, vocab_size).parameters())
    print(
        f"\nLlama {params / 1e6:.1f}M parameters, {len(data)} blocks of {args.block}, batch "
        f"{args.batch}, {args.steps} steps, torch threads {torch.get_num_threads()}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
    )
    results: dict[str, list] = {"lowlm": [], "trainer": []}
    for round_ in range(args.rounds):
        for name, runner in (("trainer", run_trainer), ("lowlm", run_lowlm)):
            tokens_per_s, loss, memory = runner(args, data, vocab_size)
            results[name].append((tokens_per_s, loss, memory))
            print(
                f"round {round_ + 1} {name:<8} {tokens_per_s:9,.0f} tokens/s  final loss "
                f"{loss:.4f}  peak RSS growth {memory:7.1f} MB"
            )
    best = {name: max(runs, key=lambda r: r[0]) for name, runs in results.items()}
    print()
    for name, label in (("lowlm", "lowlm  "), ("trainer", "Trainer")):
        tokens_per_s, _, memory = best[name]
        print(f"best {label} {tokens_per_s:9,.0f} tokens/s, peak RSS growth {memory:.1f} MB")
    print(f"ratio lowlm / Trainer: {best['lowlm'][0] / best['trainer'][0]:.3f}")


if __name__ == "__main__":
    main()
