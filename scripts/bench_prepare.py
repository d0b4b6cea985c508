"""Benchmark `lowlm prepare` against the same datatrove pipeline written by hand, in the same
invocation: MB/s per process (input JSONL bytes / wall seconds / worker processes), MB per
CPU-second of all its processes (its cost, which other programs competing for the CPUs do not
change) and peak resident memory, at two corpus sizes.

The corpus is real pt-BR text (`~/.cache/lowlm-assets/corpus/pt-BR`, else the bundled zh-TW
demo text) made noisy: documents of 3-8 random paragraphs, plus English documents, exact
copies, near copies and spam, in 4 JSONL files. Both pipelines do the same work with the same
thresholds (FineWeb-2's por_Latn / cmn_Hani), the same word tokenizer and the same local
lid.176.ftz: read -> language ID -> Gopher repetition -> FineWeb quality -> Gopher quality ->
JSONL; exact dedup; MinHash (5-grams, 14 x 8); exact + MinHash filters -> FTFY -> PII ->
parquet; the documents each keeps are printed, to show they did the same work. The
hand-written one is FineWeb-2's script shape with datatrove's own LanguageFilter given the
local model through lowlm's 10-line FastTextLID subclass (offline, its download cannot run).
Each run is a fresh process (its own peak memory, read with getrusage); lowlm and hand runs
alternate so load on a busy machine falls on both.

    .venv/bin/python scripts/bench_prepare.py --mb 2                # a check, 20 s
    .venv/bin/python scripts/bench_prepare.py --mb 64 256           # the goal sizes, ~20 CPU-min
    .venv/bin/python scripts/bench_prepare.py --mb 64 256 --workers 4
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path.home() / ".cache" / "lowlm-assets"


def source_lines() -> tuple[list[str], str]:
    folder = ASSETS / "corpus" / "pt-BR"
    if folder.is_dir():
        lines = [x for f in sorted(folder.glob("*.txt")) for x in f.read_text("utf-8").splitlines()]
        return [x for x in lines if len(x) > 40], "por_Latn"
    lines = (REPO / "data" / "demo" / "zh-tw.txt").read_text("utf-8").splitlines()
    return [x for x in lines if x.strip()], "cmn_Hant"


def build_corpus(folder: Path, megabytes: int) -> str:
    """4 JSONL files of at least `megabytes` MB in all; returns the language. The assets' lines
    are drawn with replacement, so any size is reached (5.5 MB of pt-BR lines recur in new
    combinations). Written into a temporary folder renamed when complete, so an interrupted
    build is never reused as a smaller corpus."""
    lines, language = source_lines()
    english = (REPO / "data" / "demo" / "en.txt").read_text("utf-8").splitlines()
    rng = random.Random(megabytes)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    handles = [open(partial / f"part-{i}.jsonl", "w", encoding="utf-8") for i in range(4)]
    written, recent, index = 0, [], 0
    while written < megabytes * 1e6:
        kind = rng.random()
        if kind < 0.08:
            text = "\n".join(rng.sample(english, 4))
        elif kind < 0.13 and recent:
            text = rng.choice(recent)  # exact copy
        elif kind < 0.18 and recent:
            words = rng.choice(recent).split(" ")
            words[rng.randrange(len(words))] = "também"
            text = " ".join(words)  # near copy
        elif kind < 0.22:
            text = "\n".join(f"Compre agora! Oferta {rng.randint(1, 99)}" for _ in range(12))
        else:
            text = "\n".join(rng.sample(lines, rng.randint(3, 8)))
            recent = (recent + [text])[-200:]
        line = json.dumps({"id": f"d{index}", "text": text}, ensure_ascii=False) + "\n"
        handles[index % 4].write(line)
        written += len(line.encode("utf-8"))
        index += 1
    for handle in handles:
        handle.close()
    partial.rename(folder)
    return language


def run_lowlm(corpus: Path, work: Path, language: str, workers: int) -> None:
    import yaml

    from lowlm.config import load_config
    from lowlm.stages import prepare

    config = {
        "run": {"name": "bench", "root": str(work)},
        "prepare": {
            "inputs": [str(corpus / "*.jsonl")],
            "language": language,
            "removed_samples": 0,
            "executor": {"workers": workers},
        },
    }
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    prepare.run(load_config(path))


def hand_filters(language: str) -> tuple[list, object]:
    """datatrove's LID and FineWeb-2's three filters as FineWeb-2's script passes them; returns
    (steps, word tokenizer)."""
    import yaml
    from datatrove.pipeline.filters import (
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
        LanguageFilter,
    )

    from lowlm.data.prepare.languages import check_language, word_tokenizer
    from lowlm.data.prepare.lid import LocalFastTextLID, bundled_ft176

    name = "cmn_Hani" if language == "cmn_Hant" else language
    cfg = yaml.safe_load((REPO / f"src/lowlm/data/prepare/fineweb2/{name}.yml").read_text())
    tokenizer, _ = word_tokenizer(check_language(language))  # spaCy is not installed here
    label = "pt" if language == "por_Latn" else "zh"
    lid = LanguageFilter([label], cfg["language_score"])
    lid.model = LocalFastTextLID(str(bundled_ft176()), [label])  # offline: no download
    steps = [
        lid,
        GopherRepetitionFilter(
            dup_para_frac=0,
            dup_line_char_frac=0,
            dup_para_char_frac=0,
            dup_line_frac=cfg["dup_line_frac"],
            top_n_grams=cfg["top_n_grams"],
            dup_n_grams=cfg["dup_n_grams"],
            language=tokenizer,
        ),
        FineWebQualityFilter(
            short_line_thr=999,
            char_duplicates_ratio=0.1,
            line_punct_thr=cfg["line_punct_thr"],
            new_line_ratio=cfg["new_line_ratio"],
            language=tokenizer,
        ),
        GopherQualityFilter(
            max_avg_word_length=cfg["max_avg_word_length"],
            min_avg_word_length=cfg["min_avg_word_length"],
            stop_words=cfg["stopwords"],
            max_non_alpha_words_ratio=cfg["max_non_alpha_words_ratio"],
            min_stop_words=2,
            language=tokenizer,
        ),
    ]
    return steps, tokenizer


def run_by_hand(corpus: Path, work: Path, language: str, workers: int) -> None:
    """FineWeb-2's pipeline shape, with datatrove's classes only."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import (
        ExactDedupFilter,
        ExactDedupSignature,
        ExactFindDedups,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.dedup.minhash import MinhashDedupBuckets
    from datatrove.pipeline.formatters import FTFYFormatter, PIIFormatter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter, ParquetWriter

    from lowlm.data.prepare.pipeline import EXACT, MINHASH

    filters, tokenizer = hand_filters(language)
    tasks = len(list(corpus.glob("*.jsonl")))

    def run(name: str, steps: list, count: int) -> None:
        LocalPipelineExecutor(
            steps, tasks=count, workers=min(workers, count), logging_dir=str(work / name)
        ).run()

    filtered = str(work / "filtered")
    run("filter", [JsonlReader(str(corpus)), *filters, JsonlWriter(filtered)], tasks)
    shards = len(list(Path(filtered).glob("*.jsonl.gz")))
    sigs, dups = str(work / "exact-sigs"), str(work / "exact-dups")
    run("exact-sig", [JsonlReader(filtered), ExactDedupSignature(sigs, EXACT)], shards)
    run("exact-find", [ExactFindDedups(sigs, dups, EXACT)], 1)
    mh = {k: str(work / k) for k in ("sigs", "buckets", "remove")}
    reader = [JsonlReader(filtered), ExactDedupFilter(dups, EXACT)]
    signature = MinhashDedupSignature(mh["sigs"], MINHASH, language=tokenizer)
    run("mh-sig", [*reader, signature], shards)
    run("mh-buckets", [MinhashDedupBuckets(mh["sigs"], mh["buckets"], config=MINHASH)], 14)
    cluster = MinhashDedupCluster(mh["buckets"], mh["remove"], MINHASH, save_cluster_size=True)
    run("mh-cluster", [cluster], 1)
    final = [
        JsonlReader(filtered),
        ExactDedupFilter(dups, EXACT),
        MinhashDedupFilter(mh["remove"], load_cluster_sizes=True),
        FTFYFormatter(),
        PIIFormatter(),
        ParquetWriter(str(work / "output")),
    ]
    run("write", final, shards)


def child(args) -> None:
    work = Path(args.work)
    started = time.perf_counter()
    runner = run_lowlm if args.child == "lowlm" else run_by_hand
    runner(Path(args.corpus), work, args.language, args.workers)
    seconds = time.perf_counter() - started
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = sum(u.ru_utime + u.ru_stime for u in (own, children))
    peak = max(own.ru_maxrss, children.ru_maxrss) / 1024
    import pyarrow.parquet as pq

    kept = sum(pq.read_metadata(p).num_rows for p in work.rglob("*.parquet"))
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "peak_mb": peak, "kept": kept}))


def measure(kind: str, corpus: Path, language: str, workers: int, scratch: Path) -> dict:
    work = scratch / f"work-{kind}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    command = [sys.executable, __file__, "--child", kind, "--corpus", str(corpus)]
    command += ["--work", str(work), "--language", language, "--workers", str(workers)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        sys.exit(f"{kind} run failed:\n{done.stderr[-3000:]}")
    shutil.rmtree(work, ignore_errors=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--scratch", default="/tmp/lowlm-bench-prepare")
    parser.add_argument("--child", choices=["lowlm", "hand"])
    for name in ("--corpus", "--work", "--language"):  # the child process's arguments
        parser.add_argument(name)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    scratch = Path(args.scratch)
    header = f"{'MB':>6} {'pipeline':<9} {'seconds':>8} {'MB/s/proc':>10} {'MB/CPU-s':>9}"
    print(f"{header} {'peak MB':>8} {'kept':>8}")
    for megabytes in args.mb:
        corpus = scratch / f"corpus-{megabytes}"
        if not corpus.is_dir():
            language = build_corpus(corpus, megabytes)
        else:
            language = source_lines()[1]
        files = sorted(corpus.glob("*.jsonl"))
        size = sum(f.stat().st_size for f in files) / 1e6
        documents = sum(sum(1 for _ in f.open("rb")) for f in files)
        print(f"corpus {corpus}: {size:.1f} MB (10^6 bytes), {documents} documents", flush=True)
        if size < megabytes:
            sys.exit(f"error: {corpus} holds {size:.1f} MB, less than {megabytes}; delete it")
        rates = {}
        for _ in range(args.repeats):
            for kind in ("lowlm", "hand"):
                result = measure(kind, corpus, language, args.workers, scratch)
                rate = size / result["seconds"] / args.workers
                per_cpu = size / result["cpu_seconds"]
                rates.setdefault(kind, []).append((rate, per_cpu))
                print(
                    f"{size:6.1f} {kind:<9} {result['seconds']:8.1f} {rate:10.3f} {per_cpu:9.3f} "
                    f"{result['peak_mb']:8.0f} {result['kept']:8d}",
                    flush=True,
                )
        best = {kind: [max(v) for v in zip(*values, strict=True)] for kind, values in rates.items()}
        wall, cpu = (best["lowlm"][i] / best["hand"][i] for i in (0, 1))
        print(
            f"{size:6.1f} lowlm / hand-written: {wall:.3f}x MB/s, {cpu:.3f}x MB per CPU-second",
            flush=True,
        )


if __name__ == "__main__":
    main()
