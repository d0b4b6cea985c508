"""Which encoder a build uses: sentencepiece where it provably computes the HF tokenizer's ids
(the proof, point by point, is in docs/token-cache.md), the HF tokenizer otherwise."""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import replace
from pathlib import Path

from lowlm.config import DataConfig
from lowlm.data.blocks.encoder import SPACES, Encoder, EncoderPlan, first_difference
from lowlm.data.blocks.options import CacheOptions
from lowlm.data.corpus import Source, iter_documents

# SentencePiece piece types (sentencepiece_model.proto).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_LEGACY_NORMALIZER = {
    "type": "Sequence",
    "normalizers": [
        {"type": "Prepend", "prepend": "\u2581"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
    ],
}


def choose_encoder(
    tokenizer,
    tokenizer_folder: Path,
    sample: list[str],
    refused: str = "",
    max_triggers: int = CacheOptions.max_triggers,
) -> EncoderPlan:
    """sentencepiece where it provably gives the HF tokenizer's ids and does on `sample`
    (unless `refused` says why not); the HF tokenizer otherwise (through its backend's batch
    call where that agrees too). Documents are encoded one call each here: the main process
    encodes no batch before it forks its workers (tokenizers would turn their parallelism off)."""
    wanted = [tokenizer(doc, add_special_tokens=True)["input_ids"] for doc in sample]
    hf = EncoderPlan(kind="hf", reason="")
    fast = Encoder(tokenizer, hf)
    if first_difference([fast.hf_one(doc) for doc in sample], wanted) is not None:
        hf = replace(hf, hf_fast=False)
    if refused:
        return _with_reason(hf, refused)
    found = sentencepiece_stand_in(tokenizer, Path(tokenizer_folder), max_triggers)
    if isinstance(found, str):
        return _with_reason(hf, found)
    plan, note = found
    frame = special_frame(tokenizer)
    if isinstance(frame, str):
        return _with_reason(hf, frame)
    plan = replace(plan, prefix=frame[0], suffix=frame[1])
    got, _ = Encoder(tokenizer, plan).sentencepiece(sample, single_calls=True)
    wrong = first_difference(got, wanted)
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


def sample_documents(sources: list[Source], data: DataConfig, options: CacheOptions) -> list[str]:
    """The corpus's first documents, up to options.sample_docs and options.sample_bytes."""
    docs, size = [], 0
    for document in itertools.islice(iter_documents(sources, data), options.sample_docs):
        docs.append(document)
        size += len(document.encode("utf-8"))
        if size >= options.sample_bytes:
            break
    return docs


def sentencepiece_stand_in(
    tokenizer, folder: Path, max_triggers: int = CacheOptions.max_triggers
) -> tuple[EncoderPlan, str] | str:
    """(plan, note) when the folder's tokenizer.model computes the HF tokenizer's BPE (points
    1-4 of docs/token-cache.md), else the reason it does not. The note counts the triggers."""
    path = folder / "tokenizer.model"
    if not path.exists():
        return "no tokenizer.model beside tokenizer.json (not a SentencePiece tokenizer)"
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as exc:  # protobuf raises DecodeError and others
        return f"tokenizer.model cannot be read ({type(exc).__name__})"
    refusal = _model_refusal(proto)
    if refusal:
        return refusal
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    model = state.get("model") or {}
    refusal = _hf_refusal(state, proto)
    if refusal:
        return refusal
    merges = _merges(model)
    if merges is None:
        return "tokenizer.json's merges cannot be read"
    kind = {piece.piece: piece.type for piece in proto.pieces}
    byte_pieces = {p for p, t in kind.items() if t == _BYTE}
    span: dict[str, list[int]] = {}  # piece -> ranks of its first and last merge in HF's list
    for rank, (left, right) in enumerate(merges):
        if left in byte_pieces or right in byte_pieces:
            return "tokenizer.json merges byte-fallback pieces"
        span.setdefault(left + right, [rank, rank])[1] = rank
    order = {piece: position for position, piece in enumerate(span)}  # by first merge
    triggers = _triggers(tokenizer, kind, span, order, set(merges))
    if "" in triggers:
        return "the HF tokenizer has an empty added token"
    if len(triggers) <= 16 * max_triggers:  # else too many to sort out (quadratic)
        triggers = _shortest(triggers)
    if len(triggers) > max_triggers:
        return f"{len(triggers)} trigger strings would route documents to HF (most: {max_triggers})"
    unreachable = -float(len(order) + 1)
    for piece in proto.pieces:  # scores in HF's order of pieces (point 2)
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
        dummy_prefix=proto.normalizer_spec.add_dummy_prefix,
        words=words,
    )
    note = f"{len(triggers)} trigger strings route documents to HF"
    return plan, note + (", ids cached per word" if words else "")


def _model_refusal(proto) -> str:
    """Why tokenizer.model's own settings keep it from standing in (point 3), or ""."""
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
    return ""


def _hf_refusal(state: dict, proto) -> str:
    """Why the HF tokenizer's pipeline is not tokenizer.model's (point 3), or ""."""
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
    if prefix != proto.normalizer_spec.add_dummy_prefix:
        return "HF and tokenizer.model disagree on the dummy prefix"
    vocab = model.get("vocab") or {}
    pieces = [piece.piece for piece in proto.pieces]
    if len(vocab) != len(pieces) or any(vocab.get(p) != i for i, p in enumerate(pieces)):
        return "tokenizer.json's vocabulary is not tokenizer.model's"
    return ""


def _triggers(tokenizer, kind: dict[str, int], span: dict, order: dict, merge_set: set) -> set[str]:
    """Texts a document must not hold to be encoded by sentencepiece (points 1-3)."""
    triggers = _entangled(span)  # pieces without one place in HF's order
    triggers.update(_added_texts(tokenizer))
    triggers.update(p for p, t in kind.items() if t == _USER_DEFINED)
    triggers.update(p for p in order if kind.get(p) != _NORMAL)
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
    return triggers


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
    return ch in SPACES or any(ch in trigger for trigger in triggers)


def _added_texts(tokenizer) -> set[str]:
    added = tokenizer.backend_tokenizer.get_added_tokens_decoder()
    return {token.content for token in added.values()}


def _route_pattern(triggers: set[str]) -> str | None:
    """A regex finding any trigger in "▁" + text, a space standing for "▁" and the reverse."""
    if not triggers:
        return None
    spaces = "[ \u2581]"
    alternatives = sorted(
        ("".join(spaces if ch in SPACES else re.escape(ch) for ch in t) for t in triggers),
        key=lambda alternative: (-len(alternative), alternative),
    )
    return "|".join(alternatives)


def special_frame(tokenizer) -> tuple[tuple[int, ...], tuple[int, ...]] | str:
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
