"""TritonAttentionBackend against TorchAttentionBackend through ForwardBatch and KVPool, and the
backend factory. On CPU the Triton kernels run under the interpreter."""

from __future__ import annotations

import pytest
import torch

from radixlm.batch import ForwardBatch, ForwardMode
from radixlm.kvcache.pool import KVPool
from radixlm.model.attention import (
    BACKEND_NAMES,
    TorchAttentionBackend,
    TritonAttentionBackend,
    create_attention_backend,
)

KV_HEADS, Q_HEADS, HEAD_DIM, PAGE = 2, 4, 16, 4


def make_pool(device: str, dtype: torch.dtype = torch.float32) -> KVPool:
    return KVPool(2, KV_HEADS, HEAD_DIM, num_pages=40, page_size=PAGE, dtype=dtype, device=device)


def shuffled_slots(lengths: list[int], pool: KVPool, gen: torch.Generator) -> list[list[int]]:
    """Whole pages per sequence, handed out in random order, skipping the scratch page."""
    pages = (torch.randperm(pool.num_pages, generator=gen) + 1).tolist()
    slots = []
    for n in lengths:
        mine = [pages.pop() for _ in range(-(-n // PAGE))]
        slots.append([p * PAGE + i for p in mine for i in range(PAGE)][:n])
    return slots


def run_layers(backend, batch, pool, gen, dtype=torch.float32):
    """Two layers of attention on random q/k/v; returns each layer's output."""
    backend.prepare(batch)
    outs = []
    for layer in range(pool.num_layers):
        q, k, v = (
            torch.randn(batch.num_tokens, h, HEAD_DIM, generator=gen).to(pool.device, dtype)
            for h in (Q_HEADS, KV_HEADS, KV_HEADS)
        )
        outs.append(backend.forward(q, k, v, layer, batch, pool, HEAD_DIM**-0.5))
    return outs


def assert_same_step(batch_args, pools, backends, seed, tol=1e-5):
    device = pools[0].device
    batch = ForwardBatch.build(*batch_args, device=device)
    results = [run_layers(b, batch, p, torch.Generator().manual_seed(seed)) for b, p in
               zip(backends, pools)]  # fmt: skip
    for ours, ref in zip(*results):
        assert ((ours - ref).norm() / ref.norm()).item() < tol
    for layer in range(pools[0].num_layers):
        assert torch.equal(pools[0].k(layer), pools[1].k(layer))
        assert torch.equal(pools[0].v(layer), pools[1].v(layer))
    return batch


@pytest.mark.parametrize("window", [None, 5])
def test_prefill_then_cached_prefix_then_decode_match_torch(window):
    gen = torch.Generator().manual_seed(0)
    pools = [make_pool("cpu"), make_pool("cpu")]
    backends = [TritonAttentionBackend("cpu", sliding_window=window),
                TorchAttentionBackend(sliding_window=window)]  # fmt: skip
    prompt_lens, chunk_lens = [9, 1, 17], [6, 11, 1]
    slots = shuffled_slots([p + c + 2 for p, c in zip(prompt_lens, chunk_lens)], pools[0], gen)
    toks = lambda n: [1] * n  # noqa: E731 (token ids do not reach attention)
    prefill = [s[:p] for s, p in zip(slots, prompt_lens)]
    assert_same_step(([toks(p) for p in prompt_lens], prefill), pools, backends, seed=1)
    # Second chunk: the prompt's slots are a cached prefix, only the chunk is new.
    chunk = [s[: p + c] for s, p, c in zip(slots, prompt_lens, chunk_lens)]
    batch = assert_same_step(([toks(c) for c in chunk_lens], chunk), pools, backends, seed=2)
    assert batch.mode is ForwardMode.EXTEND
    for step in (1, 2):
        full = [s[: p + c + step] for s, p, c in zip(slots, prompt_lens, chunk_lens)]
        batch = assert_same_step(([[1]] * 3, full), pools, backends, seed=2 + step)
        assert batch.mode is ForwardMode.DECODE


def test_decode_scratch_is_shared_by_layers_and_batches():
    gen = torch.Generator().manual_seed(5)
    pool, backend = make_pool("cpu"), TritonAttentionBackend("cpu")
    slots = shuffled_slots([20, 3], pool, gen)
    buffers = backend.decode_scratch.views(2, Q_HEADS, KV_HEADS, 8, HEAD_DIM)
    ptrs = [t.data_ptr() for t in buffers]
    for seqs in (slots, slots[:1]):
        batch = ForwardBatch.build([[1]] * len(seqs), seqs, device="cpu")
        ref = run_layers(TorchAttentionBackend(), batch, pool, torch.Generator().manual_seed(1))
        ours = run_layers(backend, batch, pool, torch.Generator().manual_seed(1))
        assert all(((o - r).norm() / r.norm()).item() < 1e-5 for o, r in zip(ours, ref))
    again = backend.decode_scratch.views(2, Q_HEADS, KV_HEADS, 8, HEAD_DIM)
    assert [t.data_ptr() for t in again] == ptrs


def test_factory_picks_by_name_and_device():
    assert isinstance(create_attention_backend("auto", torch.device("cpu")), TorchAttentionBackend)
    assert isinstance(
        create_attention_backend("auto", torch.device("cuda")), TritonAttentionBackend
    )
    assert isinstance(create_attention_backend("torch", "cuda"), TorchAttentionBackend)
    assert isinstance(create_attention_backend("triton", "cpu"), TritonAttentionBackend)
    backend = create_attention_backend("triton", "cpu", sliding_window=7)
    assert backend.sliding_window == 7


def test_factory_rejects_unknown_names_listing_the_choices():
    with pytest.raises(ValueError) as err:
        create_attention_backend("flashinfer", torch.device("cpu"))
    assert all(name in str(err.value) for name in BACKEND_NAMES)


@pytest.mark.gpu
def test_gpu_backend_matches_torch_in_bfloat16():
    gen = torch.Generator().manual_seed(6)
    pools = [make_pool("cuda", torch.bfloat16), make_pool("cuda", torch.bfloat16)]
    backends = [TritonAttentionBackend("cuda"), TorchAttentionBackend()]
    slots = shuffled_slots([30, 50, 7], pools[0], gen)
    prefill = [s[:-1] for s in slots]
    batch = ForwardBatch.build([[1] * len(s) for s in prefill], prefill, device="cuda")
    outs = [run_layers(b, batch, p, torch.Generator().manual_seed(1), torch.bfloat16)
            for b, p in zip(backends, pools)]  # fmt: skip
    for ours, ref in zip(*outs):
        assert ((ours.float() - ref.float()).norm() / ref.float().norm()).item() < 2e-2


@pytest.mark.gpu
def test_gpu_decode_replays_in_a_cuda_graph_for_other_lengths():
    """The decode launch depends on shapes only: a graph captured at one set of lengths is right
    when replayed after the lengths (not the batch size) changed."""
    gen = torch.Generator().manual_seed(7)
    pool, backend = make_pool("cuda"), TritonAttentionBackend("cuda")
    for layer in range(pool.num_layers):
        pool.k(layer).normal_()
        pool.v(layer).normal_()
    slots = shuffled_slots([48, 48, 48], pool, gen)  # 36 of the pool's 40 pages
    batch = ForwardBatch.build([[1]] * 3, [s[:30] for s in slots], device="cuda")
    q = torch.randn(3, Q_HEADS, HEAD_DIM, device="cuda")
    kv_indices = torch.zeros(144, dtype=torch.int64, device="cuda")
    kv_indices[:90] = batch.kv_indices
    batch.kv_indices = kv_indices
    backend.prepare(batch)
    backend.decode(q, 0, batch, pool, 0.25)  # warm-up: compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = backend.decode(q, 0, batch, pool, 0.25)
    lengths = [48, 2, 33]
    new = ForwardBatch.build([[1]] * 3, [s[:n] for s, n in zip(slots, lengths)], device="cuda")
    batch.kv_indptr.copy_(new.kv_indptr)
    batch.kv_indices[: sum(lengths)].copy_(new.kv_indices)
    graph.replay()
    ref = TorchAttentionBackend().decode(q, 0, new, pool, 0.25)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5


def test_spliced_tokens_as_decode_rows_match_an_extend():
    """A DECODE batch whose sequences bring several tokens (jump-forward) runs them as one
    decode row each: the Triton decode kernel's output equals torch's EXTEND of the same tokens,
    and both pools end up holding the same K/V."""
    gen = torch.Generator().manual_seed(11)
    pools = [make_pool("cpu"), make_pool("cpu")]
    backends = [TritonAttentionBackend("cpu"), TorchAttentionBackend()]
    prompt_lens, splice = [9, 4, 13], [3, 1, 5]
    slots = shuffled_slots([p + s for p, s in zip(prompt_lens, splice)], pools[0], gen)
    prefill = [s[:p] for s, p in zip(slots, prompt_lens)]
    assert_same_step(([[1] * p for p in prompt_lens], prefill), pools, backends, seed=1)
    tokens = [[1] * n for n in splice]
    decode_rows = ForwardBatch.build(tokens, slots, mode=ForwardMode.DECODE)
    extend = ForwardBatch.build(tokens, slots, mode=ForwardMode.EXTEND)
    assert decode_rows.batch_size == sum(splice) and decode_rows.extend_lens_cpu == [1] * 9
    ours = run_layers(backends[0], decode_rows, pools[0], torch.Generator().manual_seed(2))
    ref = run_layers(backends[1], extend, pools[1], torch.Generator().manual_seed(2))
    for o, r in zip(ours, ref):
        assert ((o - r).norm() / r.norm()).item() < 1e-5
    for layer in range(pools[0].num_layers):
        assert torch.equal(pools[0].k(layer), pools[1].k(layer))
