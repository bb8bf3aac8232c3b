"""The torch reference backend against a dense oracle (scaled_dot_product_attention on each
sequence's contiguous K/V with an explicit mask)."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from radixlm.batch import ForwardBatch
from radixlm.kvcache.pool import KVPool
from radixlm.model.attention import torch_backend
from radixlm.model.attention.torch_backend import TorchAttentionBackend

HEADS, KV_HEADS, DIM = 8, 2, 16


def oracle(q, k, v, prefix_len: int, scale: float, window: int | None) -> torch.Tensor:
    """q [n, H, D] for positions prefix_len.., k/v [S, KH, D] contiguous, float64 math."""
    n, seq = q.shape[0], k.shape[0]
    group = HEADS // KV_HEADS
    kk = k.double().repeat_interleave(group, dim=1).transpose(0, 1)
    vv = v.double().repeat_interleave(group, dim=1).transpose(0, 1)
    qpos = torch.arange(prefix_len, prefix_len + n)[:, None]
    kpos = torch.arange(seq)[None, :]
    mask = kpos <= qpos
    if window is not None:
        mask &= kpos > qpos - window
    out = F.scaled_dot_product_attention(q.double().transpose(0, 1), kk, vv, mask, scale=scale)
    return out.transpose(0, 1)


def scenario(prefix_lens: list[int], new_lens: list[int], dtype=torch.float32, seed: int = 0):
    """A pool whose prefixes are already filled, and the new tokens' q/k/v."""
    gen = torch.Generator().manual_seed(seed)
    pool = KVPool(1, KV_HEADS, DIM, 256, 1, dtype, "cpu")
    free = list(range(pool.first_usable_slot, pool.first_usable_slot + 256))
    random.Random(seed).shuffle(free)
    seq_k, seq_v, slots = [], [], []
    for p, n in zip(prefix_lens, new_lens):
        seq_k.append(torch.randn(p + n, KV_HEADS, DIM, generator=gen).to(dtype))
        seq_v.append(torch.randn(p + n, KV_HEADS, DIM, generator=gen).to(dtype))
        slots.append(free[: p + n])
        free = free[p + n :]
        pool.k(0)[slots[-1][:p]] = seq_k[-1][:p]
        pool.v(0)[slots[-1][:p]] = seq_v[-1][:p]
    tokens = [[0] * n for n in new_lens]
    batch = ForwardBatch.build(tokens, slots, logits_rows=[list(range(n)) for n in new_lens])
    q = torch.randn(sum(new_lens), HEADS, DIM, generator=gen).to(dtype)
    k_new = torch.cat([k[p:] for k, p in zip(seq_k, prefix_lens)])
    v_new = torch.cat([v[p:] for v, p in zip(seq_v, prefix_lens)])
    return pool, batch, q, k_new, v_new, seq_k, seq_v


def expected_output(q, seq_k, seq_v, prefix_lens, new_lens, scale, window=None):
    outs, start = [], 0
    for k, v, p, n in zip(seq_k, seq_v, prefix_lens, new_lens):
        outs.append(oracle(q[start : start + n], k, v, p, scale, window))
        start += n
    return torch.cat(outs)


@pytest.mark.parametrize("window", [None, 4])
def test_extend_with_prefixes_matches_dense_oracle(window):
    prefix_lens, new_lens = [0, 7, 3, 12], [5, 4, 1, 9]
    pool, batch, q, k, v, seq_k, seq_v = scenario(prefix_lens, new_lens)
    out = TorchAttentionBackend(sliding_window=window).forward(q, k, v, 0, batch, pool, 0.25)
    want = expected_output(q, seq_k, seq_v, prefix_lens, new_lens, 0.25, window)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


def test_decode_matches_dense_oracle():
    prefix_lens, new_lens = [1, 30, 0, 9], [1, 1, 1, 1]
    pool, batch, q, k, v, seq_k, seq_v = scenario(prefix_lens, new_lens, seed=3)
    assert batch.mode.value == "decode"
    out = TorchAttentionBackend().forward(q, k, v, 0, batch, pool, DIM**-0.5)
    want = expected_output(q, seq_k, seq_v, prefix_lens, new_lens, DIM**-0.5)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


def test_store_kv_writes_exactly_the_given_slots():
    pool = KVPool(2, KV_HEADS, DIM, 32, 4, torch.float32, "cpu")
    loc = torch.tensor([9, 4, 31])
    k, v = torch.randn(3, KV_HEADS, DIM), torch.randn(3, KV_HEADS, DIM)
    TorchAttentionBackend().store_kv(k, v, 1, loc, pool)
    assert torch.equal(pool.k(1)[loc], k) and torch.equal(pool.v(1)[loc], v)
    untouched = torch.ones(pool.k(1).shape[0], dtype=torch.bool)
    untouched[loc] = False
    assert not pool.k(1)[untouched].any() and not pool.k(0).any()


def test_bfloat16_pool_computes_in_float32():
    prefix_lens, new_lens = [6, 2], [3, 1]
    pool, batch, q, k, v, seq_k, seq_v = scenario(prefix_lens, new_lens, torch.bfloat16, seed=5)
    out = TorchAttentionBackend().forward(q, k, v, 0, batch, pool, 0.3)
    assert out.dtype == torch.bfloat16
    want = expected_output(q, seq_k, seq_v, prefix_lens, new_lens, 0.3)
    # Inputs are exact bf16 values; only the final cast to bf16 rounds.
    torch.testing.assert_close(out.double(), want, rtol=8e-3, atol=8e-3)


@pytest.mark.parametrize("window", [None, 5])
def test_mixed_lengths_split_into_groups_match_oracle(window, monkeypatch):
    # One long prefill beside short decodes and short extends: several padded groups (no
    # slack, so a batch this small splits as a large one would).
    monkeypatch.setattr(torch_backend, "PAD_WASTE_SLACK", 0)
    prefix_lens, new_lens = [0, 40, 3, 0, 90], [60, 1, 2, 1, 1]
    pool, batch, q, k, v, seq_k, seq_v = scenario(prefix_lens, new_lens, seed=7)
    backend = TorchAttentionBackend(sliding_window=window)
    out = backend.forward(q, k, v, 0, batch, pool, 0.2)
    assert len(backend._groups) > 1
    want = expected_output(q, seq_k, seq_v, prefix_lens, new_lens, 0.2, window)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [None, 6])
def test_query_chunks_within_a_tiny_score_budget_match_oracle(window):
    # A budget of a few query rows forces chunking of every group, masks built per chunk.
    prefix_lens, new_lens = [10, 0, 5], [37, 50, 1]
    pool, batch, q, k, v, seq_k, seq_v = scenario(prefix_lens, new_lens, seed=11)
    backend = TorchAttentionBackend(sliding_window=window, score_budget_bytes=4096)
    out = backend.forward(q, k, v, 0, batch, pool, 0.3)
    want = expected_output(q, seq_k, seq_v, prefix_lens, new_lens, 0.3, window)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


def test_metadata_is_built_once_per_batch(monkeypatch):
    prefix_lens, new_lens = [4, 9], [1, 1]
    pool, batch, q, k, v, _, _ = scenario(prefix_lens, new_lens, seed=2)
    backend = TorchAttentionBackend()
    calls = []
    real_prepare = backend.prepare
    monkeypatch.setattr(backend, "prepare", lambda b: (calls.append(b), real_prepare(b)))
    first = backend.forward(q, k, v, 0, batch, pool, 0.5)
    second = backend.forward(q, k, v, 0, batch, pool, 0.5)
    assert len(calls) == 1 and torch.equal(first, second)
