"""Triton kernels over the paged KV pool: KV store, extend, split-K decode and cascade decode.

Each kernel runs compiled on CUDA tensors and under the Triton interpreter on CPU tensors
(see ``_dispatch``), whatever ``TRITON_INTERPRET`` was when this package was imported.
"""

from radixlm.model.attention.triton_kernels.cascade import (
    CascadeConfig,
    cascade_decode_attention,
    default_cascade_config,
    prefix_attention,
)
from radixlm.model.attention.triton_kernels.decode import (
    DecodeConfig,
    DecodeScratch,
    PrefixPartials,
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
    "CascadeConfig",
    "DecodeConfig",
    "DecodeScratch",
    "ExtendConfig",
    "NARROW_EXTEND",
    "PrefixPartials",
    "WIDE_EXTEND",
    "cascade_decode_attention",
    "choose_num_splits",
    "decode_attention",
    "default_cascade_config",
    "default_decode_config",
    "default_extend_config",
    "extend_attention",
    "prefix_attention",
    "store_kv",
]
