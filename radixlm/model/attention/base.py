"""The attention backend interface shared by the torch reference and the Triton kernels."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from radixlm.batch import ForwardBatch, ForwardMode
from radixlm.kvcache.pool import KVPool


class AttentionBackend(ABC):
    """Stores new K/V into the pool, then attends over each sequence's slots.

    Shapes: ``q`` is [T, num_q_heads, head_dim]; ``k``/``v`` are [T, num_kv_heads, head_dim];
    the result is [T, num_q_heads, head_dim]. GQA: q head ``h`` reads kv head
    ``h // (num_q_heads // num_kv_heads)``.
    """

    def prepare(self, batch: ForwardBatch) -> None:  # noqa: B027 (optional hook)
        """Per-batch metadata, computed once before the layers run. Default: nothing."""

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer_id: int,
        batch: ForwardBatch,
        pool: KVPool,
        scale: float,
    ) -> torch.Tensor:
        self.store_kv(k, v, layer_id, batch.out_cache_loc, pool)
        if batch.mode is ForwardMode.DECODE:
            return self.decode(q, layer_id, batch, pool, scale)
        return self.extend(q, layer_id, batch, pool, scale)

    @abstractmethod
    def store_kv(
        self, k: torch.Tensor, v: torch.Tensor, layer_id: int, loc: torch.Tensor, pool: KVPool
    ) -> None:
        """Write K/V rows into their pool slots."""

    @abstractmethod
    def extend(
        self, q: torch.Tensor, layer_id: int, batch: ForwardBatch, pool: KVPool, scale: float
    ) -> torch.Tensor:
        """New tokens attend causally to their sequence's cached prefix and to themselves."""

    @abstractmethod
    def decode(
        self, q: torch.Tensor, layer_id: int, batch: ForwardBatch, pool: KVPool, scale: float
    ) -> torch.Tensor:
        """One new token per sequence attends to the whole sequence."""
