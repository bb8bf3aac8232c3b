"""Tensor parallelism on GPUs (NCCL, bf16, CUDA graphs): needs two CUDA devices.

Run with NVLink multicast off, as on the lent machines::

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
        pytest -m gpu tests/executor/test_gpu_tp.py

A random Llama-3-8B (bf16, written once to the benchmark model cache) runs at TP=1 and TP=2 on
the same prompts: greedy tokens must agree for the first 32 tokens wherever TP=1's top two
logprobs are not near-tied (bf16 rounds the row-parallel partial sums differently, so a near tie
may flip), and the chosen tokens' logprobs must stay close. Decode steps at TP=2 replay CUDA
graphs that contain the NCCL all-reduces; eager TP=2 must give the same tokens.
"""

from __future__ import annotations

import os

import pytest
import torch

from radixlm.config import EngineConfig
from radixlm.engine import ipc
from radixlm.engine.core import EngineCore
from radixlm.request import LogprobOptions
from radixlm.sampling_params import SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.device_count() < 2,
        reason="needs two CUDA devices",
    ),
]

for _name in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"):
    os.environ.setdefault(_name, "0" if _name == "NCCL_NVLS_ENABLE" else "1")

NEW_TOKENS = 32
# A TP=1 top-2 gap below this (in logprob) is a near tie: bf16 noise may pick either token.
NEAR_TIE = 0.05
LOGPROB_TOL = 0.08


@pytest.fixture(scope="module")
def llama8b() -> str:
    from radixlm.bench.common import random_model_dir

    return str(random_model_dir("llama3-8b", device="cuda"))


def generate(path: str, tp: int, prompts: list[list[int]], **kwargs) -> tuple[dict, EngineCore]:
    config = EngineConfig.from_kwargs(
        model=path, tp_size=tp, kv_cache_tokens=16384, random_seed=0, **kwargs
    )
    core = EngineCore(config, progress=False)
    params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    lp = LogprobOptions(return_logprob=True, top_logprobs_num=2)
    out: dict[str, dict] = {}
    for i, ids in enumerate(prompts):
        core.add_request(ipc.AddRequest(f"p{i}", ids, params, lp))
        out[f"p{i}"] = {"ids": [], "lp": [], "top": []}
    while core.has_work():
        for o in core.step():
            out[o.rid]["ids"] += o.new_token_ids
            out[o.rid]["lp"] += [v for v, _ in o.output_logprobs]
            out[o.rid]["top"] += o.output_top_logprobs
    return out, core


def prompts(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return [
        torch.randint(1000, vocab - 1000, (n,), generator=gen).tolist() for n in (17, 64, 200, 333)
    ]


def compare(ref: dict, got: dict) -> int:
    """Positions compared before each sequence's first near tie; asserts they agree."""
    compared = 0
    for rid, want in ref.items():
        have = got[rid]
        for pos, (token, top) in enumerate(zip(want["ids"], want["top"])):
            if top[0][0] - top[1][0] < NEAR_TIE:
                break
            assert have["ids"][pos] == token, (rid, pos)
            assert abs(have["lp"][pos] - want["lp"][pos]) < LOGPROB_TOL, (rid, pos)
            compared += 1
    return compared


@pytest.fixture(scope="module")
def tp1(llama8b):
    out, core = generate(llama8b, 1, prompts(128256))
    core.close()
    del core
    torch.cuda.empty_cache()
    return out


def test_tp2_bf16_matches_tp1_on_llama3_8b(llama8b, tp1):
    got, core = generate(llama8b, 2, prompts(128256))
    try:
        info = core.server_info()
        assert [r["device"] for r in info["tp_ranks"]] == ["cuda:0", "cuda:1"]
        assert core.runner.graph_batch_sizes, "decode steps should replay CUDA graphs"
    finally:
        core.close()
    assert compare(tp1, got) >= 16 * len(tp1)


def test_tp2_graphs_match_eager(llama8b):
    graphs, core = generate(llama8b, 2, prompts(128256)[:2])
    core.close()
    eager, core = generate(llama8b, 2, prompts(128256)[:2], cuda_graph_max_batch_size=0)
    try:
        assert core.runner.graph_batch_sizes == []
    finally:
        core.close()
    assert compare(eager, graphs) >= 16 * len(eager)
