"""Machine-dependent defaults: the CPU KV pool, the prefill chunk, and their use by the core."""

from __future__ import annotations

import pytest

from radixlm.config import DEFAULT_MAX_PREFILL_TOKENS, EngineConfig, SchedulerConfig, prefill_budget
from radixlm.engine.core import with_default_prefill_chunk
from radixlm.executor import memory


def test_available_host_bytes_is_positive_and_at_most_total_ram():
    import os

    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert 0 < memory.available_host_bytes() <= total


@pytest.mark.parametrize(
    ("available_gib", "per_token", "want"),
    [
        (20, 46080, 16384),  # SmolLM2 fp32 on a 24 GB box: capped (65,536 used to be ~3 GB)
        (2, 46080, 4660),  # 10% of 2 GiB
        (0.05, 46080, 1024),  # a starved machine still gets the floor
    ],
)
def test_cpu_kv_tokens_is_a_share_of_available_memory_within_bounds(available_gib, per_token,
                                                                   want):
    got = memory.cpu_kv_tokens(per_token, int(available_gib * 2**30))
    assert got == want
    assert memory.CPU_KV_MIN_TOKENS <= got <= memory.CPU_KV_MAX_TOKENS


def test_prefill_chunk_defaults_per_device_and_shrinks_when_memory_is_short():
    assert memory.default_prefill_chunk("cuda") == memory.GPU_PREFILL_CHUNK
    assert memory.default_prefill_chunk("cpu", available_bytes=16 << 30) == 512
    # 2% of 1 GiB over 256 KiB per token is 81 tokens; the floor is 64.
    assert memory.default_prefill_chunk("cpu", available_bytes=1 << 30) == 81
    assert memory.default_prefill_chunk("cpu", available_bytes=1 << 20) == 64


def test_core_fills_in_the_chunk_only_when_unset():
    config = EngineConfig.from_kwargs(model="m")
    cpu = with_default_prefill_chunk(config, "cpu")
    gpu = with_default_prefill_chunk(config, "cuda:0")
    assert 64 <= cpu.scheduler.chunked_prefill_size <= 512
    assert gpu.scheduler.chunked_prefill_size == memory.GPU_PREFILL_CHUNK
    off = EngineConfig.from_kwargs(model="m", chunked_prefill_size=0)
    assert with_default_prefill_chunk(off, "cuda") is off
    fixed = EngineConfig.from_kwargs(model="m", chunked_prefill_size=100)
    assert with_default_prefill_chunk(fixed, "cpu").scheduler.chunked_prefill_size == 100


def test_extend_budget_follows_the_chunk_unless_given():
    assert prefill_budget(SchedulerConfig(chunked_prefill_size=2048)) == 2048
    assert prefill_budget(SchedulerConfig(chunked_prefill_size=2048,
                                          max_prefill_tokens=8192)) == 8192
    assert prefill_budget(SchedulerConfig()) == DEFAULT_MAX_PREFILL_TOKENS
    assert prefill_budget(SchedulerConfig(chunked_prefill_size=0)) == DEFAULT_MAX_PREFILL_TOKENS
