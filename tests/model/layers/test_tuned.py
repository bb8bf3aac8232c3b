"""Tuned kernel plans: the file the bench writes is the plan the layers read."""

from __future__ import annotations

import json

import pytest

from radixlm.bench.fp8_gemm import parse_gemv_tile, parse_swap_ab_tile, tuned_plan
from radixlm.model.layers.tuned import KernelChoice, choose, device_slug, load_plan


def test_device_slug():
    assert device_slug("NVIDIA H200") == "nvidia_h200"
    assert device_slug("NVIDIA GeForce RTX 4090 ") == "nvidia_geforce_rtx_4090"


def test_bench_winners_round_trip_through_the_plan_file(tmp_path):
    gemv = parse_gemv_tile("4x1024/8/bits")
    assert gemv == KernelChoice("gemv", 4, 1024, 8, "bits")
    dot = KernelChoice("dot_f16", 16, 256)
    results = [
        ({"proj": "qkv_proj", "n": 6144, "k": 4096, "m": 1}, KernelChoice("cublas"), gemv),
        ({"proj": "qkv_proj", "n": 6144, "k": 4096, "m": 4}, parse_gemv_tile("2x512/4"), dot),
        (
            {"proj": "qkv_proj", "n": 6144, "k": 4096, "m": 8},
            KernelChoice("cublas"),
            parse_swap_ab_tile("64x256/4"),
        ),
        (
            {"proj": "qkv_proj", "n": 6144, "k": 4096, "m": 16},
            KernelChoice("cublas"),
            KernelChoice("scaled_mm"),
        ),
        (
            {"proj": "qkv_proj", "n": 6144, "k": 4096, "m": 64},
            KernelChoice("cublas"),
            KernelChoice("scaled_mm"),
        ),  # above the plan's rows: left out
        ({"proj": "lm_head", "n": 128256, "k": 4096, "m": 1}, KernelChoice("cublas"), None),
    ]
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps(tuned_plan(results, "Some GPU")))
    plan = load_plan(path)
    assert set(plan) == {("fp8", 6144, 4096), ("bf16", 6144, 4096)}
    assert choose(plan, "fp8", 6144, 4096, 1) == gemv
    assert choose(plan, "fp8", 6144, 4096, 2) == dot  # the next measured row count up
    assert choose(plan, "fp8", 6144, 4096, 5) == KernelChoice("swap_ab", 64, 256, split_k=4)
    assert choose(plan, "fp8", 6144, 4096, 9) == KernelChoice("scaled_mm")
    assert choose(plan, "fp8", 6144, 4096, 17) is None
    assert choose(plan, "bf16", 6144, 4096, 3) == KernelChoice("gemv", 2, 512, 4)
    assert choose(plan, "fp8", 4096, 4096, 1) is None
    assert load_plan(tmp_path / "missing.json") == {}


def test_an_unknown_kernel_is_refused(tmp_path):
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps({"fp8": {"16x16": {"1": {"kernel": "magic"}}}}))
    with pytest.raises(ValueError, match="magic"):
        load_plan(path)
