"""Linear-layer kernels at few rows, per projection of a model: FP8 and bf16 weights (GPU).

For each decoder projection shape (K -> N) and each row count M, it times every candidate kernel
(a CUDA graph of ``--calls`` back-to-back calls, replayed; median of ``--repeats`` replays,
timed with CUDA events):

- bf16 weight: ``cublas`` (``F.linear``), and for M <= 8 the GEMV kernel
  (:mod:`radixlm.model.layers.gemv_triton`) at each ``--bf16-gemv-tiles`` tile;
- FP8 weight: ``scaled_mm`` (per-token activation quantization + ``torch._scaled_mm``, the
  path above 16 rows), the tensor-core small-M kernel (``dot`` on the activation's dtype,
  ``dot_f16`` on fp16) at each
  ``--dot-tiles`` tile, the FP8 tensor-core swap-AB kernel (``swap_ab``: the weight as the
  wgmma's 64-row side, split-K) at each ``--swap-ab-tiles`` tile, and for M <= 8 the GEMV at
  each ``--fp8-gemv-tiles`` tile (``widen`` ``cvt`` or ``bits``).

Beside each winner: the weight bytes it must read over the measured HBM bandwidth (a step at
small M is bound by them), as ``% roof``. With ``--tune-out FILE`` the winners for M <= 16 go
to FILE in the layout :mod:`radixlm.model.layers.tuned` reads; written to
``radixlm/model/layers/tuned/<gpu>.json`` it becomes what the layers run on that GPU.

Usage: radixlm bench fp8-gemm [--random-model llama3-8b | --model DIR] [--ms 1 2 4 8 16 64]
       [--lm-head] [--tune-out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from radixlm.bench.common import format_table, measure_ceilings, run_header, write_json
from radixlm.model.arch import ModelArch
from radixlm.model.layers.tuned import MAX_TUNED_M, KernelChoice

COLUMNS = [
    ("proj", "proj"), ("k", "K"), ("n", "N"), ("m", "M"), ("cublas_us", "bf16 cuBLAS us"),
    ("bf16_best_us", "bf16 best us"), ("bf16_best", "bf16 best"), ("bf16_roof_pct", "% roof"),
    ("scaled_mm_us", "scaled_mm us"), ("fp8_best_us", "fp8 best us"), ("fp8_best", "fp8 best"),
    ("fp8_roof_pct", "fp8 % roof"), ("speedup", "fp8 best / cuBLAS"),
]  # fmt: skip
DEFAULT_BF16_GEMV_TILES = ["4x512/4", "2x1024/4", "8x512/8", "4x1024/8"]
DEFAULT_FP8_GEMV_TILES = ["4x1024/4", "4x1024/4/bits", "2x2048/4/bits", "8x1024/8/bits",
                          "2x1024/4"]  # fmt: skip
DEFAULT_DOT_TILES = ["16x256", "32x256"]
DEFAULT_SWAP_AB_TILES = ["64x256/1", "64x256/2", "64x256/4", "128x256/2"]
GEMV_LIMIT = 8  # gemv_triton.GEMV_MAX_M
# Our kernel replaces cuBLAS on an unquantized weight only when it is this much faster.
MIN_GAIN = 1.03


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="radixlm bench fp8-gemm",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--random-model", default="llama3-8b", help="preset whose shapes to use")
    source.add_argument("--model", default=None, help="a model directory whose shapes to use")
    parser.add_argument("--ms", type=int, nargs="+", default=[1, 2, 4, 8, 16, 64])
    parser.add_argument(
        "--bf16-gemv-tiles",
        nargs="*",
        default=DEFAULT_BF16_GEMV_TILES,
        help="GEMV tiles on the bf16 weight, each BLOCK_NxBLOCK_K/WARPS",
    )
    parser.add_argument(
        "--fp8-gemv-tiles",
        nargs="*",
        default=DEFAULT_FP8_GEMV_TILES,
        help="GEMV tiles on the FP8 weight, BLOCK_NxBLOCK_K/WARPS[/bits]",
    )
    parser.add_argument(
        "--dot-tiles",
        nargs="*",
        default=DEFAULT_DOT_TILES,
        help="tensor-core small-M tiles, BLOCK_NxBLOCK_K",
    )
    parser.add_argument(
        "--swap-ab-tiles",
        nargs="*",
        default=DEFAULT_SWAP_AB_TILES,
        help="FP8 tensor-core swap-AB tiles, BLOCK_NxBLOCK_K/SPLIT_K",
    )
    parser.add_argument("--lm-head", action="store_true", help="also time the LM head shape")
    parser.add_argument("--calls", type=int, default=20, help="calls per timed graph")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--hbm-gbps", type=float, default=None)
    parser.add_argument(
        "--tune-out", default=None, help="write the winners at M <= 16 as a tuned plan (JSON) here"
    )
    parser.add_argument("--out", default=None)
    return parser.parse_args(argv)


def projection_shapes(arch: ModelArch) -> list[tuple[str, int, int]]:
    """(name, K, N) of the decoder's four projections."""
    qkv = arch.q_size + 2 * arch.kv_size
    return [("qkv_proj", arch.hidden_size, qkv), ("o_proj", arch.q_size, arch.hidden_size),
            ("gate_up_proj", arch.hidden_size, 2 * arch.intermediate_size),
            ("down_proj", arch.intermediate_size, arch.hidden_size)]  # fmt: skip


def parse_gemv_tile(text: str) -> KernelChoice:
    """``"4x1024/8/bits"`` -> the GEMV with block_n 4, block_k 1024, 8 warps, bit widening."""
    shape, _, rest = text.partition("/")
    warps, _, widen = rest.partition("/")
    block_n, block_k = (int(v) for v in shape.split("x"))
    return KernelChoice("gemv", block_n, block_k, int(warps or 4), widen or "cvt")


def parse_dot_tile(text: str, kernel: str) -> KernelChoice:
    block_n, block_k = (int(v) for v in text.split("x"))
    return KernelChoice(kernel, block_n, block_k)


def parse_swap_ab_tile(text: str) -> KernelChoice:
    """``"64x256/4"`` -> the swap-AB kernel with block_n 64, block_k 256, split-K 4."""
    shape, _, split = text.partition("/")
    block_n, block_k = (int(v) for v in shape.split("x"))
    return KernelChoice("swap_ab", block_n, block_k, split_k=int(split or 1))


def label(choice: KernelChoice) -> str:
    if not choice.block_n:
        return choice.kernel
    tile = f"{choice.block_n}x{choice.block_k}"
    if choice.split_k != 1:
        tile += f"/{choice.split_k}"
    if choice.kernel == "gemv":
        tile += f"/{choice.num_warps}" + (f"/{choice.widen}" if choice.widen != "cvt" else "")
    return f"{choice.kernel} {tile}"


def time_graph(fn: Callable[[], Any], calls: int, repeats: int) -> float:
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


def fp8_call(choice: KernelChoice, x, w_fp8, w_scale) -> Callable[[], Any]:
    from radixlm.model.layers.fp8 import run_fp8_choice

    return lambda: run_fp8_choice(choice, x, w_fp8, w_scale, None)


def bf16_call(choice: KernelChoice, x, w) -> Callable[[], Any]:
    from radixlm.model.layers.gemv_triton import GemvTile, gemv

    if choice.kernel == "cublas":
        return lambda: F.linear(x, w)
    tile = GemvTile(choice.block_n, choice.block_k, choice.num_warps)
    return lambda: gemv(x, w, None, None, tile)


def fastest(
    candidates: list[tuple[KernelChoice, Callable[[], Any]]], args: argparse.Namespace
) -> dict[KernelChoice, float]:
    """Microseconds per candidate; one that fails to compile or launch (a tile too large for
    the GPU's shared memory or registers) is left out and named on stderr."""
    times = {}
    for choice, fn in candidates:
        try:
            times[choice] = time_graph(fn, args.calls, args.repeats)
        except Exception as exc:  # noqa: BLE001 (a tile the GPU cannot run is skipped)
            print(f"  skipped {label(choice)}: {type(exc).__name__}: {str(exc)[:120]}",
                  file=sys.stderr)  # fmt: skip
    return times


def measure(
    name: str, k: int, n: int, m: int, args: argparse.Namespace, hbm_gbps: float
) -> tuple[dict[str, Any], KernelChoice | None, KernelChoice | None]:
    """One shape and row count: the table row, and the bf16 / FP8 winners."""
    from radixlm.model.layers.fp8 import quantize_rows

    gen = torch.Generator(device="cuda").manual_seed(k * n + m)
    w = torch.randn(n, k, device="cuda", generator=gen).mul_(0.02).bfloat16()
    w_fp8, w_scale = quantize_rows(w)
    w_scale = w_scale.view(-1).contiguous()
    x = torch.randn(m, k, device="cuda", generator=gen).bfloat16()
    bf16 = [KernelChoice("cublas")]
    fp8 = [KernelChoice("scaled_mm")]
    if m <= MAX_TUNED_M:
        fp8 += [
            parse_dot_tile(t, kind)
            for kind in ("dot", "dot_f16")
            for t in args.dot_tiles
        ]
        fp8 += [parse_swap_ab_tile(t) for t in args.swap_ab_tiles]
    if m <= GEMV_LIMIT:
        bf16 += [parse_gemv_tile(t) for t in args.bf16_gemv_tiles]
        fp8 += [parse_gemv_tile(t) for t in args.fp8_gemv_tiles]
    bf16_times = fastest([(c, bf16_call(c, x, w)) for c in bf16], args)
    fp8_times = fastest([(c, fp8_call(c, x, w_fp8, w_scale)) for c in fp8], args)
    best_bf16 = min(bf16_times, key=bf16_times.get)
    if bf16_times.get(KernelChoice("cublas"), float("inf")) <= MIN_GAIN * bf16_times[best_bf16]:
        best_bf16 = KernelChoice("cublas")  # within noise of cuBLAS: keep the library
    best_fp8 = min(fp8_times, key=fp8_times.get) if fp8_times else None
    floor_bf16 = n * k * 2 / (hbm_gbps * 1e3)  # us
    floor_fp8 = (n * k + 4 * n) / (hbm_gbps * 1e3)
    cublas = bf16_times.get(KernelChoice("cublas"))
    row: dict[str, Any] = {
        "proj": name, "k": k, "n": n, "m": m, "cublas_us": cublas,
        "bf16_best_us": bf16_times[best_bf16], "bf16_best": label(best_bf16),
        "bf16_roof_pct": 100 * floor_bf16 / bf16_times[best_bf16],
        "scaled_mm_us": fp8_times.get(KernelChoice("scaled_mm")),
        "bf16_all_us": {label(c): t for c, t in bf16_times.items()},
        "fp8_all_us": {label(c): t for c, t in fp8_times.items()},
    }  # fmt: skip
    if best_fp8 is not None:
        row.update(fp8_best_us=fp8_times[best_fp8], fp8_best=label(best_fp8),
                   fp8_roof_pct=100 * floor_fp8 / fp8_times[best_fp8],
                   speedup=cublas / fp8_times[best_fp8] if cublas else None)  # fmt: skip
    return row, best_bf16, best_fp8


def tuned_plan(
    results: list[tuple[dict, KernelChoice, KernelChoice | None]],
    device: str,
    argv: list[str] = (),
) -> dict[str, Any]:
    """The winners at M <= 16 in the layout of :mod:`radixlm.model.layers.tuned`."""
    plan: dict[str, Any] = {
        "device": device,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "radixlm bench fp8-gemm " + shlex.join(argv),
        "fp8": {}, "bf16": {},
    }  # fmt: skip
    for row, best_bf16, best_fp8 in results:
        if row["m"] > MAX_TUNED_M or row["proj"] == "lm_head":
            continue
        shape = f"{row['n']}x{row['k']}"
        plan["bf16"].setdefault(shape, {})[str(row["m"])] = best_bf16.to_dict()
        if best_fp8 is not None:
            plan["fp8"].setdefault(shape, {})[str(row["m"])] = best_fp8.to_dict()
    return plan


def main(argv: list[str] | None = None) -> int:
    """Time every projection x M; print the table; write JSON with --out, the plan with
    --tune-out."""
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
    results = [measure(name, k, n, m, args, ceil.hbm_gbps) for name, k, n in shapes
               for m in args.ms]  # fmt: skip
    rows = [r for r, _, _ in results]
    print(f"fp8-gemm on {torch.cuda.get_device_name()}: HBM {ceil.hbm_gbps:.4g} GB/s")
    print(format_table(rows, COLUMNS))
    write_json(args.out, {**run_header(device, ceil, args.model or args.random_model),
                          "rows": rows})  # fmt: skip
    if args.tune_out:
        path = Path(args.tune_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        given = sys.argv[1:] if argv is None else argv
        plan = tuned_plan(
            results,
            torch.cuda.get_device_name(),
            given[given.index("fp8-gemm") + 1 :] if "fp8-gemm" in given else given,
        )
        path.write_text(json.dumps(plan, indent=1) + "\n")
        print(f"tuned plan written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
