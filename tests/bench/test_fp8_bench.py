"""The FP8 options through the end-to-end benchmarks on a tiny CPU model: one-batch and
offline run with FP8 weights and an FP8 KV cache, the roofline counts FP8 bytes, offline
reports its peak concurrency, and quant-accuracy compares against the float model."""

from __future__ import annotations

import json

import pytest
import torch

from radixlm.bench import offline, one_batch, quant_accuracy
from radixlm.bench.common import ModelCost
from radixlm.model.arch import ModelArch
from radixlm.model.random_model import config_dict

FP8 = ["--quantization", "fp8", "--kv-cache-dtype", "fp8_e4m3"]


def test_fp8_cost_counts_one_byte_per_matrix_weight_and_kv_value():
    arch = ModelArch.from_hf_config(config_dict("llama3-8b"))
    bf16 = ModelCost.of(arch)
    fp8 = ModelCost.of(arch, weight_dtype=torch.float8_e4m3fn, kv_dtype=torch.float8_e4m3fn)
    assert fp8.kv_bytes_per_token * 2 == bf16.kv_bytes_per_token
    matrices = bf16.decoder_matmul_params
    scales = arch.num_layers * (arch.q_size + 2 * arch.kv_size + arch.hidden_size
                                + 2 * arch.intermediate_size + arch.hidden_size)  # fmt: skip
    assert bf16.decode_weight_bytes - fp8.decode_weight_bytes == matrices - 4 * scales


# The engine benchmarks run on a model with a real tokenizer (the grammar backend builds its
# vocabulary at start-up and refuses the synthetic word-level one).


def test_one_batch_with_fp8(tiny_llama3_dir, tmp_path, ceilings):
    out = tmp_path / "ob.json"
    args = ["--model", str(tiny_llama3_dir), "--batch-sizes", "2", "--input-lens", "6",
            "--output-len", "3", "--out", str(out), *FP8, *ceilings]  # fmt: skip
    assert one_batch.main(args) == 0
    (row,) = json.loads(out.read_text())["results"]
    assert row["batch"] == 2 and row["decode_steps"] == 2
    assert row["output_tok_s"] == pytest.approx(2 * 3 / row["total_s"])


def test_offline_with_fp8_reports_peak_concurrency(tiny_llama3_dir, tmp_path, ceilings):
    out = tmp_path / "off.json"
    args = [
        "--model",
        str(tiny_llama3_dir),
        "--num-requests",
        "5",
        "--input-len",
        "10",
        "--output-len",
        "4",
        "--warmup-requests",
        "0",
        "--out",
        str(out),
        *FP8,
        *ceilings,
    ]
    assert offline.main(args) == 0
    row = json.loads(out.read_text())["results"][0]
    assert row["output_tokens"] == 5 * 4 and row["aborted"] == 0
    assert 1 <= row["peak_running"] <= 5


def test_quant_accuracy_against_the_float_model(bench_model_dir, tmp_path, capsys):
    out = tmp_path / "acc.json"
    args = ["--model", str(bench_model_dir), "--device", "cpu", "--dtype", "float32",
            "--num-prompts", "3", "--output-len", "4", "--random-prompt-len", "8",
            "--out", str(out), *FP8]  # fmt: skip
    assert quant_accuracy.main(args) == 0
    result = json.loads(out.read_text())
    assert result["prompts"] == 3 and 0 <= result["token_agreement"] <= 1
    assert 0 < result["mean_kl"] <= result["max_kl"]
    assert "agreement" in capsys.readouterr().out
