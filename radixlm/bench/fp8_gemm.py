"""FP8 linear layers against bf16, per projection of a model, across row counts (GPU).

For each decoder projection shape (K -> N) and each row count M, times (CUDA graph of
``--calls`` back-to-back calls, replayed; median of ``--repeats`` replays, CUDA events):

- ``bf16``: ``F.linear`` on the bf16 weight;
- ``scaled_mm``: per-token activation quantization (Triton) + ``torch._scaled_mm`` with
  row-wise scales, the path ``Fp8Linear`` takes for M > ``triton_max_m``;
- ``triton``: the W8A16 small-M tensor-core kernel (M <= 64), at every ``--block-n`` x
  ``--block-k`` tried, the best reported;
- ``gemv``: the weight-streaming CUDA-core kernel (M <= 8, :mod:`radixlm.model.layers.gemv_triton`)
  on the FP8 weight, and ``bf16 gemv`` the same kernel on the bf16 weight (a candidate for the
  unquantized model's batch-1 projections against cuBLAS), each at every ``--gemv-tiles`` tile,
  the best reported with its tile (``block_n x block_k / warps``).

Beside each time the weight bytes it must read over the measured HBM bandwidth (a step at small
M is bound by them): ``% roof`` is that floor over the time. The last column says which FP8 path
wins at that M, which is what ``Fp8LinearConfig.triton_max_m`` should follow.

Usage: radixlm bench fp8-gemm [--random-model llama3-8b | --model DIR] [--ms 1 8 16 64 512]
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F

from radixlm.bench.common import (
    format_table,
    measure_ceilings,
    run_header,
    write_json,
)
from radixlm.model.arch import ModelArch

COLUMNS = [
    ("proj", "proj"), ("k", "K"), ("n", "N"), ("m", "M"), ("bf16_us", "bf16 us"),
    ("bf16_roof_pct", "% roof"), ("bf16_gemv_us", "bf16 gemv us"), ("bf16_gemv_cfg", "cfg"),
    ("scaled_mm_us", "scaled_mm us"), ("triton_us", "triton us"), ("triton_cfg", "cfg"),
    ("gemv_us", "gemv us"), ("gemv_cfg", "cfg"), ("fp8_roof_pct", "fp8 % roof"),
    ("speedup", "fp8 x"), ("best", "best fp8"),
]  # fmt: skip
DEFAULT_GEMV_TILES = ["2x512/4", "2x1024/4", "4x512/4", "4x1024/4", "4x2048/4", "8x1024/4",
                      "8x2048/8", "1x1024/4", "1x2048/4", "16x1024/8", "4x1024/8"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="radixlm bench fp8-gemm",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--random-model", default="llama3-8b", help="preset whose shapes to use")
    source.add_argument("--model", default=None, help="a model directory whose shapes to use")
    parser.add_argument(
        "--ms", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 512, 2048]
    )
    parser.add_argument("--block-n", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--block-k", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--gemv-tiles", nargs="+", default=DEFAULT_GEMV_TILES,
                        help="gemv tiles to try, each BLOCK_NxBLOCK_K/WARPS")
    parser.add_argument("--lm-head", action="store_true",
                        help="also time the LM head shape (bf16 columns are the ones that matter)")
    parser.add_argument("--calls", type=int, default=20, help="calls per timed graph")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--hbm-gbps", type=float, default=None)
    parser.add_argument("--out", default=None)
    return parser.parse_args(argv)


def projection_shapes(arch: ModelArch) -> list[tuple[str, int, int]]:
    """(name, K, N) of the decoder's four projections."""
    qkv = arch.q_size + 2 * arch.kv_size
    return [("qkv_proj", arch.hidden_size, qkv), ("o_proj", arch.q_size, arch.hidden_size),
            ("gate_up_proj", arch.hidden_size, 2 * arch.intermediate_size),
            ("down_proj", arch.intermediate_size, arch.hidden_size)]  # fmt: skip


def parse_tile(text: str):
    """``"4x1024/8"`` -> GemvTile(4, 1024, 8)."""
    from radixlm.model.layers.gemv_triton import GemvTile

    shape, _, warps = text.partition("/")
    block_n, block_k = (int(v) for v in shape.split("x"))
    return GemvTile(block_n, block_k, int(warps or 4))


def best_gemv(x, w, scale, tiles, args) -> tuple[float, str] | None:
    """(microseconds, tile) of the fastest gemv tile that compiles for this shape."""
    from triton.runtime.errors import OutOfResources

    from radixlm.model.layers.gemv_triton import gemv

    tried = {}
    for text in tiles:
        tile = parse_tile(text)
        try:
            tried[text] = time_graph(lambda tile=tile: gemv(x, w, scale, None, tile),
                                     args.calls, args.repeats)  # fmt: skip
        except OutOfResources:
            continue
    if not tried:
        return None
    cfg = min(tried, key=tried.get)
    return tried[cfg], cfg


def time_graph(fn, calls: int, repeats: int) -> float:
    """Median microseconds of one ``fn()`` call, from CUDA-graph replays of ``calls`` calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return sorted(times)[len(times) // 2]


def measure(
    name: str, k: int, n: int, m: int, args: argparse.Namespace, hbm_gbps: float
) -> dict[str, Any]:
    from triton.runtime.errors import OutOfResources

    from radixlm.model.layers.fp8 import _scaled_mm_linear, quantize_rows
    from radixlm.model.layers.fp8_triton import fp8_small_m_gemm
    from radixlm.model.layers.gemv_triton import GEMV_MAX_M

    gen = torch.Generator(device="cuda").manual_seed(k * n + m)
    w = torch.randn(n, k, device="cuda", generator=gen).mul_(0.02).bfloat16()
    w_fp8, w_scale = quantize_rows(w)
    w_scale = w_scale.view(-1).contiguous()
    x = torch.randn(m, k, device="cuda", generator=gen).bfloat16()
    row: dict[str, Any] = {"proj": name, "k": k, "n": n, "m": m}
    floor_bf16 = (n * k * 2) / (hbm_gbps * 1e3)  # us
    floor_fp8 = (n * k + 4 * n) / (hbm_gbps * 1e3)
    row["bf16_us"] = time_graph(lambda: F.linear(x, w), args.calls, args.repeats)
    row["bf16_roof_pct"] = 100 * floor_bf16 / row["bf16_us"]
    if m <= GEMV_MAX_M:
        found = best_gemv(x, w, None, args.gemv_tiles, args)
        if found:
            row["bf16_gemv_us"], row["bf16_gemv_cfg"] = found
    row["scaled_mm_us"] = time_graph(lambda: _scaled_mm_linear(x, w_fp8, w_scale, None),
                                     args.calls, args.repeats)  # fmt: skip
    best = ("scaled_mm", row["scaled_mm_us"])
    if m <= 64:
        tried = {}
        for bn in args.block_n:
            for bk in args.block_k:
                try:
                    tried[f"{bn}x{bk}"] = time_graph(
                        lambda bn=bn, bk=bk: fp8_small_m_gemm(x, w_fp8, w_scale, block_n=bn,
                                                              block_k=bk),
                        args.calls, args.repeats)  # fmt: skip
                except OutOfResources:  # a tile that needs more shared memory than the GPU has
                    continue
        if tried:
            cfg = min(tried, key=tried.get)
            row["triton_us"], row["triton_cfg"] = tried[cfg], cfg
            if tried[cfg] < best[1]:
                best = ("triton", tried[cfg])
    if m <= GEMV_MAX_M:
        found = best_gemv(x, w_fp8, w_scale, args.gemv_tiles, args)
        if found:
            row["gemv_us"], row["gemv_cfg"] = found
            if found[0] < best[1]:
                best = ("gemv", found[0])
    row["best"] = best[0]
    row["fp8_roof_pct"] = 100 * floor_fp8 / best[1]
    row["speedup"] = row["bf16_us"] / best[1]
    return row


def main(argv: list[str] | None = None) -> int:
    """Time every projection x M; print the table; write JSON with --out."""
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("fp8-gemm needs a CUDA device with FP8 tensor cores (sm89+)")
    device = torch.device("cuda")
    if args.model:
        arch = ModelArch.from_dir(args.model)
    else:
        from radixlm.model.random_model import config_dict

        arch = ModelArch.from_hf_config(config_dict(args.random_model))
    ceil = measure_ceilings(device, args.hbm_gbps, 1.0)
    shapes = projection_shapes(arch)
    if args.lm_head:
        shapes.append(("lm_head", arch.hidden_size, arch.vocab_size))
    rows = [measure(name, k, n, m, args, ceil.hbm_gbps) for name, k, n in shapes
            for m in args.ms]  # fmt: skip
    print(f"fp8-gemm on {torch.cuda.get_device_name()}: HBM {ceil.hbm_gbps:.4g} GB/s")
    print(format_table(rows, COLUMNS))
    write_json(args.out, {**run_header(device, ceil, args.model or args.random_model),
                          "rows": rows})  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
