"""Tokenise a corpus once into memory-mapped shards of packed `block_size` blocks.

The cache folder is named by a content key (tokenizer hash, block size, input file
hashes, reading options, held-out rule), so a changed input, tokenizer or block size
never reuses a stale cache (a cache keyed by file name once reused another block size).
Building streams in bounded memory: documents are tokenised in batches, EOS-separated,
and written in shards; `progress.json` records the documents consumed after every shard,
so an interrupted build resumes there. The cache is complete when `meta.json` exists.

The token ids are always the HF tokenizer's (`tokenizer(batch)["input_ids"]`, BOS
included when the tokenizer adds it). For a SentencePiece tokenizer (a `tokenizer.model`
beside `tokenizer.json`) the `sentencepiece` library computes them, each distinct word once,
when a static check shows that it computes the same BPE (`_sentencepiece_stand_in`) and the
corpus's first documents agree; every VERIFY_EVERY-th batch is still encoded by both and
compared. Otherwise the HF tokenizer encodes, through its backend's batch call. Workers
return each batch as numpy arrays, and shards are cut from arrays: no per-token Python work
in the main process. meta.json's "build" record says which encoder ran and why, with the
build's MB/s and peak memory; `build_cache` returns meta.json without it.

Under torch.distributed with several processes (`accelerate launch`), every rank encodes a
disjoint share of the batches and the main rank packs them in order: the same cache, byte for
byte, as one process builds ("Packing over ranks" below).
"""

from __future__ import annotations

import bisect
import contextlib
import io
import itertools
import json
import os
import re
import shutil
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from multiprocessing import Pool
from pathlib import Path

import numpy as np

from lowlm.config import DataConfig
from lowlm.data.corpus import Source, iter_documents
from lowlm.data.heldout import is_held_out
from lowlm.errors import LowlmError
from lowlm.rundir import atomic_write_bytes, atomic_write_json, fingerprint

DOCS_PER_BATCH = 256
CACHE_FORMAT = 3  # part of the key: a change of layout never reuses an old cache
SHARD_BLOCKS = 4096
PLAIN_SUFFIXES = {".txt", ".text", ".md"}  # a document per line: the file size is the text's
# The corpus's first documents (up to both limits) are encoded by sentencepiece and by the
# HF tokenizer before sentencepiece is trusted with the build.
SAMPLE_DOCS = 4096
SAMPLE_BYTES = 2_000_000
# Then every VERIFY_EVERY-th batch of a sentencepiece build is encoded by both and compared:
# about 3% of the text, adding 10-15% to the encoding's CPU time (HF is 3-4 times slower).
VERIFY_EVERY = 32
# Left in the cache folder when a verified batch disagreed: the next build uses HF.
MISMATCH_FILE = "sentencepiece-mismatch.json"
# Words' ids kept per worker process (a few tens of MB; emptied when full).
SEGMENT_CACHE = 100_000
# More texts than this that send documents to HF (a regex scans every batch for them), and
# the HF tokenizer encodes the whole build.
MAX_TRIGGERS = 256

# SentencePiece piece types (sentencepiece_model.proto).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_SPACES = (" ", "\u2581")  # a space, and SentencePiece's "▁" that stands for it
_LEGACY_NORMALIZER = {
    "type": "Sequence",
    "normalizers": [
        {"type": "Prepend", "prepend": "\u2581"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
    ],
}


def cache_key(
    tokenizer_hash: str, block_size: int, inputs: dict[str, str], data: DataConfig, seed: int
) -> str:
    """Tokenizer, block size, input contents, reading options and the held-out rule."""
    parts = (CACHE_FORMAT, tokenizer_hash, block_size, inputs, data.model_dump())
    return fingerprint(*parts, seed)[:20]


# Choosing the encoder
#
# Why a SentencePiece model can stand in for the HF tokenizer built from it. Both run the
# same greedy BPE over the text's characters (after "▁" replaces spaces and, with a dummy
# prefix, leads the text): repeatedly merge the adjacent pair of symbols with the best
# priority, the leftmost on a tie, until no pair forms a mergeable piece. They differ in
# three places, each checked or neutralised in `_sentencepiece_stand_in`:
# 1. Which pairs merge: sentencepiece merges any pair whose concatenation is a piece, HF only
#    the pairs listed in its merges. Every split of a piece into two vocabulary pieces must
#    be a listed merge and every merge must give a normal piece; a piece where this fails,
#    and a character inside a piece that is not itself a piece, make a "trigger".
# 2. Priority: sentencepiece ranks a pair by its piece's score, HF by its merge's rank.
#    transformers 5 orders merges by piece id, not score (Mistral's and Llama's whitespace
#    pieces score -1e9 but have small ids: runs of spaces tokenise differently), so the
#    model that encodes gets a copy of the scores rewritten to HF's order of pieces (by their
#    first merge; scores stay exact in float32; pieces whose merges interleave with another
#    piece's in HF's list have no one place in it and are triggers). Between
#    pieces the orders are then the same and strict. Within one piece HF ranks its splits
#    while sentencepiece cannot, but that never matters: a pair of symbols spanning a
#    piece's text was formed by merges inside that text alone, in an order fixed by the
#    text, so every pair forming a given piece at a given time is the same split (the
#    same merge), and both take the leftmost.
# 3. Around the model: the normaliser (identity, no whitespace removal, the same dummy
#    prefix), the pre-tokeniser (Metaspace without splitting, or the legacy Prepend/Replace
#    normaliser), byte fallback on both sides, the same ids for the same pieces, and
#    special tokens around a document (derived from the HF tokenizer, then checked).
# Documents that could meet a trigger are encoded by HF instead: those containing an added
# token's text (`<s>` written in the text is the BOS token to HF, three pieces to
# sentencepiece), a user-defined piece, a piece from point 1, or starting with a space (HF's
# Metaspace adds no dummy prefix before a leading space; sentencepiece always does).
# 4. Words: when no piece holds another character followed by "▁" (true of Llama, Mistral
#    and what lowlm merges into them), no merge crosses the start of a word ("▁"s and the
#    characters up to the next "▁"), so by the argument of point 2 a text's ids are its
#    words' ids one after another. Each distinct word is then encoded once (a model
#    without the dummy prefix, fed the text as it stands after normalisation) and its ids
#    reused: about twice as fast on natural text.
#
# Residual risk: the argument is about the algorithms as sentencepiece 0.2 and tokenizers
# 0.2x implement them; a behaviour outside it (a change in a later version, a bug) would show
# only on documents outside the sample and outside the verified batches. A systematic
# difference is caught at once; one confined to a rare pattern could slip through, which
# the verified share of batches (not all of them) leaves possible.


@dataclass(frozen=True)
class EncoderPlan:
    """How this build encodes documents; `_init_worker` turns it into an `_Encoder`."""

    kind: str  # "sentencepiece" or "hf"
    reason: str
    model: bytes | None = None  # the SentencePiece model with HF's merge order as scores
    prefix: tuple[int, ...] = ()  # special tokens the HF tokenizer puts around a document
    suffix: tuple[int, ...] = ()
    route: str | None = None  # regex over "▁" + text: documents it finds are encoded by HF
    separator: str = "\x00"  # a character in no trigger: joins a batch's texts for `route`
    dummy_prefix: bool = True
    words: bool = False  # ids cached per word (point 4 above)
    hf_fast: bool = True  # HF through its backend's encode_batch_fast (same ids, no offsets)


class _EncoderMismatch(LowlmError):
    """sentencepiece and the HF tokenizer gave different ids for a verified document."""

    def __init__(self, message: str, batch: int = -1):
        super().__init__(message, batch)  # both in args: the exception pickles whole
        self.batch = batch

    def __str__(self) -> str:
        return self.args[0]


def _merges(model: dict) -> list[tuple[str, str]] | None:
    merges = []
    for entry in model.get("merges") or []:
        if isinstance(entry, str):
            if entry.count(" ") != 1:
                return None
            entry = entry.split(" ")
        merges.append((entry[0], entry[1]))
    return merges


def _dummy_prefix(state: dict) -> bool | str:
    """Whether HF's pipeline puts "▁" before the text, or why it is not SentencePiece's."""
    normalizer, pre_tokenizer = state.get("normalizer"), state.get("pre_tokenizer")
    if normalizer == _LEGACY_NORMALIZER and pre_tokenizer is None:
        return True
    if normalizer is not None:
        return f"the HF tokenizer has a normaliser ({normalizer.get('type')}) of its own"
    if not pre_tokenizer or pre_tokenizer.get("type") != "Metaspace":
        kind = pre_tokenizer.get("type") if pre_tokenizer else None
        return f"the HF tokenizer's pre-tokeniser is {kind}, not Metaspace"
    if pre_tokenizer.get("replacement") != "\u2581" or pre_tokenizer.get("split", False):
        return "the HF tokenizer's Metaspace splits the text or replaces spaces otherwise"
    scheme = pre_tokenizer.get("prepend_scheme")
    if scheme is None:
        return bool(pre_tokenizer.get("add_prefix_space", True))
    return scheme in ("first", "always")


def _sentencepiece_stand_in(tokenizer, folder: Path) -> tuple[EncoderPlan, str] | str:
    """(plan, note) when the folder's tokenizer.model computes the HF tokenizer's BPE (see
    the comment above), else the reason it does not. The note counts the triggers."""
    path = folder / "tokenizer.model"
    if not path.exists():
        return "no tokenizer.model beside tokenizer.json (not a SentencePiece tokenizer)"
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as exc:  # protobuf raises DecodeError and others
        return f"tokenizer.model cannot be read ({type(exc).__name__})"
    if proto.trainer_spec.model_type != 2:  # BPE
        return "tokenizer.model is not a BPE model"
    norm = proto.normalizer_spec
    if norm.precompiled_charsmap or norm.name not in ("identity", ""):
        return f"tokenizer.model normalises text ({norm.name}), which HF does not"
    if norm.remove_extra_whitespaces or not norm.escape_whitespaces:
        return "tokenizer.model removes extra whitespace or keeps spaces unescaped"
    if proto.trainer_spec.treat_whitespace_as_suffix:
        return "tokenizer.model treats whitespace as a suffix"
    types = [piece.type for piece in proto.pieces]
    if _UNUSED in types:
        return "tokenizer.model has unused pieces (sentencepiece re-segments them)"
    if not proto.trainer_spec.byte_fallback or types.count(_BYTE) != 256:
        return "tokenizer.model has no byte fallback (unknown characters differ)"

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    model = state.get("model") or {}
    if model.get("type") != "BPE":
        return f"the HF tokenizer's model is {model.get('type')}, not BPE"
    for key, wanted in (
        ("dropout", None),
        ("continuing_subword_prefix", None),
        ("end_of_word_suffix", None),
        ("ignore_merges", False),
        ("byte_fallback", True),
    ):
        if model.get(key, wanted) != wanted:
            return f"the HF tokenizer's BPE has {key}={model.get(key)!r}"
    prefix = _dummy_prefix(state)
    if isinstance(prefix, str):
        return prefix
    if prefix != norm.add_dummy_prefix:
        return "HF and tokenizer.model disagree on the dummy prefix"
    vocab = model.get("vocab") or {}
    pieces = [piece.piece for piece in proto.pieces]
    if len(vocab) != len(pieces) or any(vocab.get(p) != i for i, p in enumerate(pieces)):
        return "tokenizer.json's vocabulary is not tokenizer.model's"
    merges = _merges(model)
    if merges is None:
        return "tokenizer.json's merges cannot be read"

    kind = dict(zip(pieces, types, strict=True))
    byte_pieces = {p for p, t in kind.items() if t == _BYTE}
    span: dict[str, list[int]] = {}  # piece -> ranks of its first and last merge in HF's list
    for rank, (left, right) in enumerate(merges):
        if left in byte_pieces or right in byte_pieces:
            return "tokenizer.json merges byte-fallback pieces"
        span.setdefault(left + right, [rank, rank])[1] = rank
    order = {piece: position for position, piece in enumerate(span)}  # by first merge
    triggers = _entangled(span)  # pieces without one place in HF's order
    triggers.update(_added_texts(tokenizer))
    triggers.update(p for p, t in kind.items() if t == _USER_DEFINED)
    triggers.update(p for p in order if kind.get(p) != _NORMAL)
    merge_set = set(merges)
    single = {p for p, t in kind.items() if t == _NORMAL and len(p) == 1}
    for piece, piece_type in kind.items():
        if piece_type != _NORMAL or len(piece) < 2:
            continue
        if any(ch not in single for ch in piece):
            triggers.update(ch for ch in piece if ch not in single)
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in kind and right in kind and (left, right) not in merge_set:
                triggers.add(piece)
                break
    if "" in triggers:
        return "the HF tokenizer has an empty added token"
    if len(triggers) <= 16 * MAX_TRIGGERS:  # else too many to sort out (quadratic)
        triggers = _shortest(triggers)
    if len(triggers) > MAX_TRIGGERS:
        return f"{len(triggers)} trigger strings would route documents to HF (most: {MAX_TRIGGERS})"
    unreachable = -float(len(order) + 1)
    for piece in proto.pieces:
        if piece.type == _NORMAL and len(piece.piece) > 1:
            piece.score = -float(order[piece.piece]) if piece.piece in order else unreachable
    words = not any(
        piece[i] == "\u2581" and piece[i - 1] != "\u2581"
        for piece in itertools.chain(order, (p for p, t in kind.items() if t == _NORMAL))
        for i in range(1, len(piece))
    )
    separator = next(
        (ch for ch in "\x00\x01\uffff\U0010ffff" if not _in_triggers(ch, triggers)), ""
    )
    if not separator:
        return "the trigger strings use every separator character"
    plan = EncoderPlan(
        kind="sentencepiece",
        reason="",
        model=proto.SerializeToString(),
        route=_route_pattern(triggers),
        separator=separator,
        dummy_prefix=prefix,
        words=words,
    )
    note = f"{len(triggers)} trigger strings route documents to HF"
    return plan, note + (", ids cached per word" if words else "")


def _entangled(span: dict[str, list[int]]) -> set[str]:
    """Pieces whose merges interleave in HF's list with another piece's (older converters
    ranked merges by score, and pieces of equal score interleave): their priority against
    each other depends on which split is merging, so documents holding them go to HF."""
    entangled: set[str] = set()
    group: list[str] = []
    reach = -1
    for piece, (first, last) in span.items():  # in the order of their first merge
        if first > reach:
            if len(group) > 1:
                entangled.update(group)
            group = []
        group.append(piece)
        reach = max(reach, last)
    if len(group) > 1:
        entangled.update(group)
    return entangled


def _shortest(triggers: set[str]) -> set[str]:
    """The triggers no shorter trigger is part of (a text holding one holds the other)."""
    kept: list[str] = []
    for trigger in sorted(triggers, key=len):
        if not any(other in trigger for other in kept):
            kept.append(trigger)
    return set(kept)


def _in_triggers(ch: str, triggers: set[str]) -> bool:
    return ch in _SPACES or any(ch in trigger for trigger in triggers)


def _added_texts(tokenizer) -> set[str]:
    added = tokenizer.backend_tokenizer.get_added_tokens_decoder()
    return {token.content for token in added.values()}


def _route_pattern(triggers: set[str]) -> str | None:
    """A regex finding any trigger in "▁" + text, a space standing for "▁" and the reverse."""
    if not triggers:
        return None
    spaces = "[ \u2581]"
    alternatives = sorted(
        ("".join(spaces if ch in _SPACES else re.escape(ch) for ch in t) for t in triggers),
        key=lambda alternative: (-len(alternative), alternative),
    )
    return "|".join(alternatives)


def _special_frame(tokenizer) -> tuple[tuple[int, ...], tuple[int, ...]] | str:
    """The ids the HF tokenizer puts before and after a document's own, the same for all."""
    frames = set()
    for probe in ("a", "Hello world", "x y z", "1"):
        full = tokenizer(probe, add_special_tokens=True)["input_ids"]
        bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
        found = [k for k in range(len(full) - len(bare) + 1) if full[k : k + len(bare)] == bare]
        if not bare or not found:
            return "the HF tokenizer's special tokens change a document's own ids"
        frames.add((tuple(full[: found[0]]), tuple(full[found[0] + len(bare) :])))
    if len(frames) != 1:
        return "the HF tokenizer puts different special tokens around different documents"
    prefix, suffix = frames.pop()
    if tokenizer("", add_special_tokens=True)["input_ids"] != [*prefix, *suffix]:
        return "the HF tokenizer's special tokens around an empty document differ"
    return prefix, suffix


def _sample(sources: list[Source], data: DataConfig) -> list[str]:
    docs, size = [], 0
    for document in itertools.islice(iter_documents(sources, data), SAMPLE_DOCS):
        docs.append(document)
        size += len(document.encode("utf-8"))
        if size >= SAMPLE_BYTES:
            break
    return docs


def _first_difference(got: list, wanted: list) -> int | None:
    """The first index where two lists differ (a list's end counts), None if equal."""
    if got == wanted:
        return None
    unequal = (i for i, (a, b) in enumerate(zip(got, wanted, strict=False)) if a != b)
    return next(unequal, min(len(got), len(wanted)))


def choose_encoder(
    tokenizer, tokenizer_folder: Path, sample: list[str], refused: str = ""
) -> EncoderPlan:
    """sentencepiece where it provably gives the HF tokenizer's ids and does on `sample`
    (unless `refused` says why not); the HF tokenizer otherwise (through its backend's batch
    call where that agrees too). Documents are encoded one call each here: the main process
    encodes no batch before it forks its workers (tokenizers would turn their parallelism off)."""
    wanted = [tokenizer(doc, add_special_tokens=True)["input_ids"] for doc in sample]
    hf = EncoderPlan(kind="hf", reason="")
    fast = _Encoder(tokenizer, hf)
    if _first_difference([fast.hf_one(doc) for doc in sample], wanted) is not None:
        hf = replace(hf, hf_fast=False)
    if refused:
        return _with_reason(hf, refused)
    found = _sentencepiece_stand_in(tokenizer, Path(tokenizer_folder))
    if isinstance(found, str):
        return _with_reason(hf, found)
    plan, note = found
    frame = _special_frame(tokenizer)
    if isinstance(frame, str):
        return _with_reason(hf, frame)
    plan = replace(plan, prefix=frame[0], suffix=frame[1])
    got, _ = _Encoder(tokenizer, plan).sentencepiece(sample, single_calls=True)
    wrong = _first_difference(got, wanted)
    if wrong is not None:
        return _with_reason(
            hf, f"sentencepiece gave other ids for sample document {wrong} ({sample[wrong][:60]!r})"
        )
    return _with_reason(
        plan, f"tokenizer.model computes the HF BPE, {len(sample)} sample documents agree, {note}"
    )


def _with_reason(plan: EncoderPlan, reason: str) -> EncoderPlan:
    if plan.kind == "hf" and not plan.hf_fast:
        reason += "; the HF backend's batch call disagreed on the sample, the full call encodes"
    return replace(plan, reason=reason)


class _Encoder:
    """A document's ids as `tokenizer(batch)["input_ids"]` gives them, by the plan's means."""

    def __init__(self, tokenizer, plan: EncoderPlan):
        self.tokenizer, self.plan = tokenizer, plan
        self.backend = tokenizer.backend_tokenizer
        # What tokenizer(batch) sets before it calls the backend.
        self.backend.no_truncation()
        self.backend.no_padding()
        self.backend.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", 0))
        self.batch_fast = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        self.processor = None
        self.route = re.compile(plan.route) if plan.route else None
        self.prefix, self.suffix = list(plan.prefix), list(plan.suffix)
        self.words: dict[str, list[int]] = {}
        self.split_words = re.compile("\u2581*[^\u2581]+|\u2581+").findall
        if plan.kind == "sentencepiece":
            import sentencepiece as spm

            model = plan.model
            if plan.words:  # fed normalised words: no dummy prefix of its own
                from sentencepiece import sentencepiece_model_pb2

                proto = sentencepiece_model_pb2.ModelProto()
                proto.ParseFromString(model)
                proto.normalizer_spec.add_dummy_prefix = False
                model = proto.SerializeToString()
            self.processor = spm.SentencePieceProcessor(model_proto=model)

    def reference(self, docs: list[str]) -> list[list[int]]:
        return self.tokenizer(docs, add_special_tokens=True)["input_ids"]

    def hf(self, docs: list[str]) -> list[list[int]]:
        if not self.plan.hf_fast:
            return self.reference(docs)
        return [encoding.ids for encoding in self.batch_fast(docs, add_special_tokens=True)]

    def hf_one(self, doc: str) -> list[int]:
        return self.backend.encode(doc, add_special_tokens=True).ids

    def routed(self, docs: list[str]) -> list[int]:
        """Indices of the documents HF must encode (see the comment above)."""
        indices = {i for i, doc in enumerate(docs) if doc[:1] in _SPACES}
        if self.route is not None:
            # One scan of the batch: no trigger holds the separator, so none spans two texts.
            lead = "\u2581" if self.plan.dummy_prefix else ""
            head = self.plan.separator + lead
            joined = "".join(head + doc for doc in docs)
            ends = list(itertools.accumulate(len(head) + len(doc) for doc in docs))
            for match in self.route.finditer(joined):
                indices.add(bisect.bisect_right(ends, match.start()))
        return sorted(indices)

    def sentencepiece(
        self, docs: list[str], single_calls: bool = False
    ) -> tuple[list[list[int]], int]:
        """(ids, how many documents HF encoded); HF one document per call if asked."""
        hf_call = self._reference_one if single_calls else self.reference
        routed = self.routed(docs)
        skip = set(routed)
        plain = [d for i, d in enumerate(docs) if i not in skip] if skip else docs
        try:
            ids = self._by_words(plain) if self.plan.words else self._by_text(plain)
        except (RuntimeError, TypeError, ValueError):  # text sentencepiece cannot take (a lone
            # surrogate from a JSON escape): the HF tokenizer's behaviour decides
            return hf_call(docs), len(docs)
        if self.prefix or self.suffix:
            ids = [[*self.prefix, *row, *self.suffix] for row in ids]
        if not routed:
            return ids, 0
        by_hf = dict(zip(routed, hf_call([docs[i] for i in routed]), strict=True))
        plain_rows = iter(ids)
        rows = [by_hf[i] if i in by_hf else next(plain_rows) for i in range(len(docs))]
        return rows, len(routed)

    def _by_text(self, docs: list[str]) -> list[list[int]]:
        return self.processor.encode(docs, num_threads=1)

    def _by_words(self, docs: list[str]) -> list[list[int]]:
        """Each document's ids as its words' ids, each distinct word encoded once (point 4)."""
        lead = "\u2581" if self.plan.dummy_prefix else ""
        split = self.split_words
        texts = [split(lead + doc.replace(" ", "\u2581")) if doc else [] for doc in docs]
        needed = set(itertools.chain.from_iterable(texts))
        missing = needed.difference(self.words)
        if len(self.words) + len(missing) > SEGMENT_CACHE:
            self.words.clear()
            missing = needed
        if missing:
            missing = list(missing)
            encoded = self.processor.encode(missing, num_threads=1)
            self.words.update(zip(missing, encoded, strict=True))
        ids = self.words.__getitem__
        return [list(itertools.chain.from_iterable(map(ids, words))) for words in texts]

    def encode(self, docs: list[str]) -> tuple[list[list[int]], int]:
        if self.processor is None:
            return self.hf(docs), len(docs)
        return self.sentencepiece(docs)

    def _reference_one(self, docs: list[str]) -> list[list[int]]:
        return [self.tokenizer(doc, add_special_tokens=True)["input_ids"] for doc in docs]


_worker: dict = {}


def _init_worker(
    tokenizer_folder: str,
    seed: int,
    heldout_fraction: float,
    plan: EncoderPlan,
    eos: int,
    dtype,
    in_pool: bool = False,
) -> None:
    if in_pool:  # one thread per worker process: num_proc says how many run
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from transformers import AutoTokenizer

    _worker.update(
        encoder=_Encoder(AutoTokenizer.from_pretrained(tokenizer_folder), plan),
        seed=seed,
        heldout_fraction=heldout_fraction,
        eos=eos,
        dtype=dtype,
    )


@dataclass
class _Encoded:
    """One batch, packed: the EOS-separated ids of its training and held-out documents."""

    documents: int
    train: np.ndarray
    held_out: np.ndarray
    by_hf: int  # documents the HF tokenizer encoded
    verified: bool


def _encode(task: tuple[int, list[str]]) -> _Encoded:
    """Encode a batch (each document's ids as the HF tokenizer gives them, BOS included when it
    adds one) and pack it per split (lowlm.data.heldout), EOS after each document."""
    index, batch = task
    encoder: _Encoder = _worker["encoder"]
    rows, by_hf = encoder.encode(batch)
    verified = encoder.processor is not None and index % VERIFY_EVERY == 0
    if verified:
        for position, (row, wanted) in enumerate(zip(rows, encoder.reference(batch), strict=True)):
            if row != wanted:
                at = _first_difference(row, wanted)
                raise _EncoderMismatch(
                    f"sentencepiece and the HF tokenizer gave different ids for document "
                    f"{position} of batch {index} ({batch[position][:80]!r}, first at token "
                    f"{at}): {row[:12]} vs {wanted[:12]}",
                    index,
                )
    eos, seed, fraction = _worker["eos"], _worker["seed"], _worker["heldout_fraction"]
    train: list[int] = []
    held_out: list[int] = []
    for doc, row in zip(batch, rows, strict=True):
        out = held_out if is_held_out(doc, seed, fraction) else train
        out += row
        if not row or row[-1] != eos:  # tokenizers that add EOS themselves keep theirs
            out.append(eos)
    dtype = _worker["dtype"]
    return _Encoded(
        len(batch), np.array(train, dtype=dtype), np.array(held_out, dtype=dtype), by_hf, verified
    )


class _Packer:
    """Accumulates EOS-separated token arrays and writes full blocks as shards."""

    def __init__(
        self, folder: Path, prefix: str, block_size: int, dtype, carry: np.ndarray, shards: int
    ):
        self.folder, self.prefix, self.block_size, self.dtype = folder, prefix, block_size, dtype
        self.chunks: list[np.ndarray] = [carry.astype(dtype)] if len(carry) else []
        self.size = len(carry)
        self.shards = shards

    @property
    def buffer(self) -> np.ndarray:
        """The tokens not yet in a shard (kept as one array from now on)."""
        if len(self.chunks) != 1:
            whole = np.concatenate(self.chunks) if self.chunks else np.zeros(0, self.dtype)
            self.chunks = [whole]
        return self.chunks[0]

    def add(self, ids: np.ndarray) -> None:
        if len(ids):
            self.chunks.append(ids)
            self.size += len(ids)

    def flush(self, final: bool = False) -> None:
        full = self.size // self.block_size
        if not (full >= SHARD_BLOCKS or (final and full > 0)):
            return
        tokens = self.buffer
        start = 0
        while full >= SHARD_BLOCKS or (final and full > 0):
            take = min(full, SHARD_BLOCKS) * self.block_size
            atomic_write_bytes(
                self.folder / f"{self.prefix}-{self.shards:05d}.bin",
                memoryview(tokens[start : start + take]),  # written as it is, not copied
            )
            start += take
            self.shards += 1
            full = (len(tokens) - start) // self.block_size
        rest = tokens[start:].copy()  # a copy: the shard's tokens are freed
        self.chunks = [rest] if len(rest) else []
        self.size = len(rest)


def _progress_bar(sources: list[Source]):
    """Bytes read, with rate and ETA: the total is known when every source is a plain text
    file (other formats' sizes are not their text's); otherwise bytes and rate alone."""
    from tqdm.auto import tqdm

    plain = all(s.path is not None and s.path.suffix in PLAIN_SUFFIXES for s in sources)
    total = sum(s.path.stat().st_size for s in sources) if plain else None
    return tqdm(
        total=total,
        desc="reading and packing the corpus",
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        dynamic_ncols=True,
    )


def _peak_rss_mb(children: bool = False) -> float:
    """Peak resident memory (getrusage) of this process, or of its largest finished child."""
    try:
        import resource
    except ImportError:  # not on this platform
        return 0.0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF)
    peak = peak.ru_maxrss
    return round(peak / 2**20 if sys.platform == "darwin" else peak / 2**10, 1)


def _public(meta: dict) -> dict:
    """The cache's description, without the record of how this build went."""
    return {key: value for key, value in meta.items() if key != "build"}


@dataclass
class _Setup:
    """What a build needs before it encodes: decided once (by the main rank, over several)."""

    plan: EncoderPlan
    eos: int
    dtype: type
    vocab_size: int
    progress: dict  # documents consumed and shards written before an interruption


def _prepare(
    folder: Path, tokenizer_folder: Path, sources: list[Source], data: DataConfig
) -> _Setup:
    from transformers import AutoTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise LowlmError(
            f"the tokenizer in {tokenizer_folder} has no EOS token to separate documents."
        )
    dtype = np.uint16 if len(tokenizer) <= 65535 else np.uint32
    progress_path = folder / "progress.json"
    progress = (
        json.loads(progress_path.read_text())
        if progress_path.exists()
        else {
            "documents": 0,
            "shards": {"train": 0, "eval": 0},
        }
    )
    refused = ""
    if (folder / MISMATCH_FILE).exists():
        refused = f"an earlier build found sentencepiece wrong (see {folder / MISMATCH_FILE})"
    plan = choose_encoder(tokenizer, Path(tokenizer_folder), _sample(sources, data), refused)
    return _Setup(plan, eos, dtype, len(tokenizer), progress)


def _packers(folder: Path, block_size: int, setup: _Setup) -> dict[str, _Packer]:
    """The two splits' packers, holding the tokens an interrupted build left unsharded."""
    return {
        split: _Packer(
            folder,
            split,
            block_size,
            setup.dtype,
            _load_carry(folder, split, setup.progress),
            setup.progress["shards"][split],
        )
        for split in ("train", "eval")
    }


def build_cache(
    folder: Path,
    tokenizer_folder: Path,
    sources: list[Source],
    data: DataConfig,
    block_size: int,
    seed: int,
    num_proc: int = 1,
) -> dict:
    """Build (or finish building) the cache in `folder`; returns its meta (meta.json keeps the
    build's record too: encoder, MB/s, peak memory). Every rank of a torch.distributed run of
    several processes calls it: each encodes a share (see `_build_over_ranks`)."""
    group = _process_group()
    if group is not None:
        return _build_over_ranks(
            folder, tokenizer_folder, sources, data, block_size, seed, num_proc, *group
        )
    meta_path = folder / "meta.json"
    if meta_path.exists():
        return _public(json.loads(meta_path.read_text()))
    started = time.perf_counter()
    setup = _prepare(folder, tokenizer_folder, sources, data)
    plan, dtype, progress = setup.plan, setup.dtype, setup.progress
    progress_path = folder / "progress.json"
    print(f"packing with the {_encoder_name(plan)}: {plan.reason}")
    packers = _packers(folder, block_size, setup)

    # Bytes read per batch, in order: the bar advances as batches come back encoded (imap
    # reads ahead of the workers, so counting where documents are read would run ahead).
    batch_bytes: deque[int] = deque()
    encoded_bytes = 0

    def batches() -> Iterator[tuple[int, list[str]]]:
        nonlocal encoded_bytes
        batch: list[str] = []
        size = 0
        count = itertools.count()
        for index, document in enumerate(iter_documents(sources, data)):
            length = len(document.encode("utf-8")) + 1
            size += length
            if index < progress["documents"]:
                continue  # consumed before the interruption
            encoded_bytes += length
            batch.append(document)
            if len(batch) == DOCS_PER_BATCH:
                batch_bytes.append(size)
                yield next(count), batch
                batch, size = [], 0
        if batch:
            batch_bytes.append(size)
            yield next(count), batch

    worker_args = (str(tokenizer_folder), seed, data.heldout_fraction, plan, setup.eos, dtype)
    pool = Pool(num_proc, _init_worker, (*worker_args, True)) if num_proc > 1 else None
    if pool is None:
        _init_worker(*worker_args)
    bar = _progress_bar(sources)
    documents = progress["documents"]
    by_hf = verified = 0
    finished = False
    try:
        encoded = pool.imap(_encode, batches()) if pool else map(_encode, batches())
        for batch in encoded:
            bar.update(batch_bytes.popleft() if batch_bytes else 0)
            packers["train"].add(batch.train)
            packers["eval"].add(batch.held_out)
            documents += batch.documents
            by_hf += batch.by_hf
            verified += batch.verified
            before = packers["train"].shards + packers["eval"].shards
            for packer in packers.values():
                packer.flush()
            if packers["train"].shards + packers["eval"].shards != before:
                _save_progress(progress_path, documents, packers)
        if bar.total and bar.n < bar.total:
            bar.update(bar.total - bar.n)  # lines filtered out or stripped were read too
        finished = True
    except _EncoderMismatch as exc:
        _discard(folder, plan, str(exc))
        raise LowlmError(_mismatch_message(str(exc), folder)) from None
    finally:
        bar.close()
        _close_pool(pool, finished)
    seconds = time.perf_counter() - started
    build = _build_record(
        plan,
        by_hf=by_hf,
        verified=verified,
        resumed_at=progress["documents"],
        ranks=1,
        num_proc=num_proc,
        mb=encoded_bytes / 1e6,
        seconds=seconds,
        peak_rss_mb=_peak_rss_mb(),
        peak_child_mb=_peak_rss_mb(children=True),
    )
    meta = _finish(folder, packers, block_size, setup, documents, build)
    _print_summary(build, plan, children=pool is not None)
    return meta


def _close_pool(pool, finished: bool) -> None:
    """Let a finished pool's workers exit; stop those of an interrupted one."""
    if pool:
        if finished:
            pool.close()
        else:
            pool.terminate()
        pool.join()


def _mismatch_message(message: str, folder: Path) -> str:
    return (
        f"{message}. The build stopped and removed its shards (it trusted sentencepiece, which "
        f"a check had found exact); rerun to build {folder.name} with the HF tokenizer, "
        "and please report the document."
    )


def _build_record(
    plan: EncoderPlan,
    *,
    by_hf: int,
    verified: int,
    resumed_at: int,
    ranks: int,
    num_proc: int,
    mb: float,
    seconds: float,
    peak_rss_mb: float,
    peak_child_mb: float,
) -> dict:
    """meta.json's "build": the encoder and why, MB/s in all and per encoding process (ranks
    times num_proc), peak memory (the largest rank's)."""
    processes = ranks * num_proc
    return {
        "encoder": plan.kind if plan.kind == "sentencepiece" or not plan.hf_fast else "hf-fast",
        "encoder_reason": plan.reason,
        "documents_encoded_by_hf": by_hf,
        "batches_verified": verified,
        "resumed_at_document": resumed_at,
        "ranks": ranks,
        "num_proc": num_proc,
        "processes": processes,
        "mb": round(mb, 3),
        "seconds": round(seconds, 2),
        "mb_per_s": round(mb / seconds, 3),
        "mb_per_s_per_process": round(mb / seconds / processes, 3),
        "peak_rss_mb": peak_rss_mb,
        "peak_rss_mb_largest_child": peak_child_mb,
    }


def _finish(
    folder: Path,
    packers: dict[str, _Packer],
    block_size: int,
    setup: _Setup,
    documents: int,
    build: dict,
) -> dict:
    """Write the last shards and meta.json (the cache is then complete); returns the meta."""
    for packer in packers.values():
        packer.flush(final=True)
    train_blocks = _count_blocks(folder, "train", block_size, setup.dtype)
    eval_blocks = _count_blocks(folder, "eval", block_size, setup.dtype)
    if train_blocks == 0:
        raise LowlmError(
            f"the corpus gives fewer than {block_size} tokens for training; add text or lower "
            "pretrain.block_size."
        )
    meta = {
        "block_size": block_size,
        "dtype": np.dtype(setup.dtype).name,
        "train_blocks": train_blocks,
        "eval_blocks": eval_blocks,
        "documents": documents,
        "vocab_size": setup.vocab_size,
        "build": build,
    }
    atomic_write_json(folder / "meta.json", meta)
    (folder / "progress.json").unlink(missing_ok=True)
    for carry in folder.glob("carry-*.npy"):
        carry.unlink()
    for parts in folder.glob("parts-*"):  # a build over ranks left them (interrupted)
        shutil.rmtree(parts, ignore_errors=True)
    return _public(meta)


def _print_summary(build: dict, plan: EncoderPlan, children: bool) -> None:
    ranks, num_proc = build["ranks"], build["num_proc"]
    processes = f"{num_proc} process" + ("es" if num_proc != 1 else "")
    if ranks > 1:
        processes = f"{ranks} ranks x {processes}"
    child = f", largest child {build['peak_rss_mb_largest_child']:.0f} MB" if children else ""
    largest = " (largest rank)" if ranks > 1 else ""
    print(
        f"packed {build['mb']:.1f} MB in {build['seconds']:.1f} s: {build['mb_per_s']:.2f} MB/s "
        f"({build['mb_per_s_per_process']:.2f} per process, {processes}) with the "
        f"{_encoder_name(plan)}; peak memory{largest} {build['peak_rss_mb']:.0f} MB{child}"
    )


# Packing over ranks. Under torch.distributed with several processes (`accelerate launch`,
# torchrun), every rank calls build_cache and encodes a disjoint share of the corpus with its
# own num_proc workers; the cache is byte for byte the one a single process builds from the
# same inputs (training order, stage keys and resume rest on that). The batches, counted from
# the document the build starts at, form parts of PART_BATCHES batches; part k is rank
# k % ranks's. Every rank reads the whole corpus (counting the documents outside its parts,
# not encoding them) and writes each of its parts, the EOS-separated ids of both splits, to
# parts-<documents per part>/part-<first document>.npz in the cache folder, atomically; a
# rerun encodes only the parts that are missing. After an all-gather of the ranks' outcomes
# (the barrier), the main rank streams the parts in order through the packers, which write the
# shards, carry and progress.json of a one-process build, and deletes each part once
# progress.json is past it; the other ranks wait in a broadcast of its result. Messages go
# through torch.distributed: the main rank's plan (broadcast), every rank's figures or failure
# (all-gather: a sentencepiece mismatch on any rank stops all of them with the first one's
# message, after the main rank has removed the build), the main rank's meta or error
# (broadcast). A failing rank also leaves STOP_FILE among the parts, so that the others stop
# encoding at their next part past the failure instead of finishing their share (a hint; the
# all-gather decides).
# Ranks on several nodes need the cache folder (the run directory) on a filesystem they all
# share: the main rank reads the others' parts there.
PART_BATCHES = 8  # 2048 documents a part
STOP_FILE = "stopped.json"
# What the build record keeps of each rank's figures (meta.json's build["per_rank"]).
PER_RANK = ("rank", "mb", "documents", "batches", "parts_written", "parts_reused", "seconds")
PER_RANK += ("mb_per_s", "peak_rss_mb", "peak_rss_mb_largest_child")


def _process_group() -> tuple[int, int] | None:
    """(rank, ranks) when torch.distributed runs this process among several, else None."""
    dist = sys.modules.get("torch.distributed")  # never imported: not initialised either
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    ranks = dist.get_world_size()
    return (dist.get_rank(), ranks) if ranks > 1 else None


def _one_line(exc: BaseException) -> str:
    text = str(exc) if isinstance(exc, LowlmError) else f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())


@dataclass
class _Part:
    """A part being encoded: its first document, its batches' arrays, its documents."""

    first: int
    train: list[np.ndarray] = field(default_factory=list)
    held_out: list[np.ndarray] = field(default_factory=list)
    documents: int = 0


def _part_path(parts: Path, first: int) -> Path:
    return parts / f"part-{first:012d}.npz"


def _write_part(
    path: Path, documents: int, train: list[np.ndarray], held_out: list[np.ndarray], dtype
) -> None:
    """One part: its documents' EOS-separated ids, per split (written whole or not at all)."""
    buffer = io.BytesIO()
    empty = np.zeros(0, dtype)
    np.savez(
        buffer,
        documents=np.array(documents, dtype=np.int64),
        train=np.concatenate(train) if train else empty,
        eval=np.concatenate(held_out) if held_out else empty,
    )
    atomic_write_bytes(path, buffer.getbuffer())


def _build_over_ranks(
    folder: Path,
    tokenizer_folder: Path,
    sources: list[Source],
    data: DataConfig,
    block_size: int,
    seed: int,
    num_proc: int,
    rank: int,
    ranks: int,
) -> dict:
    """This rank's side of a build over ranks (see the comment above); returns the meta."""
    import torch.distributed as dist

    started = time.perf_counter()
    main = rank == 0
    parts = folder / f"parts-{DOCS_PER_BATCH * PART_BATCHES}"
    failure: BaseException | None = None  # this rank's own, re-raised as it is
    decided: list = [None]
    if main:
        try:
            if (folder / "meta.json").exists():
                decided[0] = ("done", _public(json.loads((folder / "meta.json").read_text())))
            else:
                setup = _prepare(folder, tokenizer_folder, sources, data)
                (parts / STOP_FILE).unlink(missing_ok=True)  # a failed build's
                name, reason = _encoder_name(setup.plan), setup.plan.reason
                print(f"packing with the {name}, {ranks} ranks: {reason}")
                decided[0] = ("build", setup)
        except Exception as exc:
            failure = exc
            decided[0] = ("error", _one_line(exc))
    dist.broadcast_object_list(decided, src=0)
    kind, value = decided[0]
    if kind == "done":
        return value
    if kind == "error":
        raise failure or LowlmError(value)
    setup = value

    status, failure = _encode_share(
        parts, tokenizer_folder, sources, data, seed, num_proc, setup, rank, ranks
    )
    statuses: list = [None] * ranks
    dist.all_gather_object(statuses, status)  # every rank's outcome: the barrier
    mismatches = [s for s in statuses if s["failed"] == "mismatch"]
    if mismatches:  # the first in the corpus: the one a single process would have met
        message = min(mismatches, key=lambda s: s["batch"])["message"]
        try:
            if main:
                _discard(folder, setup.plan, message)
        finally:
            dist.barrier()  # the build is removed before any rank stops
        raise LowlmError(_mismatch_message(message, folder))
    failed = [s for s in statuses if s["failed"]]
    if failed:
        first = next((s for s in failed if s["failed"] == "error"), failed[0])
        if failure is not None:
            raise failure
        if first["lowlm"]:
            raise LowlmError(first["message"])
        raise LowlmError(f"rank {first['rank']} stopped packing the corpus: {first['message']}")

    result: list = [None]
    if main:
        try:
            meta = _merge(folder, parts, block_size, setup, statuses, num_proc, started)
            result[0] = ("ok", meta)
        except Exception as exc:
            failure = exc
            result[0] = ("error", _one_line(exc))
    dist.broadcast_object_list(result, src=0)  # the other ranks wait here while it merges
    kind, value = result[0]
    if kind == "error":
        raise failure or LowlmError(value)
    return value


def _encode_share(
    parts: Path,
    tokenizer_folder: Path,
    sources: list[Source],
    data: DataConfig,
    seed: int,
    num_proc: int,
    setup: _Setup,
    rank: int,
    ranks: int,
) -> tuple[dict, BaseException | None]:
    """Encode this rank's missing parts; (its figures or failure, the exception if any)."""
    started = time.perf_counter()
    main = rank == 0
    start = setup.progress["documents"]
    part_docs = DOCS_PER_BATCH * PART_BATCHES
    stop = parts / STOP_FILE
    status = {
        "rank": rank,
        "failed": "",  # "mismatch", "error" or "stopped" (another rank failed)
        "batch": -1,
        "message": "",
        "lowlm": False,
        "documents_read": 0,  # from `start`: the main rank's tells it the parts there are
        "documents": 0,
        "batches": 0,
        "parts_written": 0,
        "parts_reused": 0,
        "by_hf": 0,
        "verified": 0,
    }
    # Per batch handed to the encoder: its number, its part's first document, whether it ends
    # the part, and (main rank) the bytes read so far, for the bar.
    pending: deque[tuple[int, int, bool, int]] = deque()
    sizes = {"read": 0, "encoded": 0}

    def share() -> Iterator[tuple[int, list[str]]]:
        batch: list[str] = []
        first, mine = start, False
        position = -1
        for position, document in enumerate(
            itertools.islice(iter_documents(sources, data), start, None)
        ):
            if position % part_docs == 0:  # a part starts
                first = start + position
                owned = (position // part_docs) % ranks == rank
                mine = owned and not _part_path(parts, first).exists()
                status["parts_reused"] += int(owned and not mine)
            if main or mine:
                length = len(document.encode("utf-8")) + 1
                sizes["read"] += length
            if not mine:
                continue
            sizes["encoded"] += length
            batch.append(document)
            if len(batch) == DOCS_PER_BATCH:
                index = position // DOCS_PER_BATCH
                pending.append((index, first, (position + 1) % part_docs == 0, sizes["read"]))
                yield index, batch
                batch = []
        if batch:
            index = position // DOCS_PER_BATCH
            pending.append((index, first, True, sizes["read"]))
            yield index, batch
        status["documents_read"] = position + 1

    worker_args = (str(tokenizer_folder), seed, data.heldout_fraction, setup.plan, setup.eos)
    worker_args = (*worker_args, setup.dtype)
    pool = Pool(num_proc, _init_worker, (*worker_args, True)) if num_proc > 1 else None
    if pool is None:
        _init_worker(*worker_args)
    bar = _progress_bar(sources) if main else None
    failure: BaseException | None = None
    finished = False
    part: _Part | None = None

    def write(part: _Part) -> None:
        path = _part_path(parts, part.first)
        _write_part(path, part.documents, part.train, part.held_out, setup.dtype)
        status["parts_written"] += 1

    try:
        encoded = pool.imap(_encode, share()) if pool else map(_encode, share())
        for batch in encoded:
            index, first, ends, read = pending.popleft()
            if bar is not None:
                bar.update(read - bar.n)
            if part is not None and part.first != first:
                write(part)
                part = None
            if part is None:
                part = _Part(first)
            part.train.append(batch.train)
            part.held_out.append(batch.held_out)
            part.documents += batch.documents
            status["documents"] += batch.documents
            status["batches"] += 1
            status["by_hf"] += batch.by_hf
            status["verified"] += batch.verified
            if ends:
                write(part)
                part = None
                if _stopped_before(stop, index):  # another rank failed: no need to go on
                    status.update(failed="stopped", message="another rank failed")
                    break
        else:
            if part is not None:
                write(part)
            if bar is not None and bar.total and bar.n < bar.total:
                bar.update(bar.total - bar.n)
            finished = True
    except _EncoderMismatch as exc:
        status.update(failed="mismatch", batch=exc.batch, message=str(exc), lowlm=True)
        _leave_stop(stop, rank, exc.batch)
    except Exception as exc:
        failure = exc
        status.update(failed="error", message=_one_line(exc), lowlm=isinstance(exc, LowlmError))
        _leave_stop(stop, rank, -1)
    finally:
        if bar is not None:
            bar.close()
        _close_pool(pool, finished)
    seconds = time.perf_counter() - started
    status.update(
        bytes=sizes["encoded"],
        mb=round(sizes["encoded"] / 1e6, 3),
        seconds=round(seconds, 2),
        mb_per_s=round(sizes["encoded"] / 1e6 / seconds, 3),
        peak_rss_mb=_peak_rss_mb(),
        peak_rss_mb_largest_child=_peak_rss_mb(children=True),
    )
    return status, failure


def _leave_stop(stop: Path, rank: int, batch: int) -> None:
    """Tell the other ranks to stop (batch: where a mismatch was found, -1 for an error)."""
    with contextlib.suppress(OSError):
        atomic_write_json(stop, {"rank": rank, "batch": batch})


def _stopped_before(stop: Path, index: int) -> bool:
    """Whether a rank failed, with an error or at a batch before `index` (this rank's next
    ones could hold no earlier mismatch; before it, they could: the first one must be met)."""
    if not stop.exists():
        return False
    try:
        batch = json.loads(stop.read_text())["batch"]
    except (OSError, ValueError, KeyError):
        return True
    return batch < 0 or batch <= index


def _merge(
    folder: Path,
    parts: Path,
    block_size: int,
    setup: _Setup,
    statuses: list[dict],
    num_proc: int,
    started: float,
) -> dict:
    """The main rank: every part in corpus order through the packers; returns the meta."""
    merging = time.perf_counter()
    ranks = len(statuses)
    start = setup.progress["documents"]
    total = start + statuses[0]["documents_read"]
    part_docs = DOCS_PER_BATCH * PART_BATCHES
    packers = _packers(folder, block_size, setup)
    progress_path = folder / "progress.json"
    documents = start
    merged: list[Path] = []
    for first in range(start, total, part_docs):
        path = _part_path(parts, first)
        expected = min(part_docs, total - first)
        if not path.exists():
            owner = (first - start) // part_docs % ranks
            raise LowlmError(
                f"{path}, the part of the corpus rank {owner} encoded, is missing; ranks on "
                "several nodes need the run directory on a filesystem they all share."
            )
        with np.load(path) as part:
            if int(part["documents"]) != expected:
                raise LowlmError(
                    f"{path} holds {int(part['documents'])} documents, not {expected}; delete "
                    f"{parts} and rerun."
                )
            packers["train"].add(part["train"])
            packers["eval"].add(part["eval"])
        documents += expected
        merged.append(path)
        before = packers["train"].shards + packers["eval"].shards
        for packer in packers.values():
            packer.flush()
        if packers["train"].shards + packers["eval"].shards != before:
            _save_progress(progress_path, documents, packers)
            for done in merged:  # progress.json is past them
                done.unlink()
            merged = []
    mine = statuses[0]
    mine.update(peak_rss_mb=_peak_rss_mb(), peak_rss_mb_largest_child=_peak_rss_mb(children=True))
    per_rank = [{key: s[key] for key in PER_RANK} for s in statuses]
    build = _build_record(
        setup.plan,
        by_hf=sum(s["by_hf"] for s in statuses),
        verified=sum(s["verified"] for s in statuses),
        resumed_at=start,
        ranks=ranks,
        num_proc=num_proc,
        mb=sum(s["bytes"] for s in statuses) / 1e6,
        seconds=time.perf_counter() - started,
        peak_rss_mb=max(s["peak_rss_mb"] for s in statuses),
        peak_child_mb=max(s["peak_rss_mb_largest_child"] for s in statuses),
    )
    build.update(
        parts_reused=sum(s["parts_reused"] for s in statuses),
        merge_seconds=round(time.perf_counter() - merging, 2),
        per_rank=per_rank,
    )
    meta = _finish(folder, packers, block_size, setup, documents, build)
    _print_summary(build, setup.plan, children=num_proc > 1)
    return meta


def _encoder_name(plan: EncoderPlan) -> str:
    if plan.kind == "sentencepiece":
        return "sentencepiece library"
    return "HF tokenizer" + (" (backend batch call)" if plan.hf_fast else "")


def _discard(folder: Path, plan: EncoderPlan, message: str) -> None:
    """After a mismatch: no shard of this build stays, and the next build uses HF."""
    for pattern in ("train-*.bin", "eval-*.bin", "carry-*.npy", "progress.json"):
        for path in folder.glob(pattern):
            path.unlink()
    for parts in folder.glob("parts-*"):
        shutil.rmtree(parts, ignore_errors=True)
    atomic_write_json(folder / MISMATCH_FILE, {"message": message, "plan_reason": plan.reason})


def _save_progress(path: Path, documents: int, packers: dict) -> None:
    """Record the tokens not yet in a shard, then the documents consumed (the commit point)."""
    for split, packer in packers.items():
        buffer = io.BytesIO()
        np.save(buffer, packer.buffer)  # in the cache's dtype (int64 before: read either way)
        atomic_write_bytes(path.parent / f"carry-{split}-{documents}.npy", buffer.getbuffer())
    shards = {split: p.shards for split, p in packers.items()}
    atomic_write_json(path, {"documents": documents, "shards": shards})
    for old in path.parent.glob("carry-*.npy"):
        if not old.name.endswith(f"-{documents}.npy"):
            old.unlink()


def _load_carry(folder: Path, split: str, progress: dict) -> np.ndarray:
    if not progress["documents"]:
        return np.zeros(0, dtype=np.int64)
    return np.load(folder / f"carry-{split}-{progress['documents']}.npy")


def _count_blocks(folder: Path, split: str, block_size: int, dtype) -> int:
    itemsize = np.dtype(dtype).itemsize
    return sum(p.stat().st_size // (itemsize * block_size) for p in folder.glob(f"{split}-*.bin"))


class BlockDataset:
    """Random access to the packed blocks of one split, memory-mapped."""

    def __init__(self, folder: Path, split: str):
        meta = json.loads((folder / "meta.json").read_text())
        self.block_size = meta["block_size"]
        dtype = np.dtype(meta["dtype"])
        self.shards = [
            np.memmap(p, dtype=dtype, mode="r").reshape(-1, self.block_size)
            for p in sorted(folder.glob(f"{split}-*.bin"))
        ]
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> np.ndarray:
        shard = int(np.searchsorted(self.offsets, index, side="right") - 1)
        return np.asarray(self.shards[shard][index - self.offsets[shard]], dtype=np.int64)
