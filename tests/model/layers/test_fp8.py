"""FP8 weights: quantization helpers, the FP8 linear layer's paths against a float64 reference,
and loading (bf16/fp32 checkpoints quantized on load; FP8 checkpoints in the vLLM layout).

The Triton small-M GEMM runs under the interpreter on CPU at tiny sizes; the ``gpu`` tests run
``torch._scaled_mm``, the per-token quantization kernel and the compiled GEMM at Llama-3-8B
projection shapes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from radixlm.batch import ForwardBatch
from radixlm.kvcache.pool import KVPool
from radixlm.model.arch import UnsupportedModelError
from radixlm.model.attention.torch_backend import TorchAttentionBackend
from radixlm.model.layers.fp8 import (
    FP8_DTYPE,
    Fp8Linear,
    Fp8LinearConfig,
    fp8_linear,
    fp8_linear_reference,
    quantize_rows,
)
from radixlm.model.layers.fp8_triton import (
    fp8_small_m_gemm,
    fp8_swap_ab_gemm,
    quantize_per_token,
)
from radixlm.model.loader import load_model
from radixlm.model.quantization import checkpoint_quantization, resolve_quantization
from radixlm.model.random_model import make_random_model_dir

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def f64_product(x, w_fp8, w_scale, bias=None, quantize_input=True) -> torch.Tensor:
    """float64 x @ dequant(w).T (+ bias), the activation rounded through per-row FP8 first
    (float32 scales, as the layer computes them), on ``x``'s device."""
    xd = x.double()
    if quantize_input:
        amax = x.float().abs().amax(-1, keepdim=True).clamp(min=1e-12)
        scale = amax / 448
        q = (x.float() / scale).clamp(-448, 448).to(FP8_DTYPE)
        xd = q.double() * scale.double()
    out = xd @ (w_fp8.double() * w_scale.double()[:, None]).t()
    return out if bias is None else out + bias.double()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double().cpu() - ref.cpu()).norm() / ref.norm()).item()


# ------------------------------------------------------------------------ quantization helpers


def test_quantize_rows_scales_each_row_to_the_e4m3_range():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 40, generator=gen) * torch.tensor([1e-3, 0.02, 1, 30, 500, 0])[:, None]
    q, scale = quantize_rows(w)
    assert q.dtype == FP8_DTYPE and scale.shape == (6, 1) and scale.dtype == torch.float32
    amax = w.abs().amax(-1)
    nonzero = amax > 0
    # The largest element of every row lands on +-448 exactly.
    assert torch.equal(q.float().abs().amax(-1)[nonzero], torch.full((5,), 448.0))
    back = q.float() * scale
    # e4m3 keeps 3 mantissa bits: relative error at most 2^-4 for normal values.
    big = w.abs() > amax[:, None] / 64
    assert ((back - w).abs()[big] <= w.abs()[big] * 2**-4 + 1e-12).all()
    assert torch.equal(back[5], torch.zeros(40)) and torch.isfinite(scale).all()


def test_reference_linear_is_the_dequantized_product():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 64, generator=gen)
    w_fp8, w_scale = quantize_rows(torch.randn(24, 64, generator=gen) * 0.05)
    bias = torch.randn(24, generator=gen)
    out = fp8_linear_reference(x, w_fp8, w_scale.view(-1), bias)
    assert rel_err(out, f64_product(x, w_fp8, w_scale.view(-1), bias)) < 1e-6
    exact_x = fp8_linear_reference(x, w_fp8, w_scale.view(-1), bias, quantize_input=False)
    ref = f64_product(x, w_fp8, w_scale.view(-1), bias, quantize_input=False)
    assert rel_err(exact_x, ref) < 1e-6


def test_cpu_fp8_linear_emulates_the_gpu_path_of_its_row_count():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 7, 32, generator=gen)  # 21 rows > triton_max_m: W8A8 (_scaled_mm)
    w_fp8, w_scale = quantize_rows(torch.randn(16, 32, generator=gen))
    w_scale = w_scale.view(-1)
    out = fp8_linear(x, w_fp8, w_scale)
    ref = fp8_linear_reference(x.reshape(21, 32), w_fp8, w_scale).view(3, 7, 16)
    assert torch.equal(out, ref)
    few = x[0, :4]  # 4 rows: W8A16 (the Triton small-M kernel), the activation kept exact
    exact = fp8_linear_reference(few, w_fp8, w_scale, quantize_input=False)
    assert torch.equal(fp8_linear(few, w_fp8, w_scale), exact)
    assert not torch.equal(exact, fp8_linear_reference(few, w_fp8, w_scale))


def test_fp8_linear_dequantizes_once_and_again_after_a_load():
    layer = Fp8Linear(32, 16)
    gen = torch.Generator().manual_seed(5)
    q, scale = quantize_rows(torch.randn(16, 32, generator=gen))
    layer.weight.data.copy_(q)
    layer.weight_scale.data.copy_(scale.view(-1))
    x = torch.randn(20, 32, generator=gen)
    first = layer(x)
    cached = layer._dequantized
    assert torch.equal(layer(x), first) and layer._dequantized is cached
    with torch.no_grad():
        layer.weight_scale.mul_(2)  # in place: the version counter says so
    assert torch.allclose(layer(x), 2 * first, rtol=1e-6, atol=1e-6)
    layer.weight_scale.data.mul_(2)  # through .data (as loaders write): told explicitly
    layer.weights_changed()
    assert torch.allclose(layer(x), 4 * first, rtol=1e-6, atol=1e-6)
    with torch.inference_mode():  # inference tensors have no version counter
        made = Fp8Linear(32, 16)
        made.weight.copy_(q)
        made.weight_scale.copy_(scale.view(-1))
        assert torch.equal(made(x), first)


@pytest.mark.parametrize(("m", "n", "k"), [(1, 40, 72), (5, 33, 64), (16, 64, 200)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_m_gemm_under_the_interpreter(m, n, k, dtype):
    gen = torch.Generator().manual_seed(m * n + k)
    w_fp8, w_scale = quantize_rows(torch.randn(n, k, generator=gen) * 0.02)
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    out = fp8_small_m_gemm(x, w_fp8, w_scale.view(-1), bias)
    assert out.dtype == dtype and out.shape == (m, n)
    ref = f64_product(x.float(), w_fp8, w_scale.view(-1), bias.float(), quantize_input=False)
    assert rel_err(out, ref) < (1e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("operands", ["input", "float16"])
def test_small_m_gemm_operand_modes_under_the_interpreter(operands):
    """Every operand mode computes the same product, the activation kept exact."""
    gen = torch.Generator().manual_seed(5)
    w_fp8, w_scale = quantize_rows(torch.randn(24, 64, generator=gen) * 0.02)
    x = torch.randn(3, 64, generator=gen)
    bias = torch.randn(24, generator=gen)
    out = fp8_small_m_gemm(x, w_fp8, w_scale.view(-1), bias, operands=operands)
    ref = f64_product(x, w_fp8, w_scale.view(-1), bias, quantize_input=False)
    assert rel_err(out, ref) < 1e-6


@pytest.mark.parametrize(
    ("m", "n", "k", "split_k"),
    [(1, 70, 96, 1), (3, 130, 100, 2), (16, 64, 512, 4), (5, 200, 64, 3)],
)
def test_swap_ab_gemm_under_the_interpreter(m, n, k, split_k):
    """W8A8 with split K: the programs' partial sums add up to the float64 product of the
    per-row-quantized activation and the FP8 weight, and the split-K counters end at zero."""
    from radixlm.model.layers.fp8_triton import _locks

    gen = torch.Generator().manual_seed(m * n + k)
    w_fp8, w_scale = quantize_rows(torch.randn(n, k, generator=gen) * 0.05)
    x = torch.randn(m, k, generator=gen)
    bias = torch.randn(n, generator=gen)
    out = fp8_swap_ab_gemm(x, w_fp8, w_scale.view(-1), bias, block_n=64, block_k=32,
                           split_k=split_k)  # fmt: skip
    ref = f64_product(x, w_fp8, w_scale.view(-1), bias, quantize_input=True)
    assert rel_err(out, ref) < 1e-6
    assert not _locks(torch.device("cpu")).any()


def test_swap_ab_gemm_refuses_more_than_16_rows():
    w_fp8, w_scale = quantize_rows(torch.randn(64, 32))
    with pytest.raises(ValueError, match="at most 16 rows"):
        fp8_swap_ab_gemm(torch.randn(17, 32), w_fp8, w_scale.view(-1))


def test_small_m_gemm_refuses_large_m():
    w_fp8, w_scale = quantize_rows(torch.randn(16, 16))
    with pytest.raises(ValueError, match="at most 64 rows"):
        fp8_small_m_gemm(torch.randn(65, 16), w_fp8, w_scale.view(-1))


def test_fp8_linear_keeps_its_dtypes_through_model_casts():
    with torch.device("meta"):
        layer = Fp8Linear(32, 16, bias=True)
    layer = layer.to(dtype=torch.bfloat16).to_empty(device="cpu")
    assert layer.weight.dtype == FP8_DTYPE and layer.weight.device.type == "cpu"
    assert layer.weight_scale.dtype == torch.float32 and layer.bias.dtype == torch.bfloat16
    layer = layer.half()
    assert layer.weight.dtype == FP8_DTYPE and layer.weight_scale.dtype == torch.float32
    assert layer.bias.dtype == torch.float16


# ------------------------------------------------------------------------ config parsing


def test_checkpoint_quantization_from_config():
    assert checkpoint_quantization({}) == "none"
    fp8 = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    assert checkpoint_quantization({"quantization_config": fp8}) == "fp8"
    ct = {"quant_method": "compressed-tensors", "config_groups": {"g": {"weights": {
        "num_bits": 8, "type": "float", "strategy": "channel"}}}}  # fmt: skip
    assert checkpoint_quantization({"quantization_config": ct}) == "fp8"
    block = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    with pytest.raises(UnsupportedModelError, match="block-wise"):
        checkpoint_quantization({"quantization_config": block})
    with pytest.raises(UnsupportedModelError, match="awq"):
        checkpoint_quantization({"quantization_config": {"quant_method": "awq"}})


def test_resolve_quantization(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"quantization_config": {"quant_method": "fp8"}})
    )
    assert resolve_quantization("auto", tmp_path) == "fp8"
    assert resolve_quantization("fp8", tmp_path) == "fp8"
    with pytest.raises(ValueError, match="FP8-quantized"):
        resolve_quantization("none", tmp_path)
    assert resolve_quantization("auto", None) == "none"
    with pytest.raises(ValueError, match="unknown quantization"):
        resolve_quantization("int4", None)


# ------------------------------------------------------------------------ loading


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_random_model_dir(tmp_path_factory.mktemp("fp8-tiny"), "llama", seed=3)


def logits_of(model, prompts: list[list[int]]) -> torch.Tensor:
    arch = model.arch
    device = model.lm_head.weight.device
    pool = KVPool(arch.num_layers, arch.num_kv_heads, arch.head_dim, 256, 1,
                  model.lm_head.weight.dtype, device)  # fmt: skip
    slots, start = [], pool.first_usable_slot
    for p in prompts:
        slots.append(list(range(start, start + len(p))))
        start += len(p)
    rows = [list(range(len(p))) for p in prompts]
    batch = ForwardBatch.build(prompts, slots, logits_rows=rows, device=device)
    return model(batch, pool, TorchAttentionBackend()).cpu()


PROMPTS = [[1, 5, 9, 200, 17, 3], [7, 8, 9, 10]]


def test_quantize_on_load_matches_per_channel_quantization_of_the_checkpoint(tiny_dir):
    model = load_model(tiny_dir, "float32", "cpu", progress=False, quantization="fp8")
    tensors = load_file(str(tiny_dir / "model.safetensors"))
    arch = model.arch
    layer = model.model.layers[1]
    qkv = layer.self_attn.qkv_proj
    assert isinstance(qkv, Fp8Linear) and isinstance(layer.mlp.down_proj, Fp8Linear)
    # The embedding, LM head and norms are untouched.
    assert model.model.embed_tokens.weight.dtype == torch.float32
    assert model.lm_head.weight.dtype == torch.float32
    assert torch.equal(model.model.norm.weight, tensors["model.norm.weight"])
    start = 0
    for name, rows in (("q_proj", arch.q_size), ("k_proj", arch.kv_size), ("v_proj", arch.kv_size)):
        q, scale = quantize_rows(tensors[f"model.layers.1.self_attn.{name}.weight"])
        block = slice(start, start + rows)
        assert torch.equal(qkv.weight[block].view(torch.uint8), q.view(torch.uint8))
        assert torch.equal(qkv.weight_scale[block], scale.view(-1))
        start += rows
    assert start == qkv.out_features


def test_fp8_model_logits_stay_close_to_the_float_model(tiny_dir):
    ref = logits_of(load_model(tiny_dir, "float32", "cpu", progress=False), PROMPTS)
    fp8 = logits_of(
        load_model(tiny_dir, "float32", "cpu", progress=False, quantization="fp8"), PROMPTS
    )
    # Activations and weights each round to 3 mantissa bits (about 5% here, on a random model
    # whose logits are all small); a different random model is off by over 100%.
    assert 0 < rel_err(fp8, ref.double()) < 0.1


def write_fp8_checkpoint(src: Path, dst: Path) -> dict[str, torch.Tensor]:
    """The tiny model in the vLLM FP8 layout: q/k/v per-tensor scales ([] shape), the rest
    per-channel ([N, 1]); static input scales; KV-cache scales on layer 0 (k/v) and layer 1
    (the older single kv_scale). Returns the dequantized projection weights by name."""
    shutil.copytree(src, dst)
    tensors = load_file(str(src / "model.safetensors"))
    out, dequantized = {}, {}
    for name, t in tensors.items():
        proj = name.split(".")[-2] if name.endswith(".weight") else ""
        if proj not in PROJECTIONS:
            out[name] = t
            continue
        prefix = name.removesuffix(".weight")
        if proj in ("q_proj", "k_proj", "v_proj"):
            scale = t.abs().max().float() / 448
            q = (t.float() / scale).clamp(-448, 448).to(FP8_DTYPE)
            out[f"{prefix}.weight_scale"] = scale.reshape(())
            dequantized[name] = q.float() * scale
        else:
            q, scale = quantize_rows(t)
            out[f"{prefix}.weight_scale"] = scale
            dequantized[name] = q.float() * scale
        out[name] = q
        out[f"{prefix}.input_scale"] = torch.tensor(0.05)
    out["model.layers.0.self_attn.k_scale"] = torch.tensor(0.5)
    out["model.layers.0.self_attn.v_scale"] = torch.tensor([0.25])
    out["model.layers.1.self_attn.kv_scale"] = torch.tensor(2.0)
    save_file(out, str(dst / "model.safetensors"))
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "static"}
    (dst / "config.json").write_text(json.dumps(config))
    return dequantized


def test_an_fp8_checkpoint_loads_as_is(tiny_dir, tmp_path):
    fp8_dir = tmp_path / "fp8"
    dequantized = write_fp8_checkpoint(tiny_dir, fp8_dir)
    model = load_model(fp8_dir, "float32", "cpu", progress=False)  # auto: from config.json
    arch = model.arch
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, Fp8Linear)
    # Per-tensor scales broadcast over their block's rows, so dequantizing gives them back.
    start = 0
    for name, rows in (("q_proj", arch.q_size), ("k_proj", arch.kv_size), ("v_proj", arch.kv_size)):
        block = slice(start, start + rows)
        back = qkv.weight[block].float() * qkv.weight_scale[block, None]
        assert torch.equal(back, dequantized[f"model.layers.0.self_attn.{name}.weight"])
        start += rows
    down = model.model.layers[1].mlp.down_proj
    back = down.weight.float() * down.weight_scale[:, None]
    assert torch.equal(back, dequantized["model.layers.1.mlp.down_proj.weight"])
    assert model.kv_scales[0] == (0.5, 0.25) and model.kv_scales[1] == (2.0, 2.0)
    # The same model computed with the dequantized weights in float (activations quantized
    # per token on the fly in both).
    float_model = load_model(tiny_dir, "float32", "cpu", progress=False)
    for name, param in float_model.named_parameters():
        if name.endswith("_proj.weight"):
            layer = model.get_submodule(name.removesuffix(".weight"))
            param.data.copy_(layer.weight.float() * layer.weight_scale[:, None])
    ref = logits_of(float_model, PROMPTS)
    assert rel_err(logits_of(model, PROMPTS), ref.double()) < 0.1


def test_an_fp8_checkpoint_without_fp8_is_refused(tiny_dir, tmp_path):
    fp8_dir = tmp_path / "fp8"
    write_fp8_checkpoint(tiny_dir, fp8_dir)
    with pytest.raises(ValueError, match="FP8-quantized"):
        load_model(fp8_dir, "float32", "cpu", progress=False, quantization="none")


def test_a_missing_weight_scale_is_reported(tiny_dir, tmp_path):
    fp8_dir = tmp_path / "fp8"
    write_fp8_checkpoint(tiny_dir, fp8_dir)
    tensors = load_file(str(fp8_dir / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight_scale"]
    save_file(tensors, str(fp8_dir / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing 1 weight.*up_proj\.weight_scale"):
        load_model(fp8_dir, "float32", "cpu", progress=False)


# ------------------------------------------------------------------------ GPU

LLAMA3_8B_PROJECTIONS = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]  # (K, N)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2, 4, 7, 16, 17, 64, 512])
@pytest.mark.parametrize(("k", "n"), LLAMA3_8B_PROJECTIONS)
def test_gpu_fp8_linear_matches_the_reference(m, k, n):
    gen = torch.Generator().manual_seed(m + k + n)
    w_fp8, w_scale = quantize_rows((torch.randn(n, k, generator=gen) * 0.02).cuda())
    w_scale = w_scale.view(-1)
    x = torch.randn(m, k, generator=gen).cuda().bfloat16()
    out = fp8_linear(x, w_fp8, w_scale)
    assert out.dtype == torch.bfloat16 and out.shape == (m, n)
    small = m <= Fp8LinearConfig().triton_max_m
    ref = f64_product(x.float(), w_fp8, w_scale, quantize_input=not small).cpu()
    # bf16 output rounding (2^-9) plus, on the _scaled_mm path, rare one-step activation
    # rounding differences of the GPU's division.
    assert rel_err(out, ref) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("operands", ["input", "float16"])
@pytest.mark.parametrize(("k", "n"), LLAMA3_8B_PROJECTIONS)
def test_gpu_small_m_gemm_operand_modes(operands, k, n):
    gen = torch.Generator().manual_seed(k + n)
    w_fp8, w_scale = quantize_rows((torch.randn(n, k, generator=gen) * 0.02).cuda())
    w_scale = w_scale.view(-1).contiguous()
    x = torch.randn(4, k, generator=gen).cuda().bfloat16()
    for block_n, block_k in ((16, 256), (32, 256)):
        out = fp8_small_m_gemm(x, w_fp8, w_scale, None, block_n, block_k, operands)
        ref = f64_product(x.float(), w_fp8, w_scale, quantize_input=False).cpu()
        assert rel_err(out, ref) < 1e-2, (block_n, block_k)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 4, 16])
@pytest.mark.parametrize(("k", "n"), LLAMA3_8B_PROJECTIONS)
def test_gpu_swap_ab_gemm_every_benchmarked_tile(m, k, n):
    """Every tile ``bench fp8-gemm`` may pick (wgmma on FP8, split-K counters) against the
    float64 W8A8 product; replayed from a CUDA graph twice, the counters reset each time."""
    from radixlm.bench.fp8_gemm import DEFAULT_SWAP_AB_TILES, parse_swap_ab_tile

    gen = torch.Generator().manual_seed(m + k + n)
    w_fp8, w_scale = quantize_rows((torch.randn(n, k, generator=gen) * 0.02).cuda())
    w_scale = w_scale.view(-1).contiguous()
    x = torch.randn(m, k, generator=gen).cuda().bfloat16()
    ref = f64_product(x.float(), w_fp8, w_scale, quantize_input=True).cpu()
    for text in DEFAULT_SWAP_AB_TILES:
        c = parse_swap_ab_tile(text)
        run = lambda c=c: fp8_swap_ab_gemm(x, w_fp8, w_scale, None, c.block_n, c.block_k,  # noqa: E731
                                           c.split_k)  # fmt: skip
        assert rel_err(run(), ref) < 1e-2, text
        graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            run()
        torch.cuda.current_stream().wait_stream(stream)
        with torch.cuda.graph(graph):
            out = run()
        for _ in range(2):
            out.zero_()
            graph.replay()
            torch.cuda.synchronize()
            assert rel_err(out, ref) < 1e-2, text


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 64, 2048])
def test_gpu_quantize_per_token_matches_torch(m):
    gen = torch.Generator().manual_seed(m)
    x = (torch.randn(m, 14336, generator=gen) * 3).cuda().bfloat16()
    q, scale = quantize_per_token(x)
    ref_q, ref_scale = quantize_rows(x)
    assert torch.allclose(scale, ref_scale, rtol=1e-6, atol=0)
    differ = (q.view(torch.uint8) != ref_q.view(torch.uint8)).float().mean().item()
    assert differ < 1e-3
    assert torch.allclose(q.float(), ref_q.float(), rtol=0.13, atol=2**-9)


@pytest.mark.gpu
def test_gpu_fp8_model_logits_stay_close_to_bf16(tiny_dir):
    ref = logits_of(load_model(tiny_dir, "bfloat16", "cuda", progress=False), PROMPTS)
    model = load_model(tiny_dir, "bfloat16", "cuda", progress=False, quantization="fp8")
    assert rel_err(logits_of(model, PROMPTS), ref.double()) < 0.12
