"""The packed-token cache's encoders: sentencepiece stands in for the HF tokenizer only where its
ids are the same, and the cache is byte for byte the one the HF tokenizer gives."""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

import lowlm.data.blocks as blocks
from lowlm.config import DataConfig
from lowlm.data.blocks import CacheOptions, EncoderPlan, build_cache, choice, shards
from lowlm.data.corpus import resolve_sources
from lowlm.errors import LowlmError

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo"

# Lines that take the rarer paths: runs of spaces, a leading "▁", special tokens' text,
# tabs, characters outside the English model (byte fallback), digits.
EDGE_LINES = [
    "two  spaces and   three, then    four",
    "\u2581a leading metaspace",
    "a BOS <s> and an EOS </s> in the text, and <unk>",
    "tabs\tand\ttrailing spaces   ",
    "Ünïcödé ﬁ ligature, Ａ fullwidth, e\u0301 combining, emoji 😀",
    "numbers 1234567 and 3.14159",
    "a",
    "the zebra and the zebras",
    "we take the next one",
]


def sp_folder(root: Path, name: str, proto, **hf_options) -> Path:
    """An HF tokenizer folder made from a SentencePiece proto, as lowlm makes one."""
    from transformers import LlamaTokenizer

    folder = root / name
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(proto.SerializeToString())
    tokenizer = LlamaTokenizer.from_pretrained(str(folder / "tokenizer.model"), add_bos_token=True)
    for key, value in hf_options.items():
        getattr(tokenizer, key)(value)
    tokenizer.save_pretrained(folder)
    return folder


def load_proto(path: Path):
    from lowlm.tokenization.sentencepiece_merge import load_proto as load

    return load(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    rng = random.Random(0)
    lines = (DEMO / "en.txt").read_text(encoding="utf-8").splitlines()
    lines += (DEMO / "zh-tw.txt").read_text(encoding="utf-8").splitlines()[:300]
    lines += EDGE_LINES * 3
    rng.shuffle(lines)
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory, sp_base) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    proto = load_proto(sp_base)
    made = {"plain": sp_folder(root, "plain", proto)}
    # Scores unrelated to ids: transformers 5 orders merges by id, so sentencepiece as saved
    # disagrees with HF on most text (as on Mistral's runs of spaces, scored -1e9).
    shuffled = type(proto)()
    shuffled.CopyFrom(proto)
    rng = random.Random(1)
    scores = [p.score for p in shuffled.pieces if p.type == 1]
    rng.shuffle(scores)
    for piece, score in zip((p for p in shuffled.pieces if p.type == 1), scores, strict=True):
        piece.score = score
    made["shuffled"] = sp_folder(root, "shuffled", shuffled)
    made["added"] = sp_folder(root, "added", proto, add_tokens=["zebra"])
    # A piece across a word's start ("e▁t"): ids cannot be cached per word.
    crossing = type(shuffled)()
    crossing.CopyFrom(shuffled)
    piece = crossing.pieces.add()
    piece.piece, piece.score, piece.type = "e\u2581t", -1000.0, 1
    made["crossing"] = sp_folder(root, "crossing", crossing)
    collapsing = type(proto)()
    collapsing.CopyFrom(proto)
    collapsing.normalizer_spec.remove_extra_whitespaces = True
    made["collapsing"] = sp_folder(root, "collapsing", collapsing)
    made["entangled"] = entangled_folder(root, made["plain"])
    return made


def entangled_folder(root: Path, plain: Path) -> Path:
    """HF merges where two pieces' merges interleave (A, B, A), as when an older converter
    ranked merges by score and pieces tied: neither piece has one place in HF's order."""
    folder = root / "entangled"
    shutil.copytree(plain, folder)
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    merges = data["model"]["merges"]
    products = ["".join(merge) for merge in merges]
    i = next(i for i in range(len(merges) - 2) if products[i] == products[i + 1] != products[i + 2])
    merges.insert(i + 2, merges.pop(i + 1))
    (folder / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return folder


def build(folder: Path, tokenizer: Path, corpus: Path, num_proc: int = 1, options=None) -> dict:
    sources = resolve_sources([str(corpus)])
    build_cache(folder, tokenizer, sources, DataConfig(), 16, 7, num_proc, options)
    return json.loads((folder / "meta.json").read_text())


def reference(folder: Path, tokenizer: Path, corpus: Path, monkeypatch, options=None) -> dict:
    """The cache as the HF tokenizer's own batch call builds it (no sentencepiece)."""
    with monkeypatch.context() as patch:
        plan = EncoderPlan(kind="hf", reason="reference", hf_fast=False)
        patch.setattr(choice, "choose_encoder", lambda *args: plan)
        return build(folder, tokenizer, corpus, options=options)


def assert_same_cache(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.glob("*.bin"))
    assert names and names == sorted(p.name for p in b.glob("*.bin"))
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    meta_a, meta_b = (json.loads((f / "meta.json").read_text()) for f in (a, b))
    assert {k: v for k, v in meta_a.items() if k != "build"} == {
        k: v for k, v in meta_b.items() if k != "build"
    }


def hf_ids(tokenizer: Path, text: str) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer)(text)["input_ids"]


def sp_ids(tokenizer: Path, text: str) -> list[int]:
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_file=str(tokenizer / "tokenizer.model"))
    return processor.encode(text, add_bos=True)


@pytest.mark.parametrize("name", ["plain", "shuffled", "added", "crossing", "entangled"])
def test_sentencepiece_cache_is_byte_identical_to_the_hf_one(
    name, tokenizers, corpus, tmp_path, monkeypatch
):
    tokenizer = tokenizers[name]
    meta = build(tmp_path / "sp", tokenizer, corpus)
    reference(tmp_path / "hf", tokenizer, corpus, monkeypatch)
    assert meta["build"]["encoder"] == "sentencepiece", meta["build"]["encoder_reason"]
    by_word = "ids cached per word" in meta["build"]["encoder_reason"]
    assert by_word == (name != "crossing")
    assert meta["build"]["batches_verified"] >= 1
    # the three copies of the line holding "<s>", "</s>", "<unk>" and of the line starting
    # with "\u2581" went to HF (and of the "zebra" line, an added token, for "added")
    assert meta["build"]["documents_encoded_by_hf"] >= 6
    assert meta["build"]["mb_per_s"] > 0 and meta["build"]["peak_rss_mb"] > 0
    assert_same_cache(tmp_path / "sp", tmp_path / "hf")


def test_the_cases_really_differ_without_the_stand_in_s_care(tokenizers):
    """What the byte-identical caches above are worth: sentencepiece as saved would be wrong."""
    text = "two  spaces and the quick brown fox jumps over the lazy dog"
    assert sp_ids(tokenizers["shuffled"], text) != hf_ids(tokenizers["shuffled"], text)
    assert sp_ids(tokenizers["plain"], "<s>") != hf_ids(tokenizers["plain"], "<s>")
    assert sp_ids(tokenizers["added"], "zebra") != hf_ids(tokenizers["added"], "zebra")
    assert sp_ids(tokenizers["collapsing"], "a  b") != hf_ids(tokenizers["collapsing"], "a  b")
    text = "we take"  # "▁w", "e▁t", "a", "ke": the piece is used
    assert hf_ids(tokenizers["crossing"], text) != hf_ids(tokenizers["shuffled"], text)


@pytest.mark.slow
def test_two_workers_build_the_same_sentencepiece_cache(tokenizers, corpus, tmp_path):
    one = build(tmp_path / "one", tokenizers["shuffled"], corpus, num_proc=1)
    two = build(tmp_path / "two", tokenizers["shuffled"], corpus, num_proc=2)
    assert two["build"]["encoder"] == "sentencepiece"
    assert two["build"]["peak_rss_mb_largest_child"] > 0
    assert one["build"]["documents_encoded_by_hf"] == two["build"]["documents_encoded_by_hf"]
    assert_same_cache(tmp_path / "one", tmp_path / "two")


def test_a_normaliser_sentencepiece_has_and_hf_lacks_falls_back_to_hf(
    tokenizers, corpus, tmp_path, monkeypatch
):
    meta = build(tmp_path / "auto", tokenizers["collapsing"], corpus)
    assert meta["build"]["encoder"] == "hf-fast"
    assert "removes extra whitespace" in meta["build"]["encoder_reason"]
    reference(tmp_path / "hf", tokenizers["collapsing"], corpus, monkeypatch)
    assert_same_cache(tmp_path / "auto", tmp_path / "hf")


real_stand_in = choice.sentencepiece_stand_in


def unpatched(tokenizer, folder, *options):
    """The stand-in without its rewritten scores: what a missed difference would look like."""
    plan, _ = real_stand_in(tokenizer, folder, *options)
    return replace(plan, model=(folder / "tokenizer.model").read_bytes()), ""


def test_a_difference_in_the_sample_falls_back_to_hf_and_says_so(
    tokenizers, corpus, tmp_path, monkeypatch
):
    monkeypatch.setattr(choice, "sentencepiece_stand_in", unpatched)
    meta = build(tmp_path / "auto", tokenizers["shuffled"], corpus)
    assert meta["build"]["encoder"] == "hf-fast"
    assert "sentencepiece gave other ids for sample document" in meta["build"]["encoder_reason"]
    reference(tmp_path / "hf", tokenizers["shuffled"], corpus, monkeypatch)
    assert_same_cache(tmp_path / "auto", tmp_path / "hf")


@pytest.mark.slow
@pytest.mark.parametrize("num_proc", [1, 2])
def test_a_difference_in_a_verified_batch_stops_the_build_and_drops_its_shards(
    num_proc, tokenizers, tmp_path, monkeypatch
):
    tokenizer = tokenizers["shuffled"]
    corpus = tmp_path / "corpus.txt"
    # Three batches of one-letter documents (one merge each: no order to get wrong), then text.
    text = (DEMO / "en.txt").read_text(encoding="utf-8").splitlines()[:40]
    corpus.write_text("a\nI\n" * 12 + "\n".join(text), encoding="utf-8")
    options = CacheOptions(sample_docs=0, docs_per_batch=8, verify_every=3, shard_blocks=1)
    monkeypatch.setattr(choice, "sentencepiece_stand_in", unpatched)
    saved = []
    real_save = shards.save_progress
    monkeypatch.setattr(shards, "save_progress", lambda *a: saved.append(real_save(*a) or 1))
    cache = tmp_path / "cache"
    with pytest.raises(LowlmError, match="different ids for document .* of batch 3"):
        build(cache, tokenizer, corpus, num_proc, options)
    assert saved, "shards were written before the verified batch"
    assert not list(cache.glob("*.bin")) and not (cache / "progress.json").exists()
    assert (cache / blocks.MISMATCH_FILE).exists()

    monkeypatch.setattr(choice, "sentencepiece_stand_in", real_stand_in)
    meta = build(cache, tokenizer, corpus, num_proc, options)  # the rerun uses HF
    assert meta["build"]["encoder"] == "hf-fast"
    assert "an earlier build found sentencepiece wrong" in meta["build"]["encoder_reason"]
    reference(tmp_path / "hf", tokenizer, corpus, monkeypatch, options)
    assert_same_cache(cache, tmp_path / "hf")


def test_byte_level_tokenizers_use_the_hf_backend_and_build_the_same_cache(
    byte_base, corpus, tmp_path, monkeypatch
):
    meta = build(tmp_path / "auto", byte_base, corpus)
    assert meta["build"]["encoder"] == "hf-fast"
    assert "no tokenizer.model" in meta["build"]["encoder_reason"]
    reference(tmp_path / "hf", byte_base, corpus, monkeypatch)
    assert_same_cache(tmp_path / "auto", tmp_path / "hf")


def test_documents_that_could_meet_a_trigger_go_to_hf(tokenizers):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizers["added"])
    plan, _ = choice.sentencepiece_stand_in(tokenizer, tokenizers["added"])
    prefix, suffix = choice.special_frame(tokenizer)
    encoder = blocks.Encoder(tokenizer, replace(plan, prefix=prefix, suffix=suffix))
    docs = [
        "plain text",
        "a zebra",  # an added token
        "zeb",  # half of it
        "ra at the start",  # the other half: no trigger spans two documents
        "\u2581leading",
        "<s>",
        "x</s>y",
        "no <s at all",
    ]
    assert encoder.routed(docs) == [1, 4, 5, 6]
    got, by_hf = encoder.sentencepiece(docs)
    assert by_hf == 4 and got == tokenizer(docs)["input_ids"]


@pytest.mark.slow
def test_an_interrupted_sentencepiece_build_resumes_to_the_same_cache(
    tokenizers, corpus, tmp_path, monkeypatch
):
    tokenizer = tokenizers["shuffled"]
    options = CacheOptions(shard_blocks=16, docs_per_batch=32)
    build(tmp_path / "whole", tokenizer, corpus, options=options)
    real_save = shards.save_progress
    calls = {"n": 0}

    def crash_after_three(*args):
        real_save(*args)
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(shards, "save_progress", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path / "resumed", tokenizer, corpus, options=options)
    monkeypatch.setattr(shards, "save_progress", real_save)
    meta = build(tmp_path / "resumed", tokenizer, corpus, options=options)
    assert meta["build"]["resumed_at_document"] > 0
    assert_same_cache(tmp_path / "whole", tmp_path / "resumed")


@pytest.mark.parametrize("name", ["shuffled", "crossing", "added", "entangled"])
def test_random_text_gets_the_hf_ids(name, tokenizers):
    """Runs of spaces and "▁", repeats, special tokens' text, characters beyond the model."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizers[name])
    plan, _ = choice.sentencepiece_stand_in(tokenizer, tokenizers[name])
    prefix, suffix = choice.special_frame(tokenizer)
    encoder = blocks.Encoder(tokenizer, replace(plan, prefix=prefix, suffix=suffix))
    rng = random.Random(2)
    alphabet = [" ", "  ", "\u2581", "e", "t", "the", "we take", "ana", "zebra", "<s>", "\t"]
    alphabet += ["\n", "1", "23", "é", "中文", "😀", "-", "--", ".", "None", "ab", "ba"]
    docs = ["".join(rng.choices(alphabet, k=rng.randint(0, 30))) for _ in range(3000)]
    got, _ = encoder.encode(docs)
    assert got == tokenizer(docs)["input_ids"]


def test_pieces_whose_merges_interleave_are_triggers(tokenizers):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizers["entangled"])
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    products = ["".join(merge) for merge in merges]
    i = next(i for i in range(len(products) - 2) if products[i] == products[i + 2])
    assert products[i] != products[i + 1]  # the edit is what HF loaded: A, B, A
    plan, _ = choice.sentencepiece_stand_in(tokenizer, tokenizers["entangled"])
    encoder = blocks.Encoder(tokenizer, plan)
    assert encoder.routed([products[i], products[i + 1], "zzz"]) == [0, 1]


# Over ranks: `accelerate launch` runs this file as a script in two gloo processes on this CPU
# (`--multi_gpu` without a GPU; `--cpu --num_processes 2` would run one), every rank calling
# build_cache as `lowlm pretrain` does.

# This file also runs as the ranks' script (no package): its launch helpers are its own.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Small batches and parts, so that the test corpus makes several parts per rank.
SMALL = {"docs_per_batch": 32, "part_batches": 2, "shard_blocks": 16, "verify_every": 4}
PART_DOCS = CacheOptions(**SMALL).part_documents

needs_accelerate = pytest.mark.skipif(
    shutil.which("accelerate", path=str(Path(sys.executable).parent)) is None,
    reason="accelerate's launcher is not installed beside this Python",
)


def two_ranks(tmp_path: Path, builds: list[dict], **spec) -> tuple[int, list[list[dict]]]:
    """Run the builds (folder, tokenizer, corpus, num_proc) in two gloo processes; returns the
    launcher's exit status and, per build, each rank's {"meta": ...} or {"error": ...}."""
    out = tmp_path / f"ranks-{len(list(tmp_path.glob('ranks-*')))}"
    out.mkdir()
    spec = {"builds": [{k: str(v) for k, v in b.items()} for b in builds], "out": str(out), **spec}
    (out / "spec.json").write_text(json.dumps(spec))
    launcher = Path(sys.executable).parent / "accelerate"
    command = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2"]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command += ["--main_process_port", str(free_port()), __file__, str(out / "spec.json")]
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    (out / "launch.log").write_text(done.stdout + done.stderr)
    results = [
        [
            json.loads(path.read_text()) if (path := out / f"{i}-rank{rank}.json").exists() else {}
            for rank in (0, 1)
        ]
        for i in range(len(builds))
    ]
    if spec.get("expect_exit") is None:
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.returncode, results


def parts_written(launch: Path) -> set[str]:
    """The part files the ranks of one launch wrote, by name."""
    return {name for log in launch.glob("parts-rank*.txt") for name in log.read_text().split()}


def _rank_main(spec_path: str) -> None:
    """One rank under `accelerate launch`: the spec's builds, each outcome in a file."""
    from accelerate import PartialState

    state = PartialState(cpu=True)  # the gloo process group, as Accelerator() sets it up
    rank = state.process_index
    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out"])
    options = CacheOptions(**spec.get("options", {}))
    if spec.get("unpatched"):
        choice.sentencepiece_stand_in = unpatched

    def exit_after(function: str, key: str, log: Path | None = None):
        """Wrap shards.FUNCTION; with spec[key] = [rank, n], that rank dies (as if killed)
        after its n-th call; with `log`, the first argument's name is logged."""
        real = getattr(shards, function)
        calls = []

        def wrapped(*args):
            real(*args)
            calls.append(1)
            if log is not None:
                with log.open("a") as handle:
                    handle.write(Path(args[0]).name + "\n")
            if spec.get(key) == [rank, len(calls)]:
                os._exit(3)

        setattr(shards, function, wrapped)

    exit_after("write_part", "exit_after_parts", out / f"parts-rank{rank}.txt")
    exit_after("save_progress", "exit_after_progress")
    for i, build in enumerate(spec["builds"]):
        try:
            meta = build_cache(
                Path(build["folder"]),
                Path(build["tokenizer"]),
                resolve_sources([build["corpus"]]),
                DataConfig(),
                16,
                7,
                int(build.get("num_proc", 1)),
                options,
            )
            result = {"meta": meta}
        except LowlmError as exc:
            result = {"error": str(exc)}
        (out / f"{i}-rank{rank}.json").write_text(json.dumps(result))
    # Without this, torch 2.13's gloo sometimes aborts a rank as it exits ("terminate called
    # without an active exception": a quarter of the runs of a script of three collectives).
    import torch.distributed

    torch.distributed.destroy_process_group()


def small_build(folder: Path, tokenizer: Path, corpus: Path) -> dict:
    """The one-process build with the options the ranks use."""
    return build(folder, tokenizer, corpus, options=CacheOptions(**SMALL))


@pytest.mark.slow
@needs_accelerate
def test_two_ranks_build_the_one_process_cache_byte_for_byte(
    tokenizers, byte_base, corpus, tmp_path, monkeypatch
):
    """Each rank encodes its share (with two workers of its own); the main rank's merge gives
    the shards and meta.json a single process gives (sentencepiece and HF encoders)."""
    cases = {"sentencepiece": tokenizers["shuffled"], "hf-fast": byte_base}
    singles = {
        name: small_build(tmp_path / f"one-{name}", tokenizer, corpus)
        for name, tokenizer in cases.items()
    }
    builds = [
        {"folder": tmp_path / f"two-{name}", "tokenizer": t, "corpus": corpus, "num_proc": 2}
        for name, t in cases.items()
    ]
    _, results = two_ranks(tmp_path, builds, options=SMALL)
    for (name, single), outcome in zip(singles.items(), results, strict=True):
        assert_same_cache(tmp_path / f"one-{name}", tmp_path / f"two-{name}")
        meta = json.loads((tmp_path / f"two-{name}" / "meta.json").read_text())
        assert outcome == [{"meta": blocks.cache_description(meta)}] * 2  # both ranks return it
        record, alone = meta["build"], single["build"]
        assert record["encoder"] == alone["encoder"] == name
        assert record["ranks"] == 2 and record["num_proc"] == 2 and record["processes"] == 4
        assert alone["ranks"] == 1 and alone["processes"] == 1
        batches = -(-meta["documents"] // SMALL["docs_per_batch"])
        per_rank = record["per_rank"]
        assert [r["rank"] for r in per_rank] == [0, 1]
        assert all(r["batches"] > 0 and r["parts_written"] > 0 for r in per_rank), per_rank
        assert sum(r["batches"] for r in per_rank) == batches > 4 * SMALL["part_batches"]
        assert sum(r["documents"] for r in per_rank) == meta["documents"]
        assert sum(r["mb"] for r in per_rank) == pytest.approx(alone["mb"], abs=2e-3)
        assert record["mb"] == pytest.approx(alone["mb"], abs=1e-3)
        assert record["mb_per_s"] > 0 and record["peak_rss_mb"] > 0
        assert record["peak_rss_mb_largest_child"] > 0
        assert record["documents_encoded_by_hf"] == alone["documents_encoded_by_hf"]
        assert record["batches_verified"] == alone["batches_verified"]
        assert record["parts_reused"] == 0
        leftovers = ["progress.json", "carry-*", "parts-*"]
        assert not [p for pattern in leftovers for p in (tmp_path / f"two-{name}").glob(pattern)]
    assert singles["sentencepiece"]["build"]["batches_verified"] >= 2


@pytest.mark.slow
@needs_accelerate
def test_an_interrupted_two_rank_build_resumes_without_encoding_a_part_twice(
    tokenizers, corpus, tmp_path, monkeypatch
):
    """Killed while encoding (rank 1 after its first part), then while the main rank merges
    (after its first progress.json): the third launch finishes the cache of one process."""
    tokenizer = tokenizers["shuffled"]
    small_build(tmp_path / "whole", tokenizer, corpus)
    builds = [{"folder": tmp_path / "two", "tokenizer": tokenizer, "corpus": corpus}]
    parts = tmp_path / "two" / f"parts-{PART_DOCS}"
    status, _ = two_ranks(
        tmp_path, builds, options=SMALL, exit_after_parts=[1, 1], expect_exit=True
    )
    assert status != 0 and not (tmp_path / "two" / "meta.json").exists()
    first = {path.name for path in parts.glob("part-*.npz")}  # complete: written atomically
    assert "part-000000000064.npz" in first  # rank 1's first part (rank 0's are 0, 128, ...)

    status, _ = two_ranks(
        tmp_path, builds, options=SMALL, exit_after_progress=[0, 1], expect_exit=True
    )
    assert status != 0 and not (tmp_path / "two" / "meta.json").exists()
    second = parts_written(tmp_path / "ranks-1")
    assert second and not first & second  # no part encoded twice
    whole = json.loads((tmp_path / "whole" / "meta.json").read_text())
    assert len(first | second) == -(-whole["documents"] // PART_DOCS)  # every part
    progress = json.loads((tmp_path / "two" / "progress.json").read_text())
    assert progress["documents"] > 0 and progress["documents"] % PART_DOCS == 0

    _, results = two_ranks(tmp_path, builds, options=SMALL)
    assert not parts_written(tmp_path / "ranks-2")  # nothing left to encode
    assert "error" not in results[0][0]
    meta = json.loads((tmp_path / "two" / "meta.json").read_text())
    assert meta["build"]["resumed_at_document"] == progress["documents"]
    assert all(r["batches"] == 0 for r in meta["build"]["per_rank"])
    assert meta["build"]["parts_reused"] > 0
    assert_same_cache(tmp_path / "whole", tmp_path / "two")
    assert not list((tmp_path / "two").glob("parts-*"))


@pytest.mark.slow
@needs_accelerate
def test_two_ranks_pack_their_own_parquet_shards_into_the_one_process_cache(
    tokenizers, corpus, tmp_path
):
    """Five shards (one with no document): rank 0 reads shards 0, 2, 4, rank 1 shards 1, 3, so
    the text they read sums to the corpus once; a build killed after rank 1's first part
    reuses it. Both caches are the one a single process builds."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    lines, folder = corpus.read_text(encoding="utf-8").splitlines(), tmp_path / "shards"
    folder.mkdir()
    cuts = [0, 150, 150, 400, 520, len(lines)]
    for number, (a, b) in enumerate(itertools.pairwise(cuts)):
        pq.write_table(pa.table({"text": lines[a:b] or [" "]}), folder / f"{number}.parquet")
    tokenizer = tokenizers["shuffled"]
    alone = small_build(tmp_path / "one", tokenizer, folder)["build"]
    builds = [{"folder": tmp_path / n, "tokenizer": tokenizer, "corpus": folder} for n in "ab"]
    two_ranks(tmp_path, builds, options=SMALL, exit_after_parts=[1, 3], expect_exit=True)
    per_rank = json.loads((tmp_path / "a" / "meta.json").read_text())["build"]["per_rank"]
    print("MB read per rank:", [r["mb_read"] for r in per_rank], "corpus:", alone["mb"])
    assert sum(r["mb_read"] for r in per_rank) == pytest.approx(alone["mb"], abs=2e-3)
    assert all(0 < r["mb_read"] == r["mb"] < alone["mb"] for r in per_rank)
    assert [r["parts_written"] for r in per_rank] == [3, 2]  # a part per file
    assert not (tmp_path / "b" / "meta.json").exists()
    _, results = two_ranks(tmp_path, builds[1:], options=SMALL)
    assert "error" not in results[0][0]
    record = json.loads((tmp_path / "b" / "meta.json").read_text())["build"]
    assert [record["per_rank"][1][k] for k in ("parts_reused", "parts_written")] == [1, 1]
    for name in "ab":
        assert_same_cache(tmp_path / "one", tmp_path / name)


@pytest.mark.slow
@needs_accelerate
def test_a_mismatch_on_one_rank_stops_both_with_the_one_process_error(
    tokenizers, tmp_path, monkeypatch
):
    """Batch 3 (rank 1's, in parts of one batch) is the first verified batch to differ: both
    ranks stop with the message one process gives, after the main rank removed the build."""
    tokenizer = tokenizers["shuffled"]
    corpus = tmp_path / "corpus.txt"
    text = (DEMO / "en.txt").read_text(encoding="utf-8").splitlines()[:40]
    corpus.write_text("a\nI\n" * 12 + "\n".join(text), encoding="utf-8")
    small = {"sample_docs": 0, "docs_per_batch": 8, "verify_every": 3, "shard_blocks": 1}
    small["part_batches"] = 1
    monkeypatch.setattr(choice, "sentencepiece_stand_in", unpatched)
    with pytest.raises(LowlmError) as alone:
        build(tmp_path / "one" / "cache", tokenizer, corpus, options=CacheOptions(**small))
    assert "of batch 3" in str(alone.value)

    cache = tmp_path / "two" / "cache"
    builds = [{"folder": cache, "tokenizer": tokenizer, "corpus": corpus}]
    _, results = two_ranks(tmp_path, builds, options=small, unpatched=True)
    assert results[0] == [{"error": str(alone.value)}] * 2
    assert (cache / blocks.MISMATCH_FILE).exists()
    assert not [p for pattern in ("*.bin", "parts-*", "progress.json") for p in cache.glob(pattern)]


if __name__ == "__main__":
    _rank_main(sys.argv[1])
