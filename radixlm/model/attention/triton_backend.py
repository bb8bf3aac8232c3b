"""The Triton attention backend: KV store, extend and split-K decode kernels on the paged pool."""

from __future__ import annotations

import torch

from radixlm.batch import ForwardBatch
from radixlm.kvcache.pool import KVPool
from radixlm.model.attention.base import AttentionBackend
from radixlm.model.attention.triton_kernels import (
    DecodeConfig,
    DecodeScratch,
    ExtendConfig,
    choose_num_splits,
    decode_attention,
    default_decode_config,
    extend_attention,
    store_kv,
)


class TritonAttentionBackend(AttentionBackend):
    """Attention through Triton kernels; on CPU tensors they run under the Triton interpreter.

    Per-layer calls never synchronize with the device: launch shapes come from tensor shapes and
    the batch's host-side lengths. Decode's split count depends only on the batch size and the
    KV head count, and its scratch buffers only grow, so a decode step can be captured in a CUDA
    graph (capture the largest batch first: see ``DecodeScratch``).

    Args:
        device: where the batches live (picks the default launch configs).
        sliding_window: if set, a token at position p sees only positions (p - window, p].
        extend_config: fixed launch shape of the extend kernel (default: by launch size).
        decode_config: override of the decode kernels' launch shape.
    """

    def __init__(
        self,
        device: torch.device | str = "cuda",
        sliding_window: int | None = None,
        extend_config: ExtendConfig | None = None,
        decode_config: DecodeConfig | None = None,
    ):
        self.device = torch.device(device)
        self.sliding_window = sliding_window
        # None: chosen per launch from its size (default_extend_config).
        self.extend_config = extend_config
        self.decode_config = decode_config or default_decode_config(self.device)
        self.decode_scratch = DecodeScratch(self.device)

    def store_kv(
        self, k: torch.Tensor, v: torch.Tensor, layer_id: int, loc: torch.Tensor, pool: KVPool
    ) -> None:
        """Write K/V rows into their pool slots (one kernel for both)."""
        k_scale, v_scale = pool.scales(layer_id)
        store_kv(k, v, pool.k(layer_id), pool.v(layer_id), loc, k_scale=k_scale, v_scale=v_scale)

    def extend(
        self, q: torch.Tensor, layer_id: int, batch: ForwardBatch, pool: KVPool, scale: float
    ) -> torch.Tensor:
        """Causal attention of the new tokens over prefix + themselves."""
        k_scale, v_scale = pool.scales(layer_id)
        return extend_attention(
            q, pool.k(layer_id), pool.v(layer_id), batch.qo_indptr, batch.kv_indptr,
            batch.kv_indices, batch.max_extend_len, scale, config=self.extend_config,
            sliding_window=self.sliding_window, k_scale=k_scale, v_scale=v_scale,
        )  # fmt: skip

    def decode(
        self, q: torch.Tensor, layer_id: int, batch: ForwardBatch, pool: KVPool, scale: float
    ) -> torch.Tensor:
        """One query per sequence over its whole sequence, split-K."""
        num_splits = choose_num_splits(q.shape[0], pool.num_kv_heads, self.decode_config)
        k_scale, v_scale = pool.scales(layer_id)
        return decode_attention(
            q, pool.k(layer_id), pool.v(layer_id), batch.kv_indptr, batch.kv_indices, scale,
            num_splits=num_splits, scratch=self.decode_scratch, config=self.decode_config,
            sliding_window=self.sliding_window, k_scale=k_scale, v_scale=v_scale,
        )  # fmt: skip
