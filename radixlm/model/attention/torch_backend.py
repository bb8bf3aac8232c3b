"""The torch reference attention backend: gathers each sequence's slots and attends densely.

Correctness first: scores, softmax and the weighted sum run in float32 whatever the pool dtype,
one sequence at a time. It runs anywhere torch runs and is what the Triton kernels are tested
against.
"""

from __future__ import annotations

import torch

from radixlm.batch import ForwardBatch
from radixlm.kvcache.pool import KVPool
from radixlm.model.attention.base import AttentionBackend


class TorchAttentionBackend(AttentionBackend):
    """Reference paged attention over the KV pool.

    Args:
        sliding_window: if set, a token at absolute position p sees only positions
            (p - sliding_window, p] (Mistral's window, as transformers applies it).
    """

    def __init__(self, sliding_window: int | None = None):
        self.sliding_window = sliding_window
        self._offsets_for: ForwardBatch | None = None
        self._offsets: tuple[list[int], list[int]] = ([0], [0])

    def prepare(self, batch: ForwardBatch) -> None:
        """Host-side CSR offsets, from the batch's CPU lengths (no device sync)."""
        self._offsets_for = batch
        self._offsets = (_cumsum(batch.extend_lens_cpu), _cumsum(batch.seq_lens_cpu))

    def store_kv(
        self, k: torch.Tensor, v: torch.Tensor, layer_id: int, loc: torch.Tensor, pool: KVPool
    ) -> None:
        """Write K/V rows [T, kv_heads, head_dim] into pool slots ``loc`` [T]."""
        pool.k(layer_id)[loc] = k.to(pool.dtype)
        pool.v(layer_id)[loc] = v.to(pool.dtype)

    def extend(
        self, q: torch.Tensor, layer_id: int, batch: ForwardBatch, pool: KVPool, scale: float
    ) -> torch.Tensor:
        """Each sequence's new tokens attend causally to its prefix and to themselves."""
        return self._attend_all(q, layer_id, batch, pool, scale)

    def decode(
        self, q: torch.Tensor, layer_id: int, batch: ForwardBatch, pool: KVPool, scale: float
    ) -> torch.Tensor:
        """One new token per sequence attends to the whole sequence."""
        return self._attend_all(q, layer_id, batch, pool, scale)

    def _attend_all(
        self, q: torch.Tensor, layer_id: int, batch: ForwardBatch, pool: KVPool, scale: float
    ) -> torch.Tensor:
        if self._offsets_for is not batch:
            self.prepare(batch)
        qo_ptr, kv_ptr = self._offsets
        out = torch.empty_like(q)
        k_buf, v_buf = pool.k(layer_id), pool.v(layer_id)
        for i in range(batch.batch_size):
            slots = batch.kv_indices[kv_ptr[i] : kv_ptr[i + 1]]
            rows = slice(qo_ptr[i], qo_ptr[i + 1])
            out[rows] = self._attend_one(q[rows], k_buf[slots], v_buf[slots], scale)
        return out

    def _attend_one(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """q [n, H, D] (the last n tokens of the sequence), k/v [S, KH, D] -> [n, H, D]."""
        n, num_heads, head_dim = q.shape
        seq_len, num_kv_heads = k.shape[0], k.shape[1]
        group = num_heads // num_kv_heads
        # [KH, group, n, D] x [KH, D, S]: each kv head serves `group` consecutive q heads.
        qg = q.float().view(n, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
        scores = torch.matmul(qg, k.float().permute(1, 2, 0).unsqueeze(1)) * scale
        scores = scores.masked_fill(~self._mask(n, seq_len, q.device), float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out = torch.matmul(probs, v.float().permute(1, 0, 2).unsqueeze(1))
        return out.permute(2, 0, 1, 3).reshape(n, num_heads, head_dim).to(q.dtype)

    def _mask(self, n: int, seq_len: int, device: torch.device) -> torch.Tensor:
        """[n, S] True where new token j (absolute position S - n + j) may see position s."""
        query_pos = torch.arange(seq_len - n, seq_len, device=device)[:, None]
        key_pos = torch.arange(seq_len, device=device)[None, :]
        visible = key_pos <= query_pos
        if self.sliding_window is not None:
            visible &= key_pos > query_pos - self.sliding_window
        return visible


def _cumsum(values: list[int]) -> list[int]:
    out = [0]
    for v in values:
        out.append(out[-1] + v)
    return out
