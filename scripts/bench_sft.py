"""Benchmark `lowlm sft` (LoRA instruction tuning) against transformers `Trainer` + peft, in one
process: tokens/s of each, and the ratios (the goal: lowlm >= 1.2x Trainer + peft).

    .venv/bin/python scripts/bench_sft.py                         # SmolLM2-135M, fp32
    .venv/bin/python scripts/bench_sft.py --max-length 512 --batch 4 --steps 24
    .venv/bin/python scripts/bench_sft.py --tiny                  # tiny random Llama, seconds

Model: SmolLM2-135M as a dense HF folder (~/.cache/lowlm/smollm2-135m-hf, made once from the
asset GGUF in ~/.cache/lowlm-assets as scripts/compare_with_harness.py does), or --model FOLDER,
or with --tiny a 2-layer random Llama with a byte-level BPE trained here on the demo text.

Four runs per round, alternating the two tools:
  trainer         Trainer + peft, random order, each batch padded to its longest example
                  (DataCollatorForSeq2Seq: labels padded with -100)
  lowlm           `lowlm sft`, sft.packing false (its own padding to the longest of the batch)
  trainer-grouped Trainer + peft with train_sampling_strategy=group_by_length (the old
                  `group_by_length=True`): batches of similar lengths, little padding
  lowlm-packed    `lowlm sft`, sft.packing true: whole examples concatenated into blocks of
                  at most max_length tokens (position ids restarting per example, when the
                  loop supports it), a batch padded to its longest block

Fairness rules:
- Same model folder, loaded in the same dtype; the same LoRA (r, alpha, dropout, target
  modules; peft's get_peft_model for both); same batch size, max_length, learning rate, AdamW
  betas (0.9, 0.95), warmup, cosine to 10% of the peak, weight decay 0, clipping 1.0, seed,
  precision (--dtype; fp32 default), no gradient checkpointing, one process, the same torch
  threads. The optimizer is each tool's default, torch's fused AdamW for both (Trainer:
  adamw_torch_fused; lowlm: fused where the device has the kernel).
- Same tokens: the examples are built once with lowlm's Template + build_examples (the
  stage's own code, same tokenizer, template and truncation); Trainer is fed exactly those
  input_ids / labels, and the instrumented lowlm runs check that the stage trained on the same
  ids (the same tokens, in blocks, when packed).
- Same work: every run makes one pass over the same E = steps x batch examples (lowlm's and
  Trainer's samplers are both one seeded permutation per epoch). Unpacked runs take `steps`
  optimizer steps; a packed run needs fewer steps for the same examples (ceil(blocks / batch)).
  Equal examples, hence equal real tokens, rather than equal steps: a step of packed blocks
  holds more examples, and comparing per step would hide (or fake) the gain of packing.
- "tokens/s" counts the same thing for both: real (non-padding) tokens of the examples, prompt
  and response alike, per second of training. The first --untimed optimizer steps of every run
  (default 2) are warmup and are not timed; their tokens are not counted. Model loading, data
  preparation, LoRA wrapping and saving the adapter are outside the timed span. Timed span:
  lowlm from the collate of step untimed+1 to the return of the training loop; Trainer from
  on_step_end of step `untimed` to on_step_end of the last step. Both include their own
  batching / padding / collation of the timed steps. Each run also prints
  "computed" tokens/s (padding included: batch x longest row per step) and its padding share,
  so the reader sees whether a gain is compute speed or less padding. "cpu" is the process's
  CPU time over the timed span / (its seconds x torch threads), "load" the 1-minute load
  average after the run: on a shared machine a run with cpu well under ~90% or a load above
  the core count was slowed by other work; rerun it (--rounds N keeps each variant's best).
  "cpu-adjusted" tokens/s = tokens/s / cpu share, an estimate of the rate with the cores to
  itself (rough: threads that spin while waiting count as CPU time); the ratios are also
  given on it, for a machine that other people are using.
- lowlm is driven through its public stage code path: a config written to a temporary run
  folder and `lowlm.stages.sft.run(config, force=True)` (reading the JSONL, template, build,
  pack, load, LoRA, the shared training loop, saving the adapter). The only instrumentation is
  a wrapper around the loop function the stage calls (lowlm.training.session.train) that
  notes the time and the lengths of each step where the loop collates it (wrapping the very
  collate the loop would use) and checks the ids; the collate, loss and loop are the
  stage's own. The stage's own logged tokens/s (whole run, warmup included)
  is printed beside for reference.

Data: the 21 bundled records of data/demo/instructions.jsonl plus generated Alpaca records of
varied length (instructions over paragraphs of the bundled data/demo/en.txt and zh-tw.txt:
some with an input, responses of log-normal length, some longer than max_length and so
truncated) up to E; the bundled file alone is too few and too short (~60 tokens each) to fill
the steps. Prints the count and the length distribution. --data FILE uses your own JSONL
instead (needs at least E valid records).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from _bench_common import PeakRss, smollm2_folder

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo"
CACHE = Path.home() / ".cache" / "lowlm"
VARIANTS = ("trainer", "lowlm", "trainer-grouped", "lowlm-packed")
TARGET = 1.2

EN_NO_INPUT = [
    "Explain this part of the Python language reference in plain words.",
    "Quote the passage of the language reference about this topic.",
    "What does the Python language reference say here?",
    "Write the reference text for this statement.",
]
EN_WITH_INPUT = [
    "Continue the documentation after the following sentence.",
    "Given this excerpt, write the section of the reference that follows.",
    "Expand the following note into the full explanation.",
]
ZH_NO_INPUT = [
    "請說明下列功能的用法。",
    "請寫出這個主題的說明文件。",
    "這個功能要怎麼使用？請詳細說明。",
    "請用繁體中文介紹這項操作步驟。",
]
ZH_WITH_INPUT = [
    "根據下面的說明，繼續寫出後面的內容。",
    "請把下面這段說明擴寫成完整的教學。",
    "閱讀以下文字，並補充相關的操作說明。",
]


@dataclass
class Result:
    tokens_per_s: float  # real (non-padding) tokens of the timed steps per second
    computed_per_s: float  # padding included (batch x longest row), per second
    real: int
    computed: int
    steps: int  # optimizer steps of the run
    timed_steps: int
    seconds: float
    cpu_share: float  # process CPU time / (seconds x torch threads): < ~0.9 means contention
    loss: float | None
    memory_mb: float
    logged_tokens_per_s: float | None = None  # the tool's own figure, warmup included

    @property
    def cpu_adjusted(self) -> float:
        """Real tokens per second of the process's own CPU time per thread: an estimate of
        tokens/s had the run had its threads' cores to itself (on a shared machine)."""
        return self.tokens_per_s / self.cpu_share if self.cpu_share else 0.0

    @property
    def padding(self) -> float:
        return 1 - self.real / self.computed if self.computed else 0.0


def timed(
    step_lengths: list[list[int]], seconds: float, cpu_seconds: float, untimed: int, **rest
) -> Result:
    """A Result from the lengths of the examples of every step and the timed seconds."""
    lengths = step_lengths[untimed:]
    real = sum(sum(step) for step in lengths)
    computed = sum(len(step) * max(step) for step in lengths)
    return Result(
        tokens_per_s=real / seconds,
        computed_per_s=computed / seconds,
        real=real,
        computed=computed,
        steps=len(step_lengths),
        timed_steps=len(lengths),
        seconds=seconds,
        cpu_share=cpu_seconds / (seconds * torch.get_num_threads()),
        **rest,
    )


# ----- model and data --------------------------------------------------------------------------


def tiny_folder(folder: Path, max_length: int) -> Path:
    """A 2-layer random Llama with a 2,000-token byte-level BPE trained on the demo text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2000,
        special_tokens=["<|endoftext|>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train([str(DEMO / "en.txt"), str(DEMO / "zh-tw.txt")], trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    config = LlamaConfig(
        vocab_size=len(hf),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=max(2048, max_length),
        tie_word_embeddings=True,
        bos_token_id=hf.bos_token_id,
        eos_token_id=hf.eos_token_id,
        pad_token_id=hf.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    hf.save_pretrained(folder)
    return folder


def generated_records(count: int, max_length: int, seed: int) -> list[dict]:
    """The bundled instructions, then Alpaca records over the bundled paragraphs: responses of
    log-normal length (median about max_length / 4 tokens), a third of them with an input."""
    bundled = [
        json.loads(line)
        for line in (DEMO / "instructions.jsonl").read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    texts = {
        "en": (DEMO / "en.txt").read_text(encoding="utf-8").splitlines(),
        "zh": (DEMO / "zh-tw.txt").read_text(encoding="utf-8").splitlines(),
    }
    chars_per_token = {"en": 4.0, "zh": 1.2}  # rough, only to aim the lengths
    rng = random.Random(seed)
    records = bundled[:count]
    while len(records) < count:
        language = rng.choice(("en", "zh"))
        lines = texts[language]
        target = min(rng.lognormvariate(math.log(max_length / 4), 0.8), 3 * max_length)
        start = rng.randrange(len(lines))
        response: list[str] = []
        while sum(len(line) for line in response) < target * chars_per_token[language]:
            response.append(lines[(start + len(response)) % len(lines)])
        record = {"instruction": "", "input": "", "output": "\n".join(response)}
        if rng.random() < 1 / 3:
            short = [line for line in (rng.choice(lines) for _ in range(8)) if len(line) < 400]
            record["input"] = short[0] if short else lines[0][:200]
            choices = EN_WITH_INPUT if language == "en" else ZH_WITH_INPUT
        else:
            choices = EN_NO_INPUT if language == "en" else ZH_NO_INPUT
        record["instruction"] = rng.choice(choices)
        records.append(record)
    return records


def prepare_data(args, folder: Path, work: Path, count: int):
    """(records file with exactly `count` usable records, their examples, the tokenizer).

    Candidates that build_examples would drop are left out of the file, so that the stage
    builds exactly these examples from it."""
    from lowlm.config import InstructionFields, ModelConfig
    from lowlm.data.instructions import read_conversations
    from lowlm.data.sft_examples import build_examples
    from lowlm.data.templates import Template
    from lowlm.models.load import tokenizer_for

    candidates = work / "candidates.jsonl"
    if args.data:
        lines = [
            line
            for path in args.data
            for line in Path(path).read_text(encoding="utf-8").splitlines()
            if line.strip()
        ]
    else:
        records = generated_records(count + count // 4 + 8, args.max_length, args.seed)
        lines = [json.dumps(r, ensure_ascii=False) for r in records]
    candidates.write_text("\n".join(lines) + "\n", encoding="utf-8")
    conversations, report = read_conversations([str(candidates)], InstructionFields())
    if report.invalid:
        sys.exit(f"{report.invalid} invalid records in the data; give only valid ones.")
    tokenizer = tokenizer_for(folder, ModelConfig(dtype=args.dtype))
    template = Template(args.template, tokenizer)
    kept_lines, examples, truncated = [], [], 0
    for line, conversation in zip(lines, conversations, strict=True):
        built, encoded = build_examples([conversation], template, args.max_length)
        if built and len(examples) < count:
            kept_lines.append(line)
            examples.extend(built)
            truncated += encoded.truncated
    if len(examples) < count:
        sys.exit(
            f"only {len(examples)} usable examples, {count} needed; add data or lower --steps."
        )
    records = work / "instructions.jsonl"
    records.write_text("\n".join(kept_lines) + "\n", encoding="utf-8")
    return records, examples, tokenizer, truncated


def describe(examples: list[dict], truncated: int, max_length: int) -> str:
    lengths = np.array([len(e["input_ids"]) for e in examples])
    trained = np.array([(e["labels"] != -100).sum() for e in examples])
    p = np.percentile(lengths, [0, 10, 50, 90, 100]).astype(int)
    return (
        f"{len(examples)} examples, {lengths.sum():,} tokens ({trained.sum():,} trained); "
        f"length min/p10/median/p90/max {p[0]}/{p[1]}/{p[2]}/{p[3]}/{p[4]}, mean "
        f"{lengths.mean():.0f}; {truncated} truncated to max_length {max_length}"
    )


def same_examples(trained: list[dict], expected: list[dict], examples: list[dict]) -> bool:
    """The stage trained on what the bench built: `expected` (the examples, or pack() of them)
    exactly, and so on the same tokens as Trainer gets (pack() may reorder examples)."""

    def ids(items):
        return np.concatenate([np.asarray(e["input_ids"]) for e in items])

    return (
        len(trained) == len(expected)
        and all(
            np.array_equal(a["input_ids"], b["input_ids"])
            and np.array_equal(a["labels"], b["labels"])
            for a, b in zip(trained, expected, strict=True)
        )
        and np.array_equal(np.sort(ids(trained)), np.sort(ids(examples)))
    )


# ----- lowlm -----------------------------------------------------------------------------------


class StepRecorder:
    """Wraps the collate the loop would use (the stage's, else the loop's own `_collate`): the
    loop collates each micro-step's examples at its start, once, so a call marks a step."""

    def __init__(self, collate):
        self.collate = collate
        self.starts: list[float] = []
        self.cpu: list[float] = []
        self.lengths: list[list[int]] = []
        self.trained: list[dict] = []  # each example the loop trained on, in order

    def __call__(self, examples, device):
        self.starts.append(time.perf_counter())
        self.cpu.append(time.process_time())
        self.lengths.append([len(e["input_ids"]) for e in examples])
        self.trained.extend(examples)
        return self.collate(examples, device)


@contextlib.contextmanager
def instrumented_loop(seen: dict):
    """Wrap the loop function that the stages call (lowlm.training.session.train)."""
    from lowlm.training import loop, session

    real_train = session.train

    def train(accelerator, model, train_data, *rest, collate=None, **options):
        recorder = StepRecorder(collate or loop._collate)
        with PeakRss() as memory:
            metrics = real_train(accelerator, model, train_data, *rest, collate=recorder, **options)
            seen["end"], seen["cpu_end"] = time.perf_counter(), time.process_time()
        seen.update(recorder=recorder, data=train_data, memory=memory.growth_mb)
        return metrics

    session.train = train
    try:
        yield
    finally:
        session.train = real_train


def run_lowlm(args, folder, records, examples, work, packed: bool, label: str) -> Result:
    from lowlm.config import load_config
    from lowlm.data.sft_examples import pack
    from lowlm.stages import sft

    expected = pack(examples, args.max_length) if packed else examples
    steps = math.ceil(len(expected) / args.batch)
    if steps <= args.untimed:
        sys.exit(f"{label}: {steps} steps leave nothing to time after --untimed {args.untimed}.")
    config_path = work / f"{label}.yaml"
    config_path.write_text(
        yaml.safe_dump(
            {
                "run": {"name": label, "root": str(work / "runs"), "seed": args.seed},
                "model": {"dtype": args.dtype},
                "sft": {
                    "model": str(folder),
                    "data": [str(records)],
                    "template": args.template,
                    "max_length": args.max_length,
                    "packing": packed,
                    "steps": steps,
                    "lr": args.lr,
                    "batch_size": args.batch,
                    "warmup_steps": args.warmup,
                    "weight_decay": 0.0,
                    "max_grad_norm": 1.0,
                    "min_lr_ratio": 0.1,
                    "log_every": steps,
                    "eval_every": 10**9,
                    "save_every": 10**9,
                    "eval_fraction": 0.0,
                    "lora": {
                        "r": args.lora_r,
                        "alpha": args.lora_alpha,
                        "dropout": args.lora_dropout,
                        "target_modules": args.target_modules,
                    },
                    "energy": {"enabled": False},
                },
            },
            allow_unicode=True,
        )
    )
    config = load_config(config_path)
    seen: dict = {}
    with instrumented_loop(seen):
        metrics = sft.run(config, force=True, resume=False)
    if "recorder" not in seen:
        sys.exit("the sft stage did not call lowlm.training.session.train; update the bench.")
    if not same_examples(seen["data"], expected, examples):
        sys.exit(f"{label}: the stage trained on other ids than the bench built; update the bench.")
    recorder = seen["recorder"]
    if len(recorder.starts) != steps:
        sys.exit(f"{label}: the loop collated {len(recorder.starts)} batches in {steps} steps.")
    return timed(
        recorder.lengths,
        seen["end"] - recorder.starts[args.untimed],
        seen["cpu_end"] - recorder.cpu[args.untimed],
        args.untimed,
        loss=metrics.get("loss"),
        memory_mb=seen["memory"],
        logged_tokens_per_s=metrics.get("tokens_per_s"),
    )


# ----- Trainer + peft ----------------------------------------------------------------------------


def run_trainer(args, folder, tokenizer, examples, work, grouped: bool) -> Result:
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from lowlm.models.load import resolve_load_dtype

    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=resolve_load_dtype(args.dtype))
    model = get_peft_model(
        model,
        LoraConfig(
            r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            target_modules=list(args.target_modules),
            task_type="CAUSAL_LM",
        ),
    )

    class Examples(torch.utils.data.Dataset):
        def __len__(self):
            return len(examples)

        def __getitem__(self, index):
            example = examples[index]
            return {
                "input_ids": example["input_ids"].tolist(),
                "labels": example["labels"].tolist(),
            }

    pad = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    batches: list[list[int]] = []  # in the order the steps use them

    def collate(features):
        batches.append([len(f["input_ids"]) for f in features])
        return pad(features)

    step_ends: list[float] = []
    step_cpu: list[float] = []

    class StepEnds(TrainerCallback):
        def on_step_end(self, *_, **__):
            step_ends.append(time.perf_counter())
            step_cpu.append(time.process_time())

    steps = math.ceil(len(examples) / args.batch)
    with tempfile.TemporaryDirectory(dir=work) as output, PeakRss() as memory:
        training_args = TrainingArguments(
            output_dir=output,
            per_device_train_batch_size=args.batch,
            max_steps=steps,
            learning_rate=args.lr,
            lr_scheduler_type="cosine_with_min_lr",
            lr_scheduler_kwargs={"min_lr_rate": 0.1},
            warmup_steps=args.warmup,
            weight_decay=0.0,
            max_grad_norm=1.0,
            adam_beta2=0.95,
            logging_steps=steps,
            save_strategy="no",
            report_to=[],
            dataloader_num_workers=0,
            seed=args.seed,
            use_cpu=not torch.cuda.is_available(),
            bf16=args.dtype == "bf16",
            disable_tqdm=True,
            train_sampling_strategy="group_by_length" if grouped else "random",
        )
        trainer = Trainer(
            model=model,
            args=training_args,
            train_dataset=Examples(),
            data_collator=collate,
            processing_class=tokenizer,
            callbacks=[StepEnds()],
        )
        result = trainer.train()
    if len(step_ends) != steps or len(batches) < steps:
        sys.exit(f"Trainer ran {len(step_ends)} steps and {len(batches)} batches for {steps}.")
    return timed(
        batches[:steps],
        step_ends[-1] - step_ends[args.untimed - 1],
        step_cpu[-1] - step_cpu[args.untimed - 1],
        args.untimed,
        loss=result.training_loss,
        memory_mb=memory.growth_mb,
        logged_tokens_per_s=None,
    )


# ----- main ---------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="A tiny random Llama: a quick check.")
    parser.add_argument("--model", default=None, help="HF model folder (default: SmolLM2-135M).")
    parser.add_argument("--data", nargs="*", default=None, help="Instruction JSONL files.")
    parser.add_argument("--template", default="alpaca")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=24, help="Steps of the unpacked runs.")
    parser.add_argument("--untimed", type=int, default=2, help="Warmup steps not timed.")
    parser.add_argument("--warmup", type=int, default=2, help="Learning-rate warmup steps.")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--lora-r", type=int, default=64)
    parser.add_argument("--lora-alpha", type=float, default=128)
    parser.add_argument("--lora-dropout", type=float, default=0.05)
    parser.add_argument(
        "--target-modules",
        nargs="+",
        default=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's, the cores)."
    )
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    if args.untimed < 1:
        parser.error("--untimed must be at least 1 (the first step is the warmup).")
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    import lowlm

    count = args.steps * args.batch
    with tempfile.TemporaryDirectory(prefix="bench-sft-") as tmp:
        work = Path(tmp)
        if args.tiny:
            folder = tiny_folder(work / "tiny", args.max_length)
        else:
            folder = (
                Path(args.model) if args.model else smollm2_folder(CACHE, "pass --model, or --tiny")
            )
        records, examples, tokenizer, truncated = prepare_data(args, folder, work, count)
        from lowlm.data.sft_examples import pack

        blocks = pack(examples, args.max_length)
        config = json.loads((folder / "config.json").read_text())
        print(
            f"\nmodel {'tiny random Llama' if args.tiny else folder} "
            f"(hidden {config['hidden_size']}, {config['num_hidden_layers']} layers, vocab "
            f"{config['vocab_size']}), {args.dtype}, device "
            f"{'cuda' if torch.cuda.is_available() else 'cpu'}, {os.cpu_count()} CPUs, torch "
            f"{torch.__version__} threads {torch.get_num_threads()}, OMP_NUM_THREADS="
            f"{os.environ.get('OMP_NUM_THREADS', 'unset')}; transformers "
            f"{transformers.__version__}, lowlm {getattr(lowlm, '__version__', '?')}"
        )
        print(f"data: {describe(examples, truncated, args.max_length)}")
        print(
            f"packed: {len(blocks)} blocks of <= {args.max_length} "
            f"({len(examples) / len(blocks):.1f} examples each); batch {args.batch}, "
            f"unpacked {math.ceil(count / args.batch)} steps, packed "
            f"{math.ceil(len(blocks) / args.batch)} steps, first {args.untimed} of each untimed; "
            f"LoRA r {args.lora_r} alpha {args.lora_alpha:g} dropout {args.lora_dropout:g} on "
            f"{','.join(args.target_modules)}; template {args.template}; lr {args.lr:g}\n"
        )
        results: dict[str, list[Result]] = {name: [] for name in args.variants}
        for round_ in range(args.rounds):
            for name in args.variants:
                label = f"{name}-{round_ + 1}"
                if name.startswith("trainer"):
                    result = run_trainer(
                        args, folder, tokenizer, examples, work, grouped=name.endswith("grouped")
                    )
                else:
                    result = run_lowlm(
                        args, folder, records, examples, work, name.endswith("packed"), label
                    )
                results[name].append(result)
                loss = "-" if result.loss is None else f"{result.loss:.4f}"
                logged = (
                    f"  (own log, warmup incl.: {result.logged_tokens_per_s:,.0f})"
                    if result.logged_tokens_per_s
                    else ""
                )
                print(
                    f"round {round_ + 1} {name:<16}{result.tokens_per_s:9,.0f} tokens/s  "
                    f"computed {result.computed_per_s:9,.0f}/s  padding {result.padding:5.1%}  "
                    f"{result.real:,} tokens in {result.timed_steps}/{result.steps} steps "
                    f"{result.seconds:.1f} s  loss {loss}  peak RSS +{result.memory_mb:.0f} MB  "
                    f"cpu {result.cpu_share:.0%} (cpu-adjusted {result.cpu_adjusted:,.0f} "
                    f"tokens/s) load {os.getloadavg()[0]:.1f}{logged}",
                    flush=True,
                )
                gc.collect()
    best = {name: max(runs, key=lambda r: r.tokens_per_s) for name, runs in results.items()}
    print()
    for name, result in best.items():
        print(
            f"best {name:<16}{result.tokens_per_s:9,.0f} tokens/s (real), "
            f"{result.computed_per_s:9,.0f} computed/s, padding {result.padding:.1%}, cpu "
            f"{result.cpu_share:.0%}, cpu-adjusted {result.cpu_adjusted:,.0f} tokens/s"
        )
    shared = [f"{n} ({r.cpu_share:.0%})" for n, r in best.items() if r.cpu_share < 0.85]
    if shared:
        print(
            f"warning: other work slowed {', '.join(shared)} (process CPU under 85% of its "
            "threads): rerun on a quiet machine or with more --rounds before trusting ratios."
        )
    pairs = [
        (a, b)
        for a in ("lowlm-packed", "lowlm")
        for b in ("trainer", "trainer-grouped")
        if a in best and b in best
    ]
    if pairs:
        print()
    for a, b in pairs:
        ratio = best[a].tokens_per_s / best[b].tokens_per_s
        computed = best[a].computed_per_s / best[b].computed_per_s
        adjusted = best[a].cpu_adjusted / best[b].cpu_adjusted
        verdict = "meets" if ratio >= TARGET else "below"
        print(
            f"ratio {a} / {b}: {ratio:.3f} tokens/s ({verdict} the {TARGET}x goal), "
            f"{computed:.3f} computed/s, {adjusted:.3f} cpu-adjusted"
        )


if __name__ == "__main__":
    main()
