"""GPU check: the training and eval paths of lowlm on one CUDA device, one line per check.

Runs offline on the bundled demo text with a from-scratch TTL-160m-shaped Llama (no model
download): full pre-training in bf16, LoRA stage 2 on the result, packed SFT, a SIGKILL and
resume, export parity, and eval (bits per character, and multiple-choice scores with and
without the shared-prefix cache); then stage 2 under each switch (attention kernels, gradient
checkpointing, compile, liger, QLoRA 4-bit, isolated documents), packed-document isolation
under each kernel, FSDP2 through accelerate on the one device, and the host syncs the
training loop makes (torch's sync debug mode). Each line gives the
check, ok / FAIL / skipped, and tokens/s, MFU and peak GPU memory where they apply.
`--smoke` runs the same checks with a tiny model and a few steps (on a CPU too), to test
the script itself.

    scripts/gpu_check.sh            # on the GPU machine (≤ 8 minutes on one H200)
    .venv/bin/python scripts/gpu_check.py --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo"
LINES: list[str] = []


def say(check: str, status: str, metrics: dict | None = None, note: str = "") -> None:
    parts = [f"{check:<28}", f"{status:<9}"]
    for key, unit in (("tokens_per_s", "tok/s"), ("mfu", "MFU"), ("peak_gpu_memory_gb", "GB")):
        value = (metrics or {}).get(key)
        if value is not None:
            parts.append(f"{value:.3g} {unit}" if key != "mfu" else f"{100 * value:.1f}% {unit}")
    if note:
        parts.append(note)
    line = "  ".join(parts)
    LINES.append(line)
    print(line, flush=True)


def lowlm(*args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "lowlm.cli", *args]
    environment = {**os.environ, "PYTHONPATH": str(REPO / "src"), **(env or {})}
    result = subprocess.run(command, capture_output=True, text=True, env=environment)
    if check and result.returncode != 0:
        raise RuntimeError(result.stderr.strip().splitlines()[-1] if result.stderr else "failed")
    return result


def manifest(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())["stages"]


def _installed(package: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(package) is not None


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


def _count_syncs(work: Path) -> tuple[str, dict, str]:
    """Train a small Llama 20 steps (log every 10) under torch.cuda.set_sync_debug_mode("warn")
    and count the synchronizing calls made from lowlm's training loop, and from elsewhere."""
    import warnings

    import numpy as np
    import torch
    from accelerate import Accelerator
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(REPO / "src"))
    from lowlm.training import loop

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=4096,
            hidden_size=256,
            intermediate_size=1024,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=256,
        )
    )
    rng = np.random.default_rng(0)
    data = [
        {"input_ids": ids, "labels": ids}
        for ids in rng.integers(0, 4096, (64, 256), dtype=np.int64)
    ]
    plan = loop.TrainPlan(
        steps=20, lr=1e-3, batch_size=8, log_every=10, eval_every=10**9, save_every=10**9
    )
    accelerator = Accelerator(mixed_precision="bf16")
    loop.train(accelerator, model, data[:8], None, replace_plan(plan, steps=2), work / "warm")
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loop.train(accelerator, model, data, None, plan, work / "syncs")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    training = Path(loop.__file__).resolve().parent  # the loop and its guard and logger
    ours = [w for w in syncs if Path(w.filename).resolve().parent == training]
    where = sorted({f"{Path(w.filename).name}:{w.lineno}" for w in ours})
    status = "ok" if len(ours) <= 2 * 2 else "FAIL"  # two logging steps
    note = (
        f"{len(ours)} in lowlm's loop over 20 steps ({', '.join(where) or 'none'}), "
        f"{len(syncs) - len(ours)} elsewhere"
    )
    return status, {}, note


def replace_plan(plan, **changes):
    from dataclasses import replace

    return replace(plan, **changes)


@dataclass
class Run:
    """What the checks share: the options, the folders, the configs they write and run."""

    smoke: bool
    work: Path
    root: Path
    cuda: bool
    dtype: str
    base: dict  # the from-scratch run's config
    scratch: Path
    tuned: dict  # LoRA stage 2, SFT and eval on the exported model
    tuned_path: Path

    @property
    def exported(self) -> Path:
        return self.root / "scratch" / "export"


def configure(smoke: bool, work: Path) -> Run:
    import torch

    root = work / "runs"
    small = smoke
    dtype = "bf16" if torch.cuda.is_available() else "fp32"
    energy = {"enabled": False}
    base = {
        "run": {"name": "scratch", "root": str(root)},
        "model": {"dtype": dtype},
        "tokenize": {"corpus": [str(DEMO / "zh-tw.txt")], "vocab_size": 4000, "merge": False},
        "init": {"size": "tiny" if small else "ttl-160m"},
        "pretrain": {
            "block_size": 64 if small else 512,
            "batch_size": 4 if small else 32,
            "full": {"steps": 6 if small else 120, "lr": 6e-4},
            "warmup_steps": 2 if small else 20,
            "log_every": 2 if small else 20,
            "eval_every": 6 if small else 60,
            "save_every": 3 if small else 40,
            "energy": energy,
        },
    }
    mc = work / "mc.jsonl"
    tuned = {
        "run": {"name": "lora", "root": str(root)},
        "model": {"base": str(root / "scratch" / "export"), "dtype": dtype},
        "pretrain": {
            "corpus": [str(DEMO / "zh-tw.txt")],
            "block_size": base["pretrain"]["block_size"],
            "batch_size": base["pretrain"]["batch_size"],
            "stage2": {
                "steps": 6 if small else 60,
                "lr": 2e-4,
                "train_embeddings": "none",
                "lora": {"r": 8 if small else 64, "alpha": 16 if small else 128},
            },
            "log_every": 2 if small else 20,
            "energy": energy,
        },
        "sft": {
            "data": [str(DEMO / "instructions.jsonl")],
            "packing": True,
            "max_length": 256,
            "steps": 4 if small else 30,
            "batch_size": 2 if small else 8,
            "eval_fraction": 0,
            "log_every": 2 if small else 10,
            "energy": energy,
        },
        "eval": {
            "tasks": [
                {"name": "ppl", "path": str(root / "scratch" / "tokenizer" / "heldout.txt")},
                {"name": "mc", "path": str(mc), "shots": 2},
            ],
        },
    }
    scratch = write(work / "scratch.yaml", base)
    tuned_path = write(work / "lora.yaml", tuned)
    cuda = torch.cuda.is_available()
    return Run(smoke, work, root, cuda, dtype, base, scratch, tuned, tuned_path)


def check_environment(run: Run) -> bool:
    import peft
    import torch
    import transformers

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    say(
        "environment",
        "ok" if torch.cuda.is_available() or run.smoke else "FAIL",
        note=f"{device}; torch {torch.__version__}, transformers {transformers.__version__}, "
        f"peft {peft.__version__}",
    )
    return True


def check_pretrain_full(run: Run) -> bool:
    """Full pre-training from scratch (tokenize, init, pretrain, export); the later checks
    need its model, so its failure ends the checks."""
    check = f"pretrain full ({run.dtype})"
    try:
        started = time.time()
        lowlm("run", str(run.scratch))
        metrics = manifest(run.root / "scratch")["pretrain-full"]["metrics"]
        loss = metrics.get("loss", float("nan"))
        say(check, "ok", metrics, f"loss {loss:.3f}, {time.time() - started:.0f} s")
        return True
    except Exception as exc:  # a check's failure is a line, the next checks still run
        say(check, "FAIL", note=str(exc)[:200])
        return False


def check_kill_and_resume(run: Run) -> bool:
    """The same run, killed after its first checkpoint, then resumed."""
    killed_path = write(
        run.work / "killed.yaml", dict(run.base, run={"name": "killed", "root": str(run.root)})
    )
    try:
        lowlm("tokenize", str(killed_path))
        lowlm("init", str(killed_path))
        env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
        process = subprocess.Popen(
            [sys.executable, "-m", "lowlm.cli", "pretrain", str(killed_path)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        first = run.base["pretrain"]["save_every"]
        marker = run.root / "killed" / ".pretrain-full.train" / "checkpoints" / f"step-{first}"
        deadline = time.time() + 300
        while not (marker / "state.json").exists() and process.poll() is None:
            if time.time() > deadline:
                break
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait()
        resumed = lowlm("pretrain", str(killed_path))
        whole = manifest(run.root / "scratch")["pretrain-full"]["metrics"]
        again = manifest(run.root / "killed")["pretrain-full"]["metrics"]
        same = abs(whole["loss"] - again["loss"]) < 1e-3
        say(
            "kill + resume",
            "ok" if "resuming from" in resumed.stdout and same else "FAIL",
            note=f"final loss {again['loss']:.4f} vs uninterrupted {whole['loss']:.4f}",
        )
    except Exception as exc:
        say("kill + resume", "FAIL", note=str(exc)[:200])
    return True


def check_tuning_stages(run: Run) -> bool:
    """LoRA stage 2 on the exported model, export parity, packed SFT, eval."""
    with (run.work / "mc.jsonl").open("w", encoding="utf-8") as handle:
        for i in range(24):
            record = {"question": f"第{i}題？", "A": "甲", "B": "乙", "C": "丙", "D": "丁"}
            handle.write(json.dumps({**record, "answer": "ABCD"[i % 4]}, ensure_ascii=False) + "\n")
    for check, command, stage in (
        ("pretrain stage 2 (LoRA)", ["pretrain", "--stage", "2"], "pretrain-stage2"),
        ("export parity", ["export"], "export"),
        ("sft packed", ["sft"], "sft"),
        ("eval", ["eval"], "eval"),
    ):
        try:
            lowlm(*command, str(run.tuned_path))
            metrics = manifest(run.root / "lora")[stage]["metrics"]
            note = ""
            if stage == "export":
                note = f"max |logit diff| {metrics['max_logit_diff']:.2e}"
            if stage == "eval":
                note = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if v is not None)
            say(check, "ok", metrics, note)
        except Exception as exc:
            say(check, "FAIL", note=str(exc)[:200])
    return True


def check_prefix_cache(run: Run) -> bool:
    """The shared-prefix cache gives the scores of whole prompts on this device."""
    import torch

    try:
        sys.path.insert(0, str(REPO / "src"))
        from lowlm.evaluation.scoring import Request, score_requests
        from lowlm.models.load import load_pretrained, load_tokenizer

        model = load_pretrained(str(run.exported), dtype=torch.float32)
        if torch.cuda.is_available():
            model = model.to("cuda")
        tokenizer = load_tokenizer(run.exported)
        shots = "".join(f"例題{i}？\nA. 甲\nB. 乙\nC. 丙\nD. 丁\n答案： A\n\n" for i in range(5))
        requests = [
            Request(
                f"{shots}問題{i}？\nA. 甲\nB. 乙\nC. 丙\nD. 丁\n答案：",
                [" A", " B", " C", " D"],
                "s",
            )
            for i in range(16)
        ]
        cached = score_requests(model, tokenizer, requests, 8, 2048)
        plain = score_requests(model, tokenizer, requests, 8, 2048, prefix_cache=False)
        pairs = zip(cached, plain, strict=True)
        worst = max(abs(a - b) for x, y in pairs for a, b in zip(x, y, strict=True))
        say("eval prefix cache", "ok" if worst < 1e-3 else "FAIL", note=f"max |diff| {worst:.2e}")
    except Exception as exc:
        say("eval prefix cache", "FAIL", note=str(exc)[:200])
    return True


# Each switch on the same short stage 2 run: (check, overrides, package it needs on CUDA).
SWITCHES = [
    ("stage 2 eager attention", ["--set", "model.attn_implementation=eager"], None),
    ("stage 2 sdpa attention", ["--set", "model.attn_implementation=sdpa"], None),
    (
        "stage 2 flash_attention_2",
        ["--set", "model.attn_implementation=flash_attention_2"],
        "flash_attn",
    ),
    ("stage 2 grad checkpointing", ["--set", "pretrain.gradient_checkpointing=true"], None),
    ("stage 2 compile", ["--set", "pretrain.compile=true"], None),
    ("stage 2 liger kernel", ["--set", "pretrain.liger_kernel=true"], "liger_kernel"),
    ("stage 2 QLoRA 4-bit", ["--set", "pretrain.stage2.quantize_base=4bit"], "bitsandbytes"),
    ("stage 2 isolated docs", ["--set", "pretrain.isolate_documents=true"], None),
]


def check_switches(run: Run) -> bool:
    """Each attention kernel, compile, liger, QLoRA: tokens/s and memory for each."""
    for index, (check, overrides, package) in enumerate(SWITCHES):
        if package is not None and (not run.cuda or not _installed(package)):
            say(check, "skipped", note=f"needs CUDA and {package}")
            continue
        variant = dict(run.tuned, run={"name": f"switch-{index}", "root": str(run.root)})
        path = write(run.work / f"switch-{index}.yaml", variant)
        try:
            lowlm("pretrain", "--stage", "2", str(path), *overrides)
            metrics = manifest(run.root / f"switch-{index}")["pretrain-stage2"]["metrics"]
            say(check, "ok", metrics, f"loss {metrics.get('loss', float('nan')):.3f}")
        except Exception as exc:
            say(check, "FAIL", note=str(exc)[:200])
    return True


def check_packed_isolation(run: Run) -> bool:
    """Packed documents stay apart under each kernel on this device (bf16 tolerance)."""
    import torch

    try:
        from lowlm.models.load import load_pretrained
        from lowlm.training.loop import check_isolation

        kernels = ["sdpa", "eager"] + (["flash_attention_2"] if _installed("flash_attn") else [])
        for kernel in kernels:
            dtype = torch.bfloat16 if run.cuda else torch.float32
            model = load_pretrained(str(run.exported), dtype=dtype)
            model.set_attn_implementation(kernel)
            model = model.to("cuda" if run.cuda else "cpu")
            check_isolation(model, model.config.vocab_size, model.device, precise=not run.cuda)
            say(f"packed isolation {kernel}", "ok")
    except Exception as exc:
        say("packed isolation", "FAIL", note=str(exc)[:200])
    return True


def check_fsdp2(run: Run) -> bool:
    """FSDP2 through accelerate on this one device: train, checkpoint, resume, save."""
    if not (run.cuda and shutil.which("accelerate", path=str(Path(sys.executable).parent))):
        say("FSDP2 (1 process) full", "skipped", note="needs CUDA and accelerate")
        return True
    fsdp_path = write(
        run.work / "fsdp.yaml", dict(run.base, run={"name": "fsdp", "root": str(run.root)})
    )
    launch = [
        str(Path(sys.executable).parent / "accelerate"),
        "launch",
        "--config_file",
        str(REPO / "configs" / "accelerate" / "fsdp.yaml"),
        "--num_processes",
        "1",
        "-m",
        "lowlm.cli",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    try:
        lowlm("tokenize", str(fsdp_path))
        lowlm("init", str(fsdp_path))
        result = subprocess.run(
            [*launch, "pretrain", "--stage", "full", str(fsdp_path)],
            capture_output=True,
            text=True,
            env=env,
        )
        if result.returncode != 0:
            raise RuntimeError(result.stderr.strip().splitlines()[-1])
        metrics = manifest(run.root / "fsdp")["pretrain-full"]["metrics"]
        whole = manifest(run.root / "scratch")["pretrain-full"]["metrics"]
        close = abs(metrics["loss"] - whole["loss"]) < 0.05
        lowlm("export", str(fsdp_path))  # the saved model loads and merges
        say(
            "FSDP2 (1 process) full",
            "ok" if close else "FAIL",
            metrics,
            f"loss {metrics['loss']:.3f} vs DDP-free {whole['loss']:.3f}",
        )
    except Exception as exc:
        say("FSDP2 (1 process) full", "FAIL", note=str(exc)[:200])
    return True


def check_host_syncs(run: Run) -> bool:
    """The loop reads the device at logging steps only (torch's sync debug mode warns at
    every synchronizing call; those made by lowlm's training code are counted)."""
    if not run.cuda:
        say("host syncs per step", "skipped", note="needs CUDA")
        return True
    try:
        say("host syncs per step", *_count_syncs(run.work))
    except Exception as exc:
        say("host syncs per step", "FAIL", note=str(exc)[:200])
    return True


def check_mfu_goal(run: Run) -> bool:
    goal = manifest(run.root / "scratch")["pretrain-full"]["metrics"].get("mfu")
    if goal is not None and run.cuda:
        say("goal: MFU >= 35%", "ok" if goal >= 0.35 else "not met", note=f"{100 * goal:.1f}%")
    return True


# In order; one returning False ends the run (the later checks need what it made).
CHECKS = [
    check_environment,
    check_pretrain_full,
    check_kill_and_resume,
    check_tuning_stages,
    check_prefix_cache,
    check_switches,
    check_packed_isolation,
    check_fsdp2,
    check_host_syncs,
    check_mfu_goal,
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few steps")
    parser.add_argument("--work", default=None)
    parser.add_argument("--out", default=os.environ.get("OUT"))
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu-check-"))
    run = configure(args.smoke, work)
    for check in CHECKS:
        if not check(run):
            print("\n".join(LINES))
            return
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_check.txt").write_text("\n".join(LINES) + "\n")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
