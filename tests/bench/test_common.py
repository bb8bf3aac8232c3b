"""Roofline arithmetic against independent counts, random model directories, table output."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from radixlm.bench.common import (
    Ceilings,
    ModelCost,
    WorkItem,
    format_table,
    measure_ceilings,
    percentile,
    static_batch_roofline,
    workload_roofline,
    write_json,
)
from radixlm.model.arch import ModelArch
from radixlm.model.random_model import config_dict, random_config


def _hf_meta_model(name: str, **overrides):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(random_config(name, **overrides))


@pytest.mark.parametrize("name,overrides", [("llama", {}), ("qwen2", {}),
                                            ("llama", {"tie_word_embeddings": True})])
def test_model_cost_matches_transformers_parameter_count(name, overrides):
    hf = _hf_meta_model(name, **overrides)
    params = dict(hf.named_parameters())
    embed = params["model.embed_tokens.weight"].numel()
    matrices = sum(p.numel() for n, p in params.items()
                   if p.dim() == 2 and n.startswith("model.layers."))
    total = sum(p.numel() for p in params.values())
    cost = ModelCost.of(ModelArch.from_hf_config(config_dict(name, **overrides)),
                        torch.bfloat16)
    tied = overrides.get("tie_word_embeddings", False)
    assert cost.decoder_matmul_params == matrices
    assert cost.lm_head_params == embed  # same shape (vocab x hidden) either way
    assert cost.decode_weight_bytes == 2 * (total if tied else total - embed)
    cfg = config_dict(name)
    layers, kv, hd = cfg["num_hidden_layers"], cfg["num_key_value_heads"], cfg["head_dim"]
    assert cost.kv_bytes_per_token == 2 * layers * kv * hd * 2


def test_llama3_8b_figures_match_the_published_shape():
    """Meta-Llama-3-8B has 8.03 B parameters; the decode step reads all but the embedding."""
    cost = ModelCost.of(ModelArch.from_hf_config(config_dict("llama3-8b")))
    assert cost.decode_weight_bytes / 2 + 4096 * 128256 == pytest.approx(8.03e9, rel=2e-3)
    assert cost.kv_bytes_per_token == 128 * 1024


def _brute_force_pairs(new: int, prefix: int) -> int:
    return sum(1 for q in range(prefix, prefix + new) for k in range(prefix + new) if k <= q)


@pytest.mark.parametrize("new,prefix", [(1, 0), (5, 0), (3, 7), (1, 40)])
def test_extend_flops_counts_causal_pairs(new, prefix):
    cost = ModelCost(decoder_matmul_params=100, lm_head_params=10, decode_weight_bytes=0,
                     kv_bytes_per_token=0, attn_flops_per_pair=4)
    expected = 2 * 100 * new + 2 * 10 + 4 * _brute_force_pairs(new, prefix)
    assert cost.extend_flops(new, prefix) == expected


def test_static_batch_roofline_by_hand():
    cost = ModelCost(decoder_matmul_params=1000, lm_head_params=100,
                     decode_weight_bytes=10_000, kv_bytes_per_token=10, attn_flops_per_pair=1)
    ceil = Ceilings(hbm_gbps=1e-6, matmul_tflops=1e-9)  # 1000 B/s, 1000 FLOP/s
    roof = static_batch_roofline(cost, ceil, batch=2, input_len=3, output_len=3)
    prefill_flops = 2 * (2 * 1000 * 3 + 2 * 100 + 6)
    prefill_bytes = 10_000 + 2 * 3 * 10
    assert roof.prefill_s == pytest.approx(max(prefill_flops, prefill_bytes) / 1000)
    # decode steps see contexts of 4 then 5 tokens (plus the new token's write)
    steps = [max(10_000 + (2 * ctx + 2) * 10, 2 * 1100 * 2 + 2 * ctx) / 1000 for ctx in (4, 5)]
    assert roof.decode_steps_s == pytest.approx(steps)
    assert roof.total_s == pytest.approx(roof.prefill_s + sum(steps))


def test_workload_roofline_one_wave_equals_static_batch():
    cost = ModelCost.of(ModelArch.from_hf_config(config_dict("llama3-8b")))
    ceil = Ceilings(3000.0, 800.0)
    static = static_batch_roofline(cost, ceil, 8, 512, 16)
    items = [WorkItem(512, 0, 16)] * 8
    assert workload_roofline(cost, ceil, items, concurrency=8) == pytest.approx(static.total_s)


def test_workload_roofline_waves_and_cache():
    cost = ModelCost.of(ModelArch.from_hf_config(config_dict("llama3-8b")))
    ceil = Ceilings(3000.0, 800.0)
    items = [WorkItem(1024, 0, 64)] * 64
    one_wave = workload_roofline(cost, ceil, items, 64)
    four_waves = workload_roofline(cost, ceil, items, 16)
    assert four_waves > one_wave  # the weights are read in 4x as many decode steps
    cached = [WorkItem(1024, 960, 64)] * 64
    assert workload_roofline(cost, ceil, cached, 64) < one_wave


def test_percentile_matches_numpy():
    rng = np.random.default_rng(0)
    values = rng.random(37).tolist()
    for q in (0, 1, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q))
    assert math.isnan(percentile([], 50))


def test_format_table_and_json(tmp_path):
    rows = [{"a": 1, "b": 2.345678, "c": None}, {"a": 10, "b": float("nan"), "c": "x"}]
    text = format_table(rows, [("a", "A"), ("b", "Bee"), ("c", "C")])
    lines = text.splitlines()
    assert lines[0].split() == ["A", "Bee", "C"]
    assert lines[1].split() == ["1", "2.346", "-"]
    assert lines[2].split() == ["10", "-", "x"]
    assert len({len(line) for line in lines}) == 1
    write_json(tmp_path / "r.json", {"rows": rows, "path": tmp_path, "ceil": Ceilings(1.0, 2.0)})
    loaded = json.loads((tmp_path / "r.json").read_text())
    assert loaded["ceil"]["hbm_gbps"] == 1.0 and loaded["path"] == str(tmp_path)


def test_measure_ceilings_uses_given_values_and_measures_the_rest():
    given = measure_ceilings(torch.device("cpu"), hbm_gbps=123.0, tflops=4.5)
    assert (given.hbm_gbps, given.matmul_tflops, given.measured) == (123.0, 4.5, False)
    measured = measure_ceilings(torch.device("cpu"), tflops=4.5)
    assert measured.measured and 0.1 < measured.hbm_gbps < 10_000


def test_random_model_dir_loads_identically_in_radixlm_and_transformers(bench_model_dir):
    from transformers import AutoModelForCausalLM

    from radixlm.model.loader import load_model
    from radixlm.tokenizer.tokenizer import eos_token_ids, load_tokenizer

    ours = load_model(bench_model_dir, "float32", "cpu", progress=False)
    hf = AutoModelForCausalLM.from_pretrained(str(bench_model_dir), dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 77, 300, 511, 4]])
    with torch.no_grad():
        ref = hf(ids).logits[0, -1]
    from radixlm.batch import ForwardBatch
    from radixlm.kvcache.pool import KVPool
    from radixlm.model.attention import create_attention_backend

    arch = ours.arch
    pool = KVPool(arch.num_layers, arch.num_kv_heads, arch.head_dim, 64, 1, torch.float32, "cpu")
    slots = list(range(pool.first_usable_slot, pool.first_usable_slot + 6))
    batch = ForwardBatch.build([ids[0].tolist()], [slots])
    with torch.no_grad():
        got = ours(batch, pool, create_attention_backend("torch", torch.device("cpu")))[0]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    tok = load_tokenizer(bench_model_dir)
    assert len(tok) == arch.vocab_size
    assert eos_token_ids(tok, bench_model_dir) == {2}
    assert tok.decode([5, 6, 511]) == "t5 t6 t511"
    assert tok.encode("t5 t6 t511", add_special_tokens=False) == [5, 6, 511]


def test_synthetic_tokenizer_loads_in_llguidance(tmp_path):
    """The default grammar backend reads the synthetic vocabulary (it refused the WordPiece
    decoder the synthetic tokenizer used to have, and every engine on it failed to start)."""
    import llguidance.hf
    from transformers import AutoTokenizer

    from radixlm.bench.common import write_synthetic_tokenizer

    write_synthetic_tokenizer(tmp_path, 64, bos_id=1, eos_id=2)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    llguidance.hf.from_tokenizer(tok, n_vocab=64)
    assert tok.decode([5, 6, 63]) == "t5 t6 t63"
    assert tok.encode("t5 t6 t63", add_special_tokens=False) == [5, 6, 63]
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
