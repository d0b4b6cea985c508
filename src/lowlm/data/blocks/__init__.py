"""The token cache: a corpus tokenised once into memory-mapped shards of packed blocks
(docs/token-cache.md)."""

from lowlm.data.blocks.build import build_cache, cache_description
from lowlm.data.blocks.choice import choose_encoder
from lowlm.data.blocks.encoder import Encoder, EncoderPlan, encoder_name
from lowlm.data.blocks.options import MISMATCH_FILE, CacheOptions, cache_key
from lowlm.data.blocks.reader import BlockDataset

__all__ = [
    "MISMATCH_FILE",
    "BlockDataset",
    "CacheOptions",
    "Encoder",
    "EncoderPlan",
    "build_cache",
    "cache_description",
    "cache_key",
    "choose_encoder",
    "encoder_name",
]
