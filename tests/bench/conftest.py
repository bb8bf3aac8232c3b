"""A tiny random model directory written by the benchmarks' own --random-model path."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def bench_model_dir(tmp_path_factory) -> Path:
    """``--random-model llama`` (hidden 64, 2 layers, vocab 512), built once per session."""
    from radixlm.bench.common import random_model_dir

    return random_model_dir("llama", tmp_path_factory.mktemp("bench-models"), seed=0)


@pytest.fixture
def ceilings() -> list[str]:
    """Ceilings passed explicitly, so no test spends time measuring the CPU."""
    return ["--hbm-gbps", "20", "--tflops", "0.2"]
