"""Triton kernels over the paged KV pool: KV store, extend, and split-K decode.

Each kernel runs compiled on CUDA tensors and under the Triton interpreter on CPU tensors
(see ``_dispatch``), whatever ``TRITON_INTERPRET`` was when this package was imported.
"""

from radixlm.model.attention.triton_kernels.decode import (
    DecodeConfig,
    DecodeScratch,
    choose_num_splits,
    decode_attention,
    default_decode_config,
)
from radixlm.model.attention.triton_kernels.extend import (
    NARROW_EXTEND,
    WIDE_EXTEND,
    ExtendConfig,
    default_extend_config,
    extend_attention,
)
from radixlm.model.attention.triton_kernels.kv_store import store_kv

__all__ = [
    "DecodeConfig",
    "DecodeScratch",
    "ExtendConfig",
    "NARROW_EXTEND",
    "WIDE_EXTEND",
    "choose_num_splits",
    "decode_attention",
    "default_decode_config",
    "default_extend_config",
    "extend_attention",
    "store_kv",
]
