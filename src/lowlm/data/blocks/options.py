"""The token cache's key and the sizes a build works in, as one object a caller can change."""

from __future__ import annotations

from dataclasses import dataclass

from lowlm.config import DataConfig
from lowlm.rundir import fingerprint

CACHE_FORMAT = 3  # part of the key: a change of layout never reuses an old cache
PLAIN_SUFFIXES = {".txt", ".text", ".md"}  # a document per line: the file size is the text's
# Left in the cache folder when a verified batch disagreed: the next build uses HF.
MISMATCH_FILE = "sentencepiece-mismatch.json"
# Left among a build's parts by a failing rank, so the others stop at their next part.
STOP_FILE = "stopped.json"


@dataclass(frozen=True)
class CacheOptions:
    """Sizes of a build; none changes the cache's content (not part of its key)."""

    docs_per_batch: int = 256  # documents a worker encodes per call
    shard_blocks: int = 4096  # blocks per shard file
    sample_docs: int = 4096  # the corpus's first documents (up to sample_bytes) that both
    sample_bytes: int = 2_000_000  # encoders encode before sentencepiece is trusted
    # Every verify_every-th batch of a sentencepiece build is encoded by both and compared:
    # about 3% of the text, adding 10-15% to the encoding's CPU time (HF is 3-4 times slower).
    verify_every: int = 32
    word_cache: int = 100_000  # words' ids kept per worker process (tens of MB; then emptied)
    # More trigger strings than this (a regex scans every batch for them): HF encodes all.
    max_triggers: int = 256
    part_batches: int = 8  # batches per part of a build over several ranks

    @property
    def part_documents(self) -> int:
        return self.docs_per_batch * self.part_batches


def cache_key(
    tokenizer_hash: str, block_size: int, inputs: dict[str, str], data: DataConfig, seed: int
) -> str:
    """Tokenizer, block size, input contents, reading options and the held-out rule."""
    parts = (CACHE_FORMAT, tokenizer_hash, block_size, inputs, data.model_dump())
    return fingerprint(*parts, seed)[:20]
