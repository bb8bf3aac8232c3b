"""The weight-streaming GEMV (few rows): against a float64 reference, FP8 and float weights.

Under the Triton interpreter on CPU at tiny sizes (ragged and even shapes, bias, scales); the
``gpu`` tests run the compiled kernel at the Llama-3-8B projection shapes with every tile that
``radixlm bench fp8-gemm`` tries, so whichever tile the defaults pick has been checked.
"""

from __future__ import annotations

import pytest
import torch

from radixlm.bench.fp8_gemm import DEFAULT_BF16_GEMV_TILES, DEFAULT_FP8_GEMV_TILES, parse_gemv_tile
from radixlm.model.layers.fp8 import Fp8LinearConfig, fp8_linear, quantize_rows
from radixlm.model.layers.gemv_triton import GEMV_MAX_M, GemvTile, default_tile, gemv


def f64_reference(x, w, scale=None, bias=None) -> torch.Tensor:
    wd = w.double() if scale is None else w.double() * scale.double()[:, None]
    out = x.double() @ wd.t()
    return out if bias is None else out + bias.double()


def as_tile(text: str | None) -> GemvTile | None:
    if text is None:
        return None
    c = parse_gemv_tile(text)
    return GemvTile(c.block_n, c.block_k, c.num_warps, c.widen)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double().cpu() - ref.cpu()).norm() / ref.cpu().norm()).item()


@pytest.mark.parametrize(("m", "n", "k"), [(1, 40, 96), (3, 17, 50), (8, 32, 64), (2, 7, 33)])
def test_fp8_weight_under_the_interpreter(m, n, k):
    gen = torch.Generator().manual_seed(m * n + k)
    w_fp8, scale = quantize_rows(torch.randn(n, k, generator=gen) * 0.05)
    scale = scale.view(-1).contiguous()
    x = torch.randn(m, k, generator=gen)
    bias = torch.randn(n, generator=gen)
    out = gemv(x, w_fp8, scale, bias)
    assert out.shape == (m, n) and out.dtype == torch.float32
    # float32 accumulation of exactly widened FP8 values: only summation-order differences
    assert rel_err(out, f64_reference(x, w_fp8, scale, bias)) < 1e-6


@pytest.mark.parametrize("widen", ["cvt", "bits"])
def test_both_fp8_widenings_are_exact_under_the_interpreter(widen):
    """``bits`` moves e4m3 bit fields into float32s (scale times 2^120): exact, zeros,
    negative zeros and subnormals included."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(24, 96, generator=gen) * 0.05
    w[0, :5] = torch.tensor([1e-9, -1e-9, 0.0, -0.0, 3e-6])  # e4m3 subnormals and zeros
    w_fp8, scale = quantize_rows(w)
    scale = scale.view(-1).contiguous()
    x = torch.randn(3, 96, generator=gen)
    out = gemv(x, w_fp8, scale, tile=GemvTile(4, 32, 1, widen))
    assert rel_err(out, f64_reference(x, w_fp8, scale)) < 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("tile", [GemvTile(1, 16, 1), GemvTile(4, 32, 1), GemvTile(8, 64, 2)])
def test_float_weight_under_the_interpreter(dtype, tile):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(4, 80, generator=gen).to(dtype)
    w = torch.randn(24, 80, generator=gen).to(dtype)
    out = gemv(x, w, tile=tile)
    assert out.dtype == dtype
    # inputs exact in fp32, accumulation in fp32: only the output rounding of ``dtype``
    tolerance = {torch.bfloat16: 2**-8, torch.float16: 2**-10, torch.float32: 1e-6}[dtype]
    assert rel_err(out, f64_reference(x, w)) < tolerance


def test_refuses_what_it_cannot_do():
    w_fp8, scale = quantize_rows(torch.randn(8, 16))
    with pytest.raises(ValueError, match="rows"):
        gemv(torch.randn(GEMV_MAX_M + 1, 16), w_fp8, scale.view(-1))
    with pytest.raises(ValueError, match="scales"):
        gemv(torch.randn(1, 16), w_fp8)
    with pytest.raises(ValueError, match="contiguous"):
        gemv(torch.randn(16, 2).t()[:1], w_fp8, scale.view(-1))


def test_default_tiles_keep_the_partial_sums_small():
    for m in range(1, GEMV_MAX_M + 1):
        for width in (1, 2):
            tile = default_tile(m, 4096, 14336, width)
            rows = 1 << (m - 1).bit_length()
            per_thread = rows * tile.block_n * tile.block_k / (32 * tile.num_warps)
            assert per_thread <= 64, (m, width, tile)


LLAMA3_8B_PROJECTIONS = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]  # (K, N)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2, 4, 8])
@pytest.mark.parametrize(("k", "n"), LLAMA3_8B_PROJECTIONS)
def test_gpu_gemv_every_benchmarked_tile(m, k, n):
    gen = torch.Generator().manual_seed(m + k + n)
    w = (torch.randn(n, k, generator=gen) * 0.02).cuda()
    w_fp8, scale = quantize_rows(w)
    scale = scale.view(-1).contiguous()
    w_bf16 = w.bfloat16()
    x = torch.randn(m, k, generator=gen).cuda().bfloat16()
    ref_fp8 = f64_reference(x, w_fp8, scale)
    ref_bf16 = f64_reference(x, w_bf16)
    for text in DEFAULT_FP8_GEMV_TILES + [None]:
        assert rel_err(gemv(x, w_fp8, scale, tile=as_tile(text)), ref_fp8) < 4e-3, text
    for text in DEFAULT_BF16_GEMV_TILES + [None]:
        assert rel_err(gemv(x, w_bf16, tile=as_tile(text)), ref_bf16) < 4e-3, text


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_gpu_fp8_linear_takes_the_gemv_for_few_rows(m):
    assert m <= Fp8LinearConfig().gemv_max_m
    gen = torch.Generator().manual_seed(m)
    w_fp8, scale = quantize_rows((torch.randn(1024, 512, generator=gen) * 0.02).cuda())
    scale = scale.view(-1).contiguous()
    bias = torch.randn(1024, generator=gen).cuda().bfloat16()
    x = torch.randn(m, 512, generator=gen).cuda().bfloat16()
    out = fp8_linear(x, w_fp8, scale, bias)
    assert torch.equal(out, gemv(x, w_fp8, scale, bias))
    assert rel_err(out, f64_reference(x, w_fp8, scale, bias)) < 4e-3
