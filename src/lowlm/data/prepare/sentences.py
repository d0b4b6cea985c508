"""Sentence-level dedup (opt-in, `prepare.dedup.sentences`): datatrove's C4-style sentence
dedup. Every span of `sentence_span` sentences that occurs more than once among the kept
documents is cut from every document but the first holding it; a document left with fewer
than `sentence_min_words` words or 3 sentences is removed. It runs after exact and MinHash
dedup (on the documents they keep), with the run's word tokenizer, whose sentence splitting
follows the language (Han / kana at 。！？, other scripts at . ! ? before a space, and line
ends; datatrove's segmenters for Thai, Khmer, ...), never plain whitespace.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from datatrove.data import DocumentsPipeline
from datatrove.pipeline.dedup import SentenceDedupFilter, SentenceDedupSignature, SentenceFindDedups
from datatrove.pipeline.dedup.sentence_dedup import SentDedupConfig
from datatrove.utils.hashing import HashConfig

TOO_SHORT = "too_short_after_cutting"


def sentence_config(dedup) -> SentDedupConfig:
    return SentDedupConfig(
        n_sentences=dedup.sentence_span,
        min_doc_words=dedup.sentence_min_words,
        hash_config=HashConfig(hash_fc="xxhash", precision=64),
    )


class CountedSentenceDedupFilter(SentenceDedupFilter):
    """datatrove's sentence-dedup filter, counted like the other steps (documents in, kept,
    removed with their reason, documents cut, characters removed) and giving only removed
    documents, as they were read, to the exclusion writer. datatrove's own filter counts
    neither kept nor removed documents and hands cut-but-kept ones to that writer too."""

    def __init__(self, folder: str, config: SentDedupConfig, tokenizer, exclusion_writer=None):
        super().__init__(folder, config, language=tokenizer)
        self.removed_writer = exclusion_writer

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1):
        pending: dict = {}  # the document datatrove's filter is working on, and its length
        writer = self.removed_writer

        def read(sink):
            for doc in data:
                if pending:  # the filter asked for the next one without yielding this one
                    self._removed(pending.pop("doc"), sink, rank)
                pending.update(doc=doc, chars=len(doc.text))
                yield doc
            if pending:
                self._removed(pending.pop("doc"), sink, rank)

        with writer if writer else contextlib.nullcontext() as sink:
            for doc in super().run(read(sink), rank, world_size):
                pending.pop("doc")
                self.stat_update("forwarded")
                cut = pending.pop("chars") - len(doc.text)
                if cut:
                    self.stat_update("documents_cut")
                    self.stat_update("characters_removed", value=cut)
                yield doc

    def _removed(self, doc, sink, rank: int) -> None:
        self.stat_update("dropped", f"dropped_{TOO_SHORT}")
        if sink:
            doc.metadata["filter_reason"] = TOO_SHORT
            sink.write(doc, rank=rank)


def sentence_phases(runner, before, shards: int, work: Path, tokenizer, dedup):
    """Find the repeated sentence spans among the documents `before` yields (signatures one
    task per shard, then one finding task); returns the write phase's filter factory."""
    config = sentence_config(dedup)
    signatures, duplicates = str(work / "sentence-sigs"), str(work / "sentence-dups")
    signature = SentenceDedupSignature(signatures, config=config, language=tokenizer)
    runner.run("sentence-signatures", [*before, signature], shards)
    runner.run("sentence-find", [SentenceFindDedups(signatures, duplicates, config=config)], 1)
    return lambda writer: CountedSentenceDedupFilter(
        duplicates, config, tokenizer, writer("sentences")
    )
