"""The held-out split, decided once for the whole run by one rule over documents.

A document is held out when a hash of (run.seed, its text) falls below
`data.heldout_fraction`. The rule needs no list and no state: every stage that reads the
corpus (the tokenizer's training, pre-training stages 1, 2 and full) applies it to each
document and trains only on the rest, and pre-training's validation loss is measured on
exactly the held-out documents. Identical documents get the same answer, so a duplicate
of a held-out document is never trained on either. `tokenize` writes up to
`tokenize.holdout_lines` lines of held-out documents to `tokenizer/heldout.txt`: the text
every held-out figure of the run (resize, pretrain, export, the demo's ppl task) is measured
on, and which `sft` keeps out of its training examples.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from pathlib import Path

HELDOUT_FILE = "heldout.txt"


def _hash_share(data: bytes) -> float:
    """A stable number in [0, 1) drawn from the bytes' hash."""
    digest = hashlib.blake2b(data, digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def is_held_out(document: str, seed: int, fraction: float) -> bool:
    if fraction <= 0:
        return False
    return _hash_share(f"{seed}\0{document}".encode()) < fraction


def hash_split(items: Iterable, hashed: Callable[[object], bytes], fraction: float):
    """(kept, held): an item is held when the hash of `hashed(item)` (its content, with the
    seed) falls below `fraction`; the same items are held whatever their order or number."""
    kept, held = [], []
    for item in items:
        (held if _hash_share(hashed(item)) < fraction else kept).append(item)
    return kept, held


def read_heldout(tokenizer_folder: Path | None) -> list[str]:
    """The non-empty lines of the run's heldout.txt (none when the run has no tokenizer)."""
    if tokenizer_folder is None:
        return []
    path = Path(tokenizer_folder) / HELDOUT_FILE
    if not path.exists():
        return []
    return [line for line in path.read_text(encoding="utf-8").split("\n") if line]


def with_heldout_text(tasks: list, tokenizer_folder: Path) -> list:
    """Eval tasks, those with `heldout: true` pointed at the run's own heldout.txt."""
    path = str(Path(tokenizer_folder) / HELDOUT_FILE)
    return [task.model_copy(update={"path": path}) if task.heldout else task for task in tasks]


def heldout_set(tokenizer_folder: Path | None) -> frozenset[str]:
    """The lines of the run's heldout.txt, stripped (for matching against other text)."""
    return frozenset(line.strip() for line in read_heldout(tokenizer_folder) if line.strip())


def heldout_document_lines(
    documents: Iterable[str], seed: int, fraction: float, limit: int
) -> list[str]:
    """The first `limit` non-empty lines of the held-out documents, in corpus order: the lines
    `tokenize` writes to heldout.txt, for a run that has no tokenize stage (plain LoRA on the
    base tokenizer), so that its held-out figures are measured on the same text."""
    lines: list[str] = []
    for document in documents:
        if len(lines) >= limit:
            break
        if is_held_out(document, seed, fraction):
            lines.extend(line for line in document.split("\n") if line.strip())
    return lines[:limit]
