"""Cascade (shared-prefix) decode attention against a float64 reference and the plain decode.

CPU tensors run the Triton kernels under the interpreter at tiny sizes, with the CPU launch
configs (16-row tiles, 16-token blocks and splits), so groups span several member chunks and
prefixes several splits. The tests marked ``gpu`` run the compiled kernels at Llama-3-8B
attention shapes in bf16 and float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from radixlm.batch import ForwardBatch
from radixlm.executor.cuda_graph import DecodeGraphRunner
from radixlm.kvcache.pool import KVPool
from radixlm.model.attention import TorchAttentionBackend, TritonAttentionBackend
from radixlm.model.attention.triton_kernels import (
    CascadeConfig,
    DecodeScratch,
    cascade_decode_attention,
    decode_attention,
    default_cascade_config,
)
from radixlm.prefix_groups import find_prefix_groups

NUM_KV_HEADS = 2


@dataclass
class GroupSpec:
    """``size`` sequences sharing ``shared`` slots, then each its own ``suffix`` slots."""

    size: int
    shared: int
    suffix: list[int] | None = None  # per member; default: varied lengths 1..


def make_slots(
    groups: list[GroupSpec], loners: list[int], page_size: int, gen: torch.Generator
) -> tuple[list[torch.Tensor], int]:
    """Shared prefixes on shared pages, every suffix on fresh pages, pages in random order.

    Returns:
        Per sequence its slots (groups first, member by member, then the loners), and the
        number of slots the pool needs.
    """
    lengths = [g.shared for g in groups]
    suffixes = [g.suffix or [1 + (7 * i) % 23 for i in range(g.size)] for g in groups]
    lengths += [n for s in suffixes for n in s] + loners
    num_pages = sum(math.ceil(n / page_size) for n in lengths) + 2
    pages = iter((torch.randperm(num_pages, generator=gen) + 1).tolist())  # page 0: scratch

    def fresh(n: int) -> torch.Tensor:
        mine = torch.tensor([next(pages) for _ in range(math.ceil(n / page_size))])
        return (mine[:, None] * page_size + torch.arange(page_size)).flatten()[:n]

    seqs = []
    for spec, suffix in zip(groups, suffixes):
        shared = fresh(spec.shared)
        seqs += [torch.cat([shared, fresh(n)]) for n in suffix]
    seqs += [fresh(n) for n in loners]
    return seqs, (num_pages + 1) * page_size


def reference_decode(q, k_buf, v_buf, seqs, scale) -> torch.Tensor:
    """float64 attention of each sequence's one query over all its slots."""
    group = q.shape[1] // k_buf.shape[1]
    out = torch.empty(q.shape, dtype=torch.float64)
    for row, slots in enumerate(seqs):
        k = k_buf[slots.to(k_buf.device)].double().cpu().repeat_interleave(group, dim=1)
        v = v_buf[slots.to(v_buf.device)].double().cpu().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,shd->hs", q[row].double().cpu(), k) * scale
        out[row] = torch.einsum("hs,shd->hd", scores.softmax(-1), v)
    return out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double().cpu() - ref.double().cpu()).norm() / ref.norm()).item()


@dataclass
class Case:
    q: torch.Tensor
    k_buf: torch.Tensor
    v_buf: torch.Tensor
    seqs: list[torch.Tensor]
    kv_indptr: torch.Tensor
    kv_indices: torch.Tensor
    scale: float


def make_case(groups, loners, page_size, group, head_dim, dtype, device, seed) -> Case:
    gen = torch.Generator().manual_seed(seed)
    seqs, num_slots = make_slots(groups, loners, page_size, gen)
    shape = (num_slots, NUM_KV_HEADS, head_dim)
    k_buf, v_buf = (torch.randn(shape, generator=gen).to(device, dtype) for _ in "kv")
    q = torch.randn(len(seqs), NUM_KV_HEADS * group, head_dim, generator=gen).to(device, dtype)
    lens = torch.tensor([len(s) for s in seqs])
    kv_indptr = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)]).int().to(device)
    return Case(q, k_buf, v_buf, seqs, kv_indptr, torch.cat(seqs).to(device), head_dim**-0.5)


def run_both(case: Case, min_shared: int, **kwargs) -> tuple[torch.Tensor, torch.Tensor, object]:
    """Cascade and plain decode outputs, and the groups the cascade used."""
    groups = find_prefix_groups(case.seqs, min_shared, device=case.q.device)
    assert groups is not None
    cascade = torch.full_like(case.q, float("nan"))
    cascade_decode_attention(case.q, case.k_buf, case.v_buf, case.kv_indptr, case.kv_indices,
                             groups, case.scale, out=cascade, **kwargs)  # fmt: skip
    plain = decode_attention(case.q, case.k_buf, case.v_buf, case.kv_indptr, case.kv_indices,
                             case.scale)  # fmt: skip
    return cascade, plain, groups


# Groups of 3, 6 and 9 members (1, 2 and 3 chunks of 4 members at GQA 4 in 16-row CPU tiles),
# shared prefixes from one block to several splits; a group whose members own only their query
# slot; sequences in no group, one of them a single token.
GROUPS = [
    GroupSpec(3, 40),
    GroupSpec(6, 64),
    GroupSpec(9, 33),
    GroupSpec(2, 16),
    GroupSpec(4, 48, suffix=[1, 1, 1, 1]),
]
LONERS = [1, 50, 17]


@pytest.mark.parametrize("page_size", [1, 4])
@pytest.mark.parametrize("group", [1, 4])
def test_cascade_equals_reference_and_plain_decode(page_size, group):
    groups_spec = [g for g in GROUPS if g.shared % page_size == 0]  # radix pages are whole
    case = make_case(groups_spec, LONERS, page_size, group, 16, torch.float32, "cpu",
                     seed=10 * page_size + group)  # fmt: skip
    cascade, plain, groups = run_both(case, min_shared=16)
    assert sorted(groups.shared_lens_cpu) == sorted(g.shared for g in groups_spec)
    assert not cascade.isnan().any()
    ref = reference_decode(case.q, case.k_buf, case.v_buf, case.seqs, case.scale)
    assert rel_err(cascade, ref) < 1e-5
    assert rel_err(cascade, plain) < 1e-5


@pytest.mark.parametrize(
    "config",
    [
        CascadeConfig(
            max_rows=16,
            block_n=16,
            min_split_len=16,
            target_programs=1,
            max_splits=1,
            num_warps=1,
            num_stages=1,
        ),  # fmt: skip
        CascadeConfig(
            max_rows=64,
            block_n=32,
            min_split_len=16,
            target_programs=512,
            max_splits=8,
            num_warps=1,
            num_stages=1,
        ),  # fmt: skip
    ],
    ids=["one-split-small-tiles", "many-splits-one-chunk"],
)
@pytest.mark.parametrize("num_splits", [1, 4])
def test_cascade_any_prefix_and_suffix_split_count(config, num_splits):
    case = make_case(GROUPS, LONERS, 1, 4, 16, torch.float32, "cpu", seed=num_splits)
    cascade, _, _ = run_both(case, min_shared=16, cascade_config=config, num_splits=num_splits)
    ref = reference_decode(case.q, case.k_buf, case.v_buf, case.seqs, case.scale)
    assert rel_err(cascade, ref) < 1e-5


def test_cascade_pads_a_head_dim_that_is_not_a_power_of_two():
    case = make_case([GroupSpec(5, 36)], [9], 4, 2, 24, torch.float32, "cpu", seed=3)
    cascade, _, _ = run_both(case, min_shared=16)
    ref = reference_decode(case.q, case.k_buf, case.v_buf, case.seqs, case.scale)
    assert rel_err(cascade, ref) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cascade_in_half_precision(dtype):
    case = make_case([GroupSpec(5, 48), GroupSpec(2, 20)], [30], 4, 4, 64, dtype, "cpu", seed=4)
    cascade, plain, _ = run_both(case, min_shared=16)
    ref = reference_decode(case.q, case.k_buf, case.v_buf, case.seqs, case.scale)
    assert rel_err(cascade, ref) < 2e-2
    assert rel_err(cascade, plain) < 2e-2


def test_cascade_reuses_a_scratch_across_calls_of_different_shapes():
    scratch = DecodeScratch("cpu")
    for seed, spec in enumerate(([GroupSpec(6, 64)], [GroupSpec(2, 16), GroupSpec(3, 40)])):
        case = make_case(spec, [5], 1, 4, 16, torch.float32, "cpu", seed=20 + seed)
        cascade, _, _ = run_both(case, min_shared=16, scratch=scratch)
        ref = reference_decode(case.q, case.k_buf, case.v_buf, case.seqs, case.scale)
        assert rel_err(cascade, ref) < 1e-5


def test_prefix_partials_need_a_start_offset():
    case = make_case([GroupSpec(2, 16)], [], 1, 1, 16, torch.float32, "cpu", seed=5)
    groups = find_prefix_groups(case.seqs, 16)
    from radixlm.model.attention.triton_kernels import prefix_attention

    partials = prefix_attention(case.q, case.k_buf, case.v_buf, case.kv_indptr, case.kv_indices,
                                groups, case.scale)  # fmt: skip
    with pytest.raises(ValueError):
        decode_attention(case.q, case.k_buf, case.v_buf, case.kv_indptr, case.kv_indices,
                         case.scale, prefix=partials)  # fmt: skip


# ------------------------------------------------------------------------- backend and batch

KV_HEADS, Q_HEADS, HEAD_DIM, PAGE = 2, 8, 16, 4


def pools_and_slots(gen: torch.Generator) -> tuple[list[KVPool], list[list[int]]]:
    specs = [GroupSpec(5, 32), GroupSpec(3, 20, suffix=[1, 2, 9])]
    seqs, num_slots = make_slots(specs, [7, 40], PAGE, gen)
    pools = [KVPool(2, KV_HEADS, HEAD_DIM, num_slots // PAGE + 1, PAGE, torch.float32, "cpu")
             for _ in range(2)]  # fmt: skip
    for layer in range(2):
        for pool in pools:  # cached K/V of the prefixes and earlier tokens: same in both pools
            pool.k(layer).copy_(torch.randn(pool.k(layer).shape, generator=gen.clone_state()))
            pool.v(layer).copy_(torch.randn(pool.v(layer).shape, generator=gen.clone_state()))
        torch.randn(1, generator=gen)  # move the generator on between layers
    return pools, [s.tolist() for s in seqs]


@pytest.mark.parametrize("window", [None, 6])
def test_triton_backend_cascade_matches_torch_backend(window):
    gen = torch.Generator().manual_seed(30)
    pools, slots = pools_and_slots(gen)
    batch = ForwardBatch.build([[1]] * len(slots), slots, prefix_min_shared=16)
    assert batch.prefix_groups is not None and batch.prefix_groups.num_groups == 2
    backends = [TritonAttentionBackend("cpu", sliding_window=window),
                TorchAttentionBackend(sliding_window=window)]  # fmt: skip
    for layer in range(2):
        q, k, v = (torch.randn(len(slots), h, HEAD_DIM, generator=gen)
                   for h in (Q_HEADS, KV_HEADS, KV_HEADS))  # fmt: skip
        ours, ref = (b.forward(q, k, v, layer, batch, p, HEAD_DIM**-0.5)
                     for b, p in zip(backends, pools))  # fmt: skip
        assert rel_err(ours, ref) < 1e-5
        assert torch.equal(pools[0].k(layer), pools[1].k(layer))


def test_cuda_graph_runner_leaves_grouped_batches_to_eager_runs():
    pool = KVPool(1, KV_HEADS, HEAD_DIM, 64, PAGE, torch.float32, "cpu")
    graphs = DecodeGraphRunner(None, pool, None, max_batch_size=8, context_length=64)
    shared = list(range(8, 28))
    slots = [shared + [40], shared + [41, 42], [50, 51]]
    grouped = ForwardBatch.build([[1]] * 3, slots, prefix_min_shared=16)
    assert grouped.prefix_groups is not None
    assert not graphs.can_run(grouped)
    assert graphs.can_run(ForwardBatch.build([[1]] * 3, slots))
    # Asked for, none found: the batch replays as before.
    assert graphs.can_run(ForwardBatch.build([[1]] * 3, slots, prefix_min_shared=32))


def test_cpu_cascade_config_is_small_enough_to_cross_every_boundary():
    config = default_cascade_config(torch.device("cpu"))
    assert config.max_rows == 16 and config.block_n == 16 and config.min_split_len == 16


# ---------------------------------------------------------------------------------- GPU

LLAMA3_GROUP, LLAMA3_HEAD_DIM = 4, 128


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [1, 16])
def test_gpu_cascade_realistic_bf16(page_size):
    # The shape, scaled down: groups of 16 sharing 2,048 tokens, 1-384 own tokens each;
    # a group of 40 (3 chunks of 16 members at GQA 4 in 64-row tiles); unrelated sequences.
    suffix = [1 + (37 * i) % 384 for i in range(16)]
    specs = [GroupSpec(16, 2048, suffix=suffix) for _ in range(4)]
    specs += [GroupSpec(40, 1024), GroupSpec(2, 256, suffix=[1, 1])]
    case = make_case(specs, [1, 300, 5000], page_size, LLAMA3_GROUP, LLAMA3_HEAD_DIM,
                     torch.bfloat16, "cuda", seed=40 + page_size)  # fmt: skip
    scratch = DecodeScratch("cuda")
    for _ in range(3):  # repeated launches on one scratch
        cascade, plain, groups = run_both(case, min_shared=256, scratch=scratch)
        assert groups.num_groups == len(specs)
        assert not cascade.isnan().any()
        ref = reference_decode(case.q, case.k_buf, case.v_buf, case.seqs, case.scale)
        assert rel_err(cascade, ref) < 2e-2
        assert rel_err(cascade, plain) < 2e-2


@pytest.mark.gpu
def test_gpu_cascade_float32_is_exact():
    specs = [GroupSpec(16, 2048), GroupSpec(7, 600)]
    case = make_case(specs, [33, 900], 16, LLAMA3_GROUP, LLAMA3_HEAD_DIM, torch.float32, "cuda",
                     seed=50)  # fmt: skip
    cascade, _, _ = run_both(case, min_shared=256)
    ref = reference_decode(case.q, case.k_buf, case.v_buf, case.seqs, case.scale)
    assert rel_err(cascade, ref) < 1e-5
