"""Encoding a batch of documents as the HF tokenizer would, by the chosen means, in workers."""

from __future__ import annotations

import bisect
import itertools
import os
import re
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from lowlm.data.blocks.options import CacheOptions
from lowlm.data.heldout import is_held_out
from lowlm.errors import LowlmError

SPACES = (" ", "\u2581")  # a space, and SentencePiece's "▁" that stands for it


@dataclass(frozen=True)
class EncoderPlan:
    """How this build encodes documents; `init_worker` turns it into an `Encoder`."""

    kind: str  # "sentencepiece" or "hf"
    reason: str
    model: bytes | None = None  # the SentencePiece model with HF's merge order as scores
    prefix: tuple[int, ...] = ()  # special tokens the HF tokenizer puts around a document
    suffix: tuple[int, ...] = ()
    route: str | None = None  # regex over "▁" + text: documents it finds are encoded by HF
    separator: str = "\x00"  # a character in no trigger: joins a batch's texts for `route`
    dummy_prefix: bool = True
    words: bool = False  # ids cached per word (docs/token-cache.md, point 4)
    hf_fast: bool = True  # HF through its backend's encode_batch_fast (same ids, no offsets)


def encoder_name(plan: EncoderPlan) -> str:
    if plan.kind == "sentencepiece":
        return "sentencepiece library"
    return "HF tokenizer" + (" (backend batch call)" if plan.hf_fast else "")


class EncoderMismatch(LowlmError):
    """sentencepiece and the HF tokenizer gave different ids for a verified document."""

    def __init__(self, message: str, batch: int = -1):
        super().__init__(message, batch)  # both in args: the exception pickles whole
        self.batch = batch

    def __str__(self) -> str:
        return self.args[0]


def first_difference(got: list, wanted: list) -> int | None:
    """The first index where two lists differ (a list's end counts), None if equal."""
    if got == wanted:
        return None
    unequal = (i for i, (a, b) in enumerate(zip(got, wanted, strict=False)) if a != b)
    return next(unequal, min(len(got), len(wanted)))


class Encoder:
    """A document's ids as `tokenizer(batch)["input_ids"]` gives them, by the plan's means."""

    def __init__(self, tokenizer, plan: EncoderPlan, word_cache: int = CacheOptions.word_cache):
        self.tokenizer, self.plan, self.word_cache = tokenizer, plan, word_cache
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
        """Indices of the documents HF must encode (they could meet a trigger)."""
        indices = {i for i, doc in enumerate(docs) if doc[:1] in SPACES}
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
        """Each document's ids as its words' ids, each distinct word encoded once."""
        lead = "\u2581" if self.plan.dummy_prefix else ""
        split = self.split_words
        texts = [split(lead + doc.replace(" ", "\u2581")) if doc else [] for doc in docs]
        needed = set(itertools.chain.from_iterable(texts))
        missing = needed.difference(self.words)
        if len(self.words) + len(missing) > self.word_cache:
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


_worker: dict = {}  # this process's encoder and split rule, set by init_worker


def init_worker(
    tokenizer_folder: str,
    seed: int,
    heldout_fraction: float,
    plan: EncoderPlan,
    eos: int,
    dtype,
    options: CacheOptions,
    in_pool: bool = False,
) -> None:
    if in_pool:  # one thread per worker process: num_proc says how many run
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    _worker.update(
        encoder=Encoder(tokenizer, plan, options.word_cache),
        seed=seed,
        heldout_fraction=heldout_fraction,
        eos=eos,
        dtype=dtype,
    )


class BatchTask(NamedTuple):
    """A batch for a worker: its place in the corpus's order (a mismatch's rank among the
    ranks'), its documents, whether sentencepiece is checked on it, and how to name it."""

    index: int
    documents: list[str]
    verify: bool
    where: str


@dataclass
class EncodedBatch:
    """One batch, packed: the EOS-separated ids of its training and held-out documents."""

    documents: int
    train: np.ndarray
    held_out: np.ndarray
    by_hf: int  # documents the HF tokenizer encoded
    verified: bool


def encode_batch(task: BatchTask) -> EncodedBatch:
    """Encode a batch (each document's ids as the HF tokenizer gives them, BOS included when it
    adds one) and pack it per split (lowlm.data.heldout), EOS after each document."""
    batch, dtype = task.documents, _worker["dtype"]
    if not batch:  # a file with no document left still ends its part
        return EncodedBatch(0, np.zeros(0, dtype), np.zeros(0, dtype), 0, False)
    encoder: Encoder = _worker["encoder"]
    rows, by_hf = encoder.encode(batch)
    verified = encoder.processor is not None and task.verify
    if verified:
        for position, (row, wanted) in enumerate(zip(rows, encoder.reference(batch), strict=True)):
            if row != wanted:
                at = first_difference(row, wanted)
                raise EncoderMismatch(
                    f"sentencepiece and the HF tokenizer gave different ids for document "
                    f"{position} of {task.where} ({batch[position][:80]!r}, first at token "
                    f"{at}): {row[:12]} vs {wanted[:12]}",
                    task.index,
                )
    eos, seed, fraction = _worker["eos"], _worker["seed"], _worker["heldout_fraction"]
    train: list[int] = []
    held_out: list[int] = []
    for doc, row in zip(batch, rows, strict=True):
        out = held_out if is_held_out(doc, seed, fraction) else train
        out += row
        if not row or row[-1] != eos:  # tokenizers that add EOS themselves keep theirs
            out.append(eos)
    return EncodedBatch(
        len(batch), np.array(train, dtype=dtype), np.array(held_out, dtype=dtype), by_hf, verified
    )
