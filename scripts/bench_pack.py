"""Benchmark the packed-token cache (`lowlm.data.blocks.build_cache`): MB/s per process and peak
memory for a SentencePiece tokenizer (Mistral's) and a byte-level one (SmolLM2's), with 1 and 2
processes, against the old path (blocks.py as it was before the sentencepiece encoder: every
batch through the HF fast tokenizer, packed through Python lists), in the same invocation.
With --ranks 1,2 the new path also runs under `accelerate launch` with two gloo processes on
this CPU (every rank encodes a share, the main rank merges; the old path has no such mode).

Every build runs in a fresh process, so its peak resident memory (getrusage) is its own; new
and old builds alternate so that load on the machine falls on both. Besides MB/s (wall clock)
it prints MB per CPU-second of all the build's processes: its cost, which other programs
competing for the CPUs do not change. The corpus is real text
(`~/.cache/lowlm-assets/corpus/<lang>`, else the bundled demo text), documents of 1-3 lines
drawn at random, up to the chosen size.

    .venv/bin/python scripts/bench_pack.py --mb 64                  # quick
    .venv/bin/python scripts/bench_pack.py --mb 64 256 --skip-old   # peak memory at two sizes
    .venv/bin/python scripts/bench_pack.py                           # 1 GB
    .venv/bin/python scripts/bench_pack.py --mb 16 --procs 1 --ranks 1,2 --skip-old
    .venv/bin/python scripts/bench_pack.py --mb 16 --procs 1 --ranks 1,2 --skip-old --shards 8

With --shards N the builds read the corpus cut into N files (ranks then share it by files,
each reading its own: "MB read per rank" sums to the corpus once instead of once per rank).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path.home() / ".cache" / "lowlm-assets"
MISTRAL = ASSETS / "tokenizers" / "mistral-v1" / "tokenizer.model"
SMOLLM2_HF = Path.home() / ".cache" / "lowlm" / "smollm2-135m-hf"
SMOLLM2_GGUF = ASSETS / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
BLOCKS = "src/lowlm/data/blocks.py"


def corpus_lines(lang: str) -> list[str]:
    files = sorted(glob.glob(str(ASSETS / "corpus" / lang / "*.txt")))
    files = files or sorted(glob.glob(str(REPO / "data" / "demo" / "*.txt")))
    lines = []
    for name in files:
        text = Path(name).read_text(encoding="utf-8", errors="replace")
        lines.extend(line.strip() for line in text.split("\n") if line.strip())
    if not lines:  # no text at all: generated words
        rng = random.Random(0)
        letters = "abcdefghijklmnopqrstuvwxyzáéíóúãõç"
        words = ["".join(rng.choices(letters, k=rng.randint(1, 10))) for _ in range(5000)]
        lines = [" ".join(rng.choices(words, k=rng.randint(5, 40))) for _ in range(20000)]
    return lines


def cut_corpus(corpus: Path, shards: int) -> Path:
    """The corpus cut at line ends into `shards` files of about equal size, in a folder."""
    folder = corpus.with_name(f"{corpus.stem}-{shards}-shards")
    if folder.is_dir():
        return folder
    folder.mkdir()
    size = corpus.stat().st_size
    outs = [open(folder / f"{number:05d}.txt", "wb") for number in range(shards)]
    written = 0
    with open(corpus, "rb") as source:
        for line in source:
            outs[min(shards - 1, written * shards // size)].write(line)
            written += len(line)
    for out in outs:
        out.close()
    return folder


def make_corpus(path: Path, megabytes: float, lines: list[str], seed: int = 0) -> None:
    """Documents of 1-3 random lines (so that few repeat: a tokenizer's word cache does not
    see the same document again), written until the file holds `megabytes`."""
    rng = random.Random(seed)
    target = int(megabytes * 1e6)
    written = 0
    with open(path, "w", encoding="utf-8") as out:
        while written < target:
            chunk = []
            for _ in range(10000):
                doc = " ".join(rng.choice(lines) for _ in range(rng.randint(1, 3))) + "\n"
                chunk.append(doc)
            text = "".join(chunk)
            out.write(text)
            written += len(text.encode("utf-8"))


def sentencepiece_folder(work: Path) -> Path | None:
    """An HF tokenizer folder made from Mistral's tokenizer.model, as lowlm makes one."""
    if not MISTRAL.exists():
        return None
    from transformers import LlamaTokenizer

    folder = work / "tokenizer-mistral"
    if not (folder / "tokenizer.json").exists():
        LlamaTokenizer.from_pretrained(str(MISTRAL), add_bos_token=True).save_pretrained(folder)
        shutil.copyfile(MISTRAL, folder / "tokenizer.model")
    return folder


def byte_level_folder() -> Path | None:
    if (SMOLLM2_HF / "tokenizer.json").exists():
        return SMOLLM2_HF
    if SMOLLM2_GGUF.exists():
        from lowlm.config import ModelConfig
        from lowlm.tokenization.base import resolve_base_tokenizer

        return resolve_base_tokenizer(ModelConfig(tokenizer=str(SMOLLM2_GGUF))).folder
    return None


def old_blocks(work: Path, ref: str | None) -> Path | None:
    """blocks.py before the sentencepiece encoder, from git: the parent of the commit that
    brought it, or HEAD while that commit does not exist yet; or `ref`."""
    try:
        if ref is None:
            found = subprocess.run(
                ["git", "log", "--format=%H", "-S", "class EncoderPlan", "--", BLOCKS],
                cwd=REPO,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()
            ref = f"{found[-1]}^" if found else "HEAD"
        source = subprocess.run(
            ["git", "show", f"{ref}:{BLOCKS}"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError, IndexError):
        return None
    if "class EncoderPlan" in source:
        return None  # not the old path
    path = work / "blocks_old.py"
    path.write_text(source, encoding="utf-8")
    return path


def child(spec: dict) -> None:
    """One build in this fresh process (or in each rank of a launch, whose main rank prints
    the figures of all); prints its figures as a JSON line."""
    import resource

    from lowlm.config import DataConfig
    from lowlm.data.corpus import resolve_sources

    if spec["old"]:  # importable by name: the worker pool pickles its functions by name
        import importlib

        sys.path.insert(0, str(Path(spec["old"]).parent))
        blocks = importlib.import_module(Path(spec["old"]).stem)
    else:
        from lowlm.data import blocks
    from transformers import AutoTokenizer  # imported before the clock starts, as for both

    del AutoTokenizer
    dist = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist
        from accelerate import PartialState

        PartialState(cpu=True)  # the gloo process group, as `lowlm pretrain` has it
    folder = Path(spec["folder"])
    if dist is None or dist.get_rank() == 0:
        shutil.rmtree(folder, ignore_errors=True)
    if dist is not None:
        dist.barrier()

    def cpu_seconds() -> float:
        own = resource.getrusage(resource.RUSAGE_SELF)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime

    cpu = cpu_seconds()
    started = time.perf_counter()
    blocks.build_cache(
        folder,
        Path(spec["tokenizer"]),
        resolve_sources([spec["corpus"]]),
        DataConfig(),
        spec["block_size"],
        1,
        spec["num_proc"],
    )
    seconds = time.perf_counter() - started
    cpu = cpu_seconds() - cpu
    own = {
        "cpu": cpu,
        "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "child": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }
    ranks = [own]
    if dist is not None:  # every rank's CPU time and memory
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, own)
        rank = dist.get_rank()
        dist.destroy_process_group()  # else gloo may abort a rank as it exits (torch 2.13)
        if rank != 0:
            return
    meta = json.loads((folder / "meta.json").read_text())
    build = meta.get("build", {})
    result = {
        "seconds": seconds,
        "cpu_seconds": sum(r["cpu"] for r in ranks),
        "peak_rss_mb": max(r["peak"] for r in ranks),
        "peak_child_mb": max(r["child"] for r in ranks),
        "ranks": build.get("ranks", 1),
        "per_rank_mb": [r["mb"] for r in build.get("per_rank", [])],
        "per_rank_mb_read": [r["mb_read"] for r in build.get("per_rank", [])],
        "encoder": build.get("encoder", "hf (old)"),
        "reason": build.get("encoder_reason", ""),
        "by_hf": build.get("documents_encoded_by_hf"),
        "blocks": meta["train_blocks"] + meta["eval_blocks"],
    }
    if not spec["keep"]:
        shutil.rmtree(folder, ignore_errors=True)
    print("RESULT " + json.dumps(result))


def encoder_rates(spec: dict) -> None:
    """Single-thread encode rates on the corpus's first MB, batches of 256 documents: the HF
    tokenizer's own batch call (the old path's), its backend's batch call, sentencepiece alone
    (when the folder has tokenizer.model), and the encoder build_cache chose (without reading,
    held-out split and packing)."""
    from transformers import AutoTokenizer

    from lowlm.data import blocks

    lines = []
    size = 0
    with open(spec["corpus"], encoding="utf-8") as handle:
        for line in handle:
            lines.append(line.rstrip("\n"))
            size += len(line.encode("utf-8"))
            if size >= spec["mb"] * 1e6:
                break
    batches = [lines[i : i + 256] for i in range(0, len(lines), 256)]
    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])
    rates = {}

    def rate(name, encode):
        started = time.perf_counter()
        for batch in batches:
            encode(batch)
        rates[name] = size / 1e6 / (time.perf_counter() - started)

    rate("hf tokenizer(batch)", lambda b: tokenizer(b, add_special_tokens=True)["input_ids"])
    backend = tokenizer.backend_tokenizer
    rate("hf backend encode_batch_fast", lambda b: [e.ids for e in backend.encode_batch_fast(b)])
    model = Path(spec["tokenizer"]) / "tokenizer.model"
    if model.exists():
        import sentencepiece as spm

        processor = spm.SentencePieceProcessor(model_file=str(model))
        rate("sentencepiece", lambda b: processor.encode(b, num_threads=1))
    plan = blocks.choose_encoder(tokenizer, Path(spec["tokenizer"]), lines[:2000])
    encoder = blocks.Encoder(tokenizer, plan)
    rate(f"build_cache's encoder ({blocks.encoder_name(plan)})", encoder.encode)
    print("RESULT " + json.dumps(rates))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_child(spec: dict, env: dict | None = None, ranks: int = 1) -> dict:
    command = [sys.executable, __file__, "--child", json.dumps(spec)]
    if ranks > 1:  # `--multi_gpu` without a GPU: gloo ranks on the CPU
        launcher = Path(sys.executable).parent / "accelerate"
        command = [str(launcher), "launch", "--multi_gpu", "--num_processes", str(ranks)]
        command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        command += ["--main_process_port", str(free_port()), __file__, "--child", json.dumps(spec)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        sys.exit(f"a benchmark child failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, nargs="+", default=[1024], help="corpus sizes (MB)")
    parser.add_argument("--procs", default="1,2", help="num_proc values, comma-separated")
    parser.add_argument("--ranks", default="1", help="processes launched, comma-separated")
    parser.add_argument("--tokenizers", default="sentencepiece,byte-level")
    parser.add_argument("--lang", default="pt-BR", help="assets corpus language")
    parser.add_argument("--shards", type=int, default=1, help="corpus files the builds read")
    parser.add_argument("--block-size", type=int, default=2048)
    parser.add_argument("--skip-old", action="store_true", help="only the new path")
    parser.add_argument("--old-ref", default=None, help="git ref of the old blocks.py")
    parser.add_argument("--rate-mb", type=float, default=8, help="MB for raw encoder rates")
    parser.add_argument("--work", default=None, help="folder for corpora and caches")
    parser.add_argument("--keep", action="store_true", help="keep corpora and caches")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        encoder_rates(spec) if spec.get("rates") else child(spec)
        return

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-pack-"))
    work.mkdir(parents=True, exist_ok=True)
    tokenizers = {}
    for name in args.tokenizers.split(","):
        folder = sentencepiece_folder(work) if name == "sentencepiece" else byte_level_folder()
        if folder is None:
            print(f"skipping {name}: its tokenizer asset is missing")
        else:
            tokenizers[name] = folder
    old = None if args.skip_old else old_blocks(work, args.old_ref)
    if not args.skip_old and old is None:
        print("no old blocks.py in git (--old-ref); measuring the new path only")
    lines = corpus_lines(args.lang)
    procs = [int(p) for p in args.procs.split(",")]
    launches = [
        (ranks, num_proc) for ranks in map(int, args.ranks.split(",")) for num_proc in procs
    ]
    print(
        f"machine: {os.cpu_count()} CPUs; corpus: {args.lang} lines, block size "
        f"{args.block_size}; work folder {work}"
    )

    rows = []
    for megabytes in args.mb:
        corpus = work / f"corpus-{megabytes:g}mb.txt"
        if not corpus.exists():
            make_corpus(corpus, megabytes, lines)
        mb = corpus.stat().st_size / 1e6
        for name, folder in tokenizers.items():
            if megabytes == args.mb[0]:
                spec = {"rates": True, "corpus": str(corpus), "tokenizer": str(folder)}
                spec["mb"] = min(args.rate_mb, mb)
                env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
                rates = run_child(spec, env)
                print(f"\n{name}: single-thread encode rates on {spec['mb']:g} MB")
                for label, value in rates.items():
                    print(f"  {label:<58} {value:6.2f} MB/s")
            for ranks, num_proc in launches:
                results = {}
                processes = ranks * num_proc
                for path in ("new", "old") if old and ranks == 1 else ("new",):
                    spec = {
                        "old": str(old) if path == "old" else None,
                        "folder": str(work / f"cache-{name}-{ranks}x{num_proc}-{path}"),
                        "tokenizer": str(folder),
                        "corpus": str(
                            cut_corpus(corpus, args.shards) if args.shards > 1 else corpus
                        ),
                        "block_size": args.block_size,
                        "num_proc": num_proc,
                        "keep": args.keep,
                    }
                    results[path] = result = run_child(spec, ranks=ranks)
                    result["mb_per_s"] = mb / result["seconds"]
                    result["mb_per_cpu_s"] = mb / result["cpu_seconds"]
                    shares = result["per_rank_mb"]
                    print(
                        f"{name} {mb:.0f} MB ranks {ranks} num_proc {num_proc} {path}: "
                        f"{result['mb_per_s']:.2f} MB/s ({result['mb_per_s'] / processes:.2f} "
                        f"per process), {result['mb_per_cpu_s']:.2f} MB per CPU-second, peak "
                        f"RSS {result['peak_rss_mb']:.0f} MB, largest worker "
                        f"{result['peak_child_mb']:.0f} MB, encoder {result['encoder']}"
                        + (f", MB per rank {shares}" if shares else "")
                        + (f", MB read per rank {result['per_rank_mb_read']}" if shares else "")
                    )
                rows.append((name, mb, ranks, num_proc, results))

    print(
        f"\n== build_cache, block size {args.block_size}: MB/s = corpus MB / build seconds; "
        "MB/CPU-s = corpus MB / CPU seconds of all its processes (every rank's) =="
    )
    header = f"{'tokenizer':<14}{'MB':>6}{'ranks':>6}{'procs':>6}{'encoder':>15}"
    for label in ("new", "old") if old else ("new",):
        header += f"{label + ' MB/s':>13}{'/proc':>7}{'MB/CPU-s':>9}{'peak MB':>8}{'worker':>7}"
    print(header + ("  new/old MB/s, MB/CPU-s" if old else ""))
    for name, mb, ranks, num_proc, results in rows:
        line = f"{name:<14}{mb:6.0f}{ranks:6d}{num_proc:6d}{results['new']['encoder']:>15}"
        for result in results.values():
            line += (
                f"{result['mb_per_s']:13.2f}{result['mb_per_s'] / (ranks * num_proc):7.2f}"
                f"{result['mb_per_cpu_s']:9.2f}{result['peak_rss_mb']:8.0f}"
                f"{result['peak_child_mb']:7.0f}"
            )
        if "old" in results:
            new, before = results["new"], results["old"]
            line += (
                f"  {new['mb_per_s'] / before['mb_per_s']:.2f}, "
                f"{new['mb_per_cpu_s'] / before['mb_per_cpu_s']:.2f}"
            )
        print(line)
    for name, _, _, _, results in rows[:: len(launches)]:
        print(f"{name} encoder choice: {results['new']['reason']}")
    if not args.keep and not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
