"""Inference: KV caches, the decoders behind one interface, sampling, and generation.

Read in the book's order: `kv_cache`, `sampling`, `decoders` (and `fixed_shape`), then `generation`, whose
`generate_ids` is the loop chapter 10 teaches: prefill once, then choose a token and step, until `<eos>`.
"""

from .decoders import CACHES, CachedDecoder, Decoder, make_decoder
from .fixed_shape import FixedShapeDecoder, WholeBufferCache
from .generation import GenerationOutput, generate, generate_ids
from .kv_cache import DynamicCache, KVCache, StaticCache
from .sampling import GenerationSettings, choose_next_token, sampling_distribution

__all__ = [
    "CACHES", "CachedDecoder", "Decoder", "DynamicCache", "FixedShapeDecoder", "GenerationOutput",
    "GenerationSettings", "KVCache", "StaticCache", "WholeBufferCache", "choose_next_token", "generate",
    "generate_ids", "make_decoder", "sampling_distribution",
]
