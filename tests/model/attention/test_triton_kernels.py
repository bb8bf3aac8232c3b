"""Triton KV-store / extend / decode kernels against a float64 torch reference.

CPU tensors run the kernels under the Triton interpreter (whatever TRITON_INTERPRET was when
triton was imported: see radixlm/model/attention/triton_kernels/_dispatch.py), at tiny sizes.
The tests marked ``gpu`` run the compiled kernels at a Llama-3-8B attention shape in bf16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import pytest
import torch
from triton.runtime.interpreter import InterpretedFunction

from radixlm.model.attention.triton_kernels import (
    DecodeConfig,
    DecodeScratch,
    ExtendConfig,
    decode_attention,
    default_decode_config,
    extend_attention,
    store_kv,
)
from radixlm.model.attention.triton_kernels.kv_store import STORE_KV_KERNEL

NUM_KV_HEADS = 2


@dataclass
class PagedLayout:
    """Where each sequence's tokens live in a pool of shuffled, non-contiguous pages."""

    seq_slots: list[torch.Tensor]
    extend_lens: list[int]
    num_slots: int

    @property
    def seq_lens(self) -> list[int]:
        return [len(s) for s in self.seq_slots]

    def kv_indptr(self, device: torch.device) -> torch.Tensor:
        return _indptr(self.seq_lens, device)

    def qo_indptr(self, device: torch.device) -> torch.Tensor:
        return _indptr(self.extend_lens, device)

    def kv_indices(self, device: torch.device) -> torch.Tensor:
        return torch.cat(self.seq_slots).to(device)

    def new_slots(self, device: torch.device) -> torch.Tensor:
        new = [s[len(s) - n :] for s, n in zip(self.seq_slots, self.extend_lens)]
        return torch.cat(new).to(device)


def _indptr(lengths: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32).to(
        device
    )


def make_layout(
    seq_lens: list[int], extend_lens: list[int], page_size: int, gen: torch.Generator
) -> PagedLayout:
    """Give each sequence whole pages drawn in random order from a pool with spare pages."""
    pages_per_seq = [math.ceil(n / page_size) for n in seq_lens]
    num_pages = sum(pages_per_seq) + 3
    # Page 0 is the pool's scratch page: never handed out.
    order = torch.randperm(num_pages, generator=gen) + 1
    seq_slots, used = [], 0
    for length, pages in zip(seq_lens, pages_per_seq):
        mine = order[used : used + pages]
        used += pages
        slots = (mine[:, None] * page_size + torch.arange(page_size)).flatten()[:length]
        seq_slots.append(slots.to(torch.int64))
    return PagedLayout(seq_slots, list(extend_lens), (num_pages + 1) * page_size)


def reference_attention(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    layout: PagedLayout,
    scale: float,
    window: int | None = None,
) -> torch.Tensor:
    """float64 attention, one sequence and one query token at a time, over gathered slots."""
    group = q.shape[1] // k_buf.shape[1]
    out, row = torch.empty(q.shape, dtype=torch.float64), 0
    for slots, n in zip(layout.seq_slots, layout.extend_lens):
        k = k_buf[slots.to(k_buf.device)].double().cpu().repeat_interleave(group, dim=1)
        v = v_buf[slots.to(v_buf.device)].double().cpu().repeat_interleave(group, dim=1)
        for j in range(n):
            pos = len(slots) - n + j
            lo = 0 if window is None else max(0, pos - window + 1)
            qj = q[row].double().cpu()
            scores = torch.einsum("hd,shd->hs", qj, k[lo : pos + 1]) * scale
            out[row] = torch.einsum("hs,shd->hd", scores.softmax(-1), v[lo : pos + 1])
            row += 1
    return out


def random_pool(num_slots: int, head_dim: int, dtype: torch.dtype, device, gen):
    shape = (num_slots, NUM_KV_HEADS, head_dim)
    k = torch.randn(shape, generator=gen).to(device, dtype)
    v = torch.randn(shape, generator=gen).to(device, dtype)
    return k, v


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double().cpu() - ref).norm() / ref.norm()).item()


# ---------------------------------------------------------------------------------- CPU


def test_cpu_tensors_run_under_the_interpreter():
    assert isinstance(STORE_KV_KERNEL.on(torch.device("cpu")), InterpretedFunction)


@pytest.mark.parametrize("head_dim", [16, 24])
def test_store_kv_writes_only_the_given_slots(head_dim):
    gen = torch.Generator().manual_seed(1)
    k_buf, v_buf = random_pool(40, head_dim, torch.float32, "cpu", gen)
    before_k, before_v = k_buf.clone(), v_buf.clone()
    loc = torch.randperm(40, generator=gen)[:7]
    # Strided rows, as when K and V are column slices of one fused QKV projection.
    fused = torch.randn(7, 3 * NUM_KV_HEADS * head_dim, generator=gen)
    k = fused[:, : NUM_KV_HEADS * head_dim].view(7, NUM_KV_HEADS, head_dim)
    v = fused[:, NUM_KV_HEADS * head_dim : 2 * NUM_KV_HEADS * head_dim].view(
        7, NUM_KV_HEADS, head_dim
    )
    store_kv(k, v, k_buf, v_buf, loc)
    assert torch.equal(k_buf[loc], k) and torch.equal(v_buf[loc], v)
    untouched = torch.ones(40, dtype=torch.bool)
    untouched[loc] = False
    assert torch.equal(k_buf[untouched], before_k[untouched])
    assert torch.equal(v_buf[untouched], before_v[untouched])


def test_store_kv_casts_to_the_pool_dtype():
    gen = torch.Generator().manual_seed(2)
    k_buf, v_buf = random_pool(16, 16, torch.bfloat16, "cpu", gen)
    k, v = (torch.randn(5, NUM_KV_HEADS, 16, generator=gen) for _ in range(2))
    loc = torch.tensor([3, 9, 1, 15, 4])
    store_kv(k, v, k_buf, v_buf, loc)
    assert torch.equal(k_buf[loc], k.bfloat16()) and torch.equal(v_buf[loc], v.bfloat16())


def run_extend(layout, group, head_dim, dtype, device, gen, window=None, config=None):
    k_buf, v_buf = random_pool(layout.num_slots, head_dim, dtype, device, gen)
    total = sum(layout.extend_lens)
    q = torch.randn(total, NUM_KV_HEADS * group, head_dim, generator=gen).to(device, dtype)
    out = torch.full_like(q, float("nan"))
    scale = head_dim**-0.5
    extend_attention(
        q, k_buf, v_buf, layout.qo_indptr(device), layout.kv_indptr(device),
        layout.kv_indices(device), max(layout.extend_lens), scale, out=out, config=config,
        sliding_window=window,
    )  # fmt: skip
    return out, reference_attention(q, k_buf, v_buf, layout, scale, window)


# Prefixes of 0, short, crossing a KV block, and long; new tokens of 1 up to several row blocks.
EXTEND_PREFIXES = [0, 5, 19, 33]
EXTEND_NEW = [7, 1, 12, 20]


# Every page size x GQA ratio at head_dim 16, and one case at head_dim 64 (interpreter time).
SHAPES = [(p, g, 16) for p in (1, 4) for g in (1, 2, 4)] + [(4, 4, 64)]


@pytest.mark.parametrize(("page_size", "group", "head_dim"), SHAPES)
def test_extend_matches_reference(page_size, group, head_dim):
    gen = torch.Generator().manual_seed(100 * page_size + 10 * group + head_dim)
    seq_lens = [p + n for p, n in zip(EXTEND_PREFIXES, EXTEND_NEW)]
    layout = make_layout(seq_lens, EXTEND_NEW, page_size, gen)
    out, ref = run_extend(layout, group, head_dim, torch.float32, "cpu", gen)
    assert not out.isnan().any()
    assert rel_err(out, ref) < 1e-5


def test_extend_pads_a_head_dim_that_is_not_a_power_of_two():
    gen = torch.Generator().manual_seed(7)
    layout = make_layout([9, 30], [9, 11], 4, gen)
    out, ref = run_extend(layout, 2, 24, torch.float32, "cpu", gen)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_extend_in_half_precision(dtype):
    gen = torch.Generator().manual_seed(8)
    layout = make_layout([12, 40], [12, 9], 4, gen)
    out, ref = run_extend(layout, 4, 64, dtype, "cpu", gen)
    assert rel_err(out, ref) < 2e-2


@pytest.mark.parametrize("window", [1, 6, 20])
def test_extend_with_a_sliding_window(window):
    gen = torch.Generator().manual_seed(window)
    layout = make_layout([40, 25, 7], [18, 1, 7], 1, gen)
    out, ref = run_extend(layout, 2, 16, torch.float32, "cpu", gen, window=window)
    assert rel_err(out, ref) < 1e-5


def test_extend_with_wider_tiles_than_the_cpu_default():
    gen = torch.Generator().manual_seed(9)
    layout = make_layout([70, 33], [40, 33], 4, gen)
    config = ExtendConfig(block_rows=32, block_n=32, num_warps=1, num_stages=1)
    out, ref = run_extend(layout, 2, 16, torch.float32, "cpu", gen, config=config)
    assert rel_err(out, ref) < 1e-5


def run_decode(seq_lens, page_size, group, head_dim, dtype, device, gen, **kwargs):
    layout = make_layout(seq_lens, [1] * len(seq_lens), page_size, gen)
    k_buf, v_buf = random_pool(layout.num_slots, head_dim, dtype, device, gen)
    q = torch.randn(len(seq_lens), NUM_KV_HEADS * group, head_dim, generator=gen).to(device, dtype)
    out = torch.full_like(q, float("nan"))
    scale = head_dim**-0.5
    decode_attention(
        q, k_buf, v_buf, layout.kv_indptr(device), layout.kv_indices(device), scale, out=out,
        **kwargs,
    )  # fmt: skip
    return out, reference_attention(q, k_buf, v_buf, layout, scale, kwargs.get("sliding_window"))


# With the CPU config (16-token blocks and splits of >= 16), 4 splits of a 130-token sequence
# are 48 long (3 used); a 1- or 15-token sequence fits in one.
DECODE_LENS = [1, 15, 16, 17, 70, 130]


@pytest.mark.parametrize(("page_size", "group", "head_dim"), SHAPES)
def test_decode_matches_reference(page_size, group, head_dim):
    gen = torch.Generator().manual_seed(200 * page_size + 10 * group + head_dim)
    out, ref = run_decode(DECODE_LENS, page_size, group, head_dim, torch.float32, "cpu", gen,
                          num_splits=4)  # fmt: skip
    assert not out.isnan().any()
    assert rel_err(out, ref) < 1e-5


CPU_FUSED = replace(default_decode_config(torch.device("cpu")), fused_merge=True)
CPU_TWO_LAUNCHES = replace(CPU_FUSED, fused_merge=False)


@pytest.mark.parametrize("num_splits", [1, 2, 8, None])
@pytest.mark.parametrize("fused", [False, True])
def test_decode_any_split_count(num_splits, fused):
    gen = torch.Generator().manual_seed(300 + (num_splits or 0))
    config = CPU_FUSED if fused else CPU_TWO_LAUNCHES
    out, ref = run_decode(DECODE_LENS, 4, 2, 16, torch.float32, "cpu", gen, num_splits=num_splits,
                          config=config)  # fmt: skip
    assert rel_err(out, ref) < 1e-5


def test_fused_merge_leaves_its_counters_at_zero_for_the_next_launch():
    gen = torch.Generator().manual_seed(301)
    layout = make_layout(DECODE_LENS, [1] * len(DECODE_LENS), 4, gen)
    k_buf, v_buf = random_pool(layout.num_slots, 16, torch.float32, "cpu", gen)
    scratch = DecodeScratch("cpu")
    for _ in range(2):
        q = torch.randn(len(DECODE_LENS), 4, 16, generator=gen)
        out = decode_attention(q, k_buf, v_buf, layout.kv_indptr("cpu"), layout.kv_indices("cpu"),
                               0.25, num_splits=4, scratch=scratch, config=CPU_FUSED)  # fmt: skip
        assert rel_err(out, reference_attention(q, k_buf, v_buf, layout, 0.25)) < 1e-5
        counters = scratch.views(len(DECODE_LENS), 4, NUM_KV_HEADS, 4, 16)[2]
        assert not counters.any()


def test_decode_scratch_grows_and_keeps_its_buffers_for_smaller_shapes():
    scratch = DecodeScratch("cpu")
    big = scratch.views(8, 4, 2, 4, 16)
    small = scratch.views(2, 4, 2, 1, 16)
    assert [t.shape for t in small] == [(2, 4, 1, 16), (2, 4, 1), (2, 2)]
    assert all(s.data_ptr() == b.data_ptr() for s, b in zip(small, big))
    bigger = scratch.views(16, 4, 2, 4, 16)
    assert bigger[0].data_ptr() != big[0].data_ptr()


def test_decode_many_short_splits():
    gen = torch.Generator().manual_seed(11)
    config = DecodeConfig(block_n=16, min_split_len=16, num_warps=1, num_stages=1)
    out, ref = run_decode([200, 3], 1, 4, 16, torch.float32, "cpu", gen, num_splits=16,
                          config=config)  # fmt: skip
    assert rel_err(out, ref) < 1e-5


def test_decode_pads_a_head_dim_that_is_not_a_power_of_two():
    gen = torch.Generator().manual_seed(12)
    out, ref = run_decode([5, 50], 4, 2, 24, torch.float32, "cpu", gen, num_splits=2)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_in_half_precision(dtype):
    gen = torch.Generator().manual_seed(13)
    out, ref = run_decode([9, 100], 4, 4, 64, dtype, "cpu", gen, num_splits=4)
    assert rel_err(out, ref) < 2e-2


@pytest.mark.parametrize("window", [1, 20, 64])
def test_decode_with_a_sliding_window(window):
    gen = torch.Generator().manual_seed(14 + window)
    out, ref = run_decode([130, 10, 40], 1, 2, 16, torch.float32, "cpu", gen, num_splits=4,
                          sliding_window=window)  # fmt: skip
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("fused", [False, True])
def test_decode_of_an_empty_padded_row_writes_zeros(fused):
    gen = torch.Generator().manual_seed(15)
    k_buf, v_buf = random_pool(8, 16, torch.float32, "cpu", gen)
    q = torch.randn(2, 2, 16, generator=gen)
    kv_indptr = torch.tensor([0, 3, 3], dtype=torch.int32)
    out = torch.full_like(q, float("nan"))
    decode_attention(q, k_buf, v_buf, kv_indptr, torch.tensor([4, 5, 6]), 0.25, num_splits=2,
                     out=out, config=CPU_FUSED if fused else CPU_TWO_LAUNCHES)  # fmt: skip
    assert torch.equal(out[1], torch.zeros(2, 16))


# ---------------------------------------------------------------------------------- GPU

LLAMA3_GROUP, LLAMA3_HEAD_DIM = 4, 128  # 8 KV heads in the model; 2 here keep the pool small


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_extend_realistic(dtype):
    gen = torch.Generator().manual_seed(21)
    prefixes, new = [0, 100, 1000, 3000, 17, 0], [1, 37, 512, 1000, 300, 2048]
    layout = make_layout([p + n for p, n in zip(prefixes, new)], new, 16, gen)
    out, ref = run_extend(layout, LLAMA3_GROUP, LLAMA3_HEAD_DIM, dtype, "cuda", gen)
    assert not out.isnan().any()
    assert rel_err(out, ref) < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_extend_float32_is_exact(head_dim):
    # head_dim 128 (Llama-3-8B) in float32 once asked for more shared memory than an H200 has
    gen = torch.Generator().manual_seed(22)
    layout = make_layout([300, 129], [200, 129], 1, gen)
    out, ref = run_extend(layout, 2, head_dim, torch.float32, "cuda", gen)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.gpu
def test_gpu_extend_sliding_window():
    gen = torch.Generator().manual_seed(23)
    layout = make_layout([1500, 300], [700, 300], 16, gen)
    out, ref = run_extend(layout, 4, 128, torch.bfloat16, "cuda", gen, window=256)
    assert rel_err(out, ref) < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("fused", [False, True])
def test_gpu_decode_realistic(page_size, fused):
    gen = torch.Generator().manual_seed(24 + page_size)
    lens = [1, 7, 64, 255, 256, 257, 1000, 4097, 8192, 3]
    config = replace(default_decode_config(torch.device("cuda")), fused_merge=fused)
    scratch = DecodeScratch("cuda")
    # Repeated launches on one scratch: a race in the fused merge would show as a moving error.
    for _ in range(3):
        out, ref = run_decode(lens, page_size, LLAMA3_GROUP, LLAMA3_HEAD_DIM, torch.bfloat16,
                              "cuda", gen, scratch=scratch, config=config)  # fmt: skip
        assert not out.isnan().any()
        assert rel_err(out, ref) < 2e-2


@pytest.mark.gpu
def test_gpu_decode_float32_and_window():
    gen = torch.Generator().manual_seed(26)
    out, ref = run_decode([5000, 33], 1, 2, 64, torch.float32, "cuda", gen)
    assert rel_err(out, ref) < 1e-5
    out, ref = run_decode([5000, 33], 16, 4, 128, torch.bfloat16, "cuda", gen, sliding_window=700)
    assert rel_err(out, ref) < 2e-2


@pytest.mark.gpu
def test_gpu_store_kv_realistic():
    gen = torch.Generator().manual_seed(27)
    k_buf, v_buf = random_pool(5000, 128, torch.bfloat16, "cuda", gen)
    loc = torch.randperm(5000, generator=gen)[:3000].cuda()
    k, v = (torch.randn(3000, NUM_KV_HEADS, 128, generator=gen).cuda().bfloat16() for _ in "kv")
    store_kv(k, v, k_buf, v_buf, loc)
    assert torch.equal(k_buf[loc], k) and torch.equal(v_buf[loc], v)
