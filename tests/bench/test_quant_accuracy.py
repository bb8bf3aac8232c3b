"""bench quant-accuracy's reference dtype and weight-only options on the tiny CPU model."""

from __future__ import annotations

import json

import pytest
import torch

from radixlm.bench import quant_accuracy
from radixlm.model.layers.fp8 import Fp8Linear, fp8_linear_reference

TINY = ["--device", "cpu", "--num-prompts", "3", "--output-len", "4", "--random-prompt-len", "8"]


def _run(model_dir, tmp_path, *extra: str) -> dict:
    out = tmp_path / "acc.json"
    assert quant_accuracy.main(["--model", str(model_dir), *TINY, "--out", str(out), *extra]) == 0
    return json.loads(out.read_text())


def test_same_dtype_unquantized_candidate_matches_the_reference_exactly(bench_model_dir, tmp_path):
    result = _run(bench_model_dir, tmp_path, "--dtype", "float32", "--quantization", "none")
    assert result["reference_dtype"] == "float32"
    assert result["token_agreement"] == 1.0 and result["teacher_forced_top1"] == 1.0
    assert result["max_kl"] == 0.0


def test_bf16_against_a_float32_reference_measures_rounding_noise(bench_model_dir, tmp_path):
    result = _run(bench_model_dir, tmp_path, "--reference-dtype", "float32",
                  "--dtype", "bfloat16", "--quantization", "none")  # fmt: skip
    assert result["reference_dtype"] == "float32"
    assert "dtype=bfloat16 quantization=none" in result["options"]
    # bf16 rounds weights and activations: the distributions differ, if only slightly.
    assert 0 < result["mean_kl"] <= result["max_kl"] < 1


def test_weight_only_keeps_activations_exact_at_every_row_count():
    args = quant_accuracy.parse_args(["--weight-only"])
    config = quant_accuracy.fp8_linear_config(args, torch.device("cpu"))
    torch.manual_seed(0)
    layer = Fp8Linear(64, 32)
    layer.weight.data.copy_(torch.randn(32, 64).to(layer.weight.dtype))
    layer.weight_scale.data.uniform_(0.01, 0.02)
    layer.config = config
    x = torch.randn(4096, 64)  # far above any GPU kernel's small-M limit
    exact = fp8_linear_reference(x, layer.weight, layer.weight_scale, quantize_input=False)
    rounded = fp8_linear_reference(x, layer.weight, layer.weight_scale, quantize_input=True)
    assert torch.equal(layer(x), exact)
    assert not torch.equal(exact, rounded)


def test_weight_only_runs_end_to_end_and_is_labelled(bench_model_dir, tmp_path):
    result = _run(bench_model_dir, tmp_path, "--dtype", "float32", "--quantization", "fp8",
                  "--weight-only")  # fmt: skip
    assert "weight_only" in result["options"]
    assert result["prompts"] == 3 and 0 < result["mean_kl"] <= result["max_kl"]


def test_weight_only_is_refused_where_the_gpu_kernels_would_run(monkeypatch):
    monkeypatch.setattr(quant_accuracy, "fp8_gemm_supported", lambda device: True)
    args = quant_accuracy.parse_args(["--weight-only"])
    with pytest.raises(SystemExit, match="reference path"):
        quant_accuracy.fp8_linear_config(args, torch.device("cuda"))


def test_weight_only_excludes_triton_max_m():
    with pytest.raises(SystemExit):
        quant_accuracy.parse_args(["--weight-only", "--triton-max-m", "32"])
