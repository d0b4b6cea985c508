"""Train a SentencePiece model and merge its pieces into a SentencePiece base at the proto level.

Unlike appending every piece with score 0 (which splits digits differently and re-tokenizes
English), only pieces that carry the target script,
hold no ASCII digit and are new to the base are added, and they are scored below
every real base piece so that base-language text tokenizes exactly as before.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import regex
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from lowlm.config import TokenizeConfig
from lowlm.errors import LowlmError

NORMAL = sp_pb2.ModelProto.SentencePiece.NORMAL
USER_DEFINED = sp_pb2.ModelProto.SentencePiece.USER_DEFINED
# Scores at or below this are sentinels (Mistral gives 15 whitespace pieces -1e9), not ranks.
SENTINEL_SCORE = -1e8


def script_pattern(scripts: Sequence[str]) -> regex.Pattern:
    """A pattern matching one character of any of the given Unicode scripts."""
    if not scripts:
        raise LowlmError("tokenize.scripts is empty; name at least one Unicode script, e.g. Han.")
    try:
        return regex.compile("|".join(rf"\p{{Script={name}}}" for name in scripts))
    except regex.error:
        raise LowlmError(
            f"tokenize.scripts {list(scripts)} names an unknown Unicode script; use names such "
            "as Han, Latin, Cyrillic, Arabic, Devanagari, Hangul."
        ) from None


def is_wanted_piece(text: str, scripts: regex.Pattern) -> bool:
    """A new piece must carry the target script and no ASCII digit (digits stay split)."""
    return bool(scripts.search(text)) and not any("0" <= ch <= "9" for ch in text)


def train_sentencepiece(lines_file: Path, output_prefix: Path, cfg: TokenizeConfig) -> Path:
    """Train a SentencePiece model on a one-sentence-per-line file; returns the .model path."""
    output_prefix.parent.mkdir(parents=True, exist_ok=True)
    # sentencepiece turns a None keyword into the string "None" (a user-defined piece that
    # would swallow the word None): pass the option only when there are symbols.
    symbols = (
        {"user_defined_symbols": list(cfg.user_defined_symbols)} if cfg.user_defined_symbols else {}
    )
    try:
        spm.SentencePieceTrainer.train(
            input=str(lines_file),
            model_prefix=str(output_prefix),
            model_type=cfg.model_type,
            vocab_size=cfg.vocab_size,
            character_coverage=cfg.character_coverage,
            byte_fallback=cfg.byte_fallback,
            split_digits=cfg.split_digits,
            max_sentence_length=cfg.max_sentence_length,
            input_sentence_size=cfg.input_sentence_size,
            shuffle_input_sentence=cfg.shuffle_input_sentence,
            num_threads=cfg.num_threads or _cpu_count(),
            **symbols,
            # Llama-style: no normalisation, so merged pieces mean exactly what they say.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            minloglevel=2,
        )
    except RuntimeError as exc:
        message = str(exc).strip()
        if "Vocabulary size too high" in message:
            raise LowlmError(
                f"the corpus cannot support tokenize.vocab_size={cfg.vocab_size} (SentencePiece: "
                f"{message.split('] ')[-1]}); lower vocab_size or add text."
            ) from None
        needed = re.search(r"smaller than required_chars\. \d+ vs (\d+)", message)
        if needed:
            raise LowlmError(
                f"tokenize.vocab_size={cfg.vocab_size} is smaller than the {needed.group(1)} "
                "characters the corpus needs; raise vocab_size or lower character_coverage."
            ) from None
        raise LowlmError(f"SentencePiece training failed: {message}") from None
    return output_prefix.with_suffix(".model")


def _cpu_count() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)


def load_proto(path: Path) -> sp_pb2.ModelProto:
    proto = sp_pb2.ModelProto()
    try:
        proto.ParseFromString(Path(path).read_bytes())
    except Exception as exc:  # protobuf raises DecodeError and others
        raise LowlmError(f"{path} is not a SentencePiece model ({exc}).") from None
    if not proto.pieces:
        raise LowlmError(f"{path} is not a SentencePiece model (it has no pieces).")
    return proto


def score_floor(proto: sp_pb2.ModelProto) -> float:
    """The lowest score of a real (normal, non-sentinel) base piece."""
    scores = [p.score for p in proto.pieces if p.type == NORMAL and p.score > SENTINEL_SCORE]
    return min(scores) if scores else 0.0


@dataclass
class MergeResult:
    proto: sp_pb2.ModelProto
    new_pieces: list[str]
    skipped: dict[str, int]


def merge_into_sentencepiece(
    base: sp_pb2.ModelProto, trained: sp_pb2.ModelProto, scripts: Sequence[str]
) -> MergeResult:
    """Append the trained model's wanted pieces to a copy of the base, ranked below all base pieces.

    Base pieces keep their ids, scores, types, normaliser and byte fallback; new
    pieces keep the trained model's order (its best pieces first).
    """
    if base.trainer_spec.model_type != sp_pb2.TrainerSpec.BPE:
        raise LowlmError(
            "the base tokenizer is a SentencePiece unigram model; lowlm merges into "
            "SentencePiece BPE bases (LLaMA, Llama-2, Mistral, Gemma) and byte-level BPE "
            "tokenizer.json bases (GPT-2, SmolLM2, Qwen, Llama-3)."
        )
    pattern = script_pattern(scripts)
    merged = sp_pb2.ModelProto()
    merged.CopyFrom(base)
    existing = {p.piece for p in base.pieces}
    floor = score_floor(base)
    skipped = {"not_normal": 0, "no_target_script_or_digit": 0, "already_in_base": 0}
    new_pieces: list[str] = []
    for piece in trained.pieces:
        if piece.type == USER_DEFINED and piece.piece not in existing:
            new_pieces.append((piece.piece, USER_DEFINED))  # the user asked for these by name
            existing.add(piece.piece)
        elif piece.type != NORMAL:
            skipped["not_normal"] += 1
        elif not is_wanted_piece(piece.piece, pattern):
            skipped["no_target_script_or_digit"] += 1
        elif piece.piece in existing:
            skipped["already_in_base"] += 1
        else:
            new_pieces.append((piece.piece, NORMAL))
            existing.add(piece.piece)
    for rank, (text, piece_type) in enumerate(new_pieces, start=1):
        entry = merged.pieces.add()
        entry.piece = text
        # Integer steps below the floor stay exact in float32 (no ties) up to 2**24.
        entry.score = 0.0 if piece_type == USER_DEFINED else float(floor - rank)
        entry.type = piece_type
    return MergeResult(proto=merged, new_pieces=[t for t, _ in new_pieces], skipped=skipped)


def sentencepiece_processor(proto: sp_pb2.ModelProto) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


def count_byte_pieces(pieces: Iterable[str]) -> int:
    """How many of the pieces are <0xNN> byte-fallback pieces."""
    return sum(1 for p in pieces if len(p) == 6 and p.startswith("<0x") and p.endswith(">"))
