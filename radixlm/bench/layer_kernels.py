"""Fused layer kernels vs the torch layers (issue 8): checks, per-kernel timings, a decode step.

Three parts, all in one process on one device:

1. Checks: each fused kernel (radixlm/model/layers/triton_ops.py) against its torch reference on
   fresh random inputs, in bf16 and float32 (relative error of the whole output).
2. Kernel timings at Llama-3-8B shapes (hidden 4096, intermediate 14336, 32/8 heads of 128) for
   T tokens: the torch layer (several small kernels) vs the fused kernel, each called once per
   layer on its own inputs (32 input sets, like the model's 32 layers) inside a CUDA graph, so
   launch gaps count as they do in a captured decode step. Bytes are each kernel's fewest
   (inputs read once, outputs written once); GB/s against the measured copy bandwidth.
3. A whole decode step of a random-weight llama3-8b (bf16, Triton attention, ``--context``
   tokens per sequence including the new one) replayed from a CUDA graph, captured once with the
   torch layers (``RADIXLM_DISABLE_FUSED=1`` while capturing) and once with the fused ones, timed
   alternately; the floor is the step's weight + KV bytes over the copy bandwidth measured here.

Run ``python -m radixlm.bench.layer_kernels`` (``--device cpu --shape tiny --skip-model`` is a
smoke run: kernels under the Triton interpreter, host-clock timings, no model).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from radixlm.bench.attention_kernels import time_per_layer
from radixlm.bench.common import (
    Ceilings,
    ModelCost,
    device_name,
    format_table,
    measure_ceilings,
    time_median,
    write_json,
)
from radixlm.model.layers import triton_ops
from radixlm.model.layers.activation import silu_and_mul_reference
from radixlm.model.layers.fused import DISABLE_FUSED_ENV
from radixlm.model.layers.norm import rms_norm_reference
from radixlm.model.layers.rotary import RotaryEmbedding, rotary_reference

EPS = 1e-5


@dataclass(frozen=True)
class Shape:
    """The layer sizes the kernels run at."""

    hidden: int
    intermediate: int
    q_heads: int
    kv_heads: int
    head_dim: int
    max_positions: int
    theta: float


SHAPES = {
    "llama3-8b": Shape(4096, 14336, 32, 8, 128, 8192, 500000.0),
    "tiny": Shape(64, 96, 4, 2, 16, 256, 10000.0),
}

Inputs = dict[str, Any]


@dataclass(frozen=True)
class Op:
    """One fused kernel, its torch reference, its inputs and its byte count."""

    name: str
    make: Callable[[Shape, int, torch.dtype, torch.Generator], Inputs]
    reference: Callable[[Inputs], Any]
    fused: Callable[[Inputs], Any]
    nbytes: Callable[[Shape, int, int], int]


def _randn(gen: torch.Generator, dtype: torch.dtype, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, device=gen.device).to(dtype)


def _norm_inputs(shape: Shape, tokens: int, dtype: torch.dtype, gen: torch.Generator) -> Inputs:
    weight = 1 + 0.1 * torch.randn(shape.hidden, generator=gen, device=gen.device)
    return {"x": _randn(gen, dtype, tokens, shape.hidden),
            "residual": 4 * _randn(gen, dtype, tokens, shape.hidden),
            "weight": weight.to(dtype)}  # fmt: skip


def _qkv_inputs(shape: Shape, tokens: int, dtype: torch.dtype, gen: torch.Generator) -> Inputs:
    """q and k as views into one merged qkv output, as the decoder hands them over."""
    q_size, kv_size = shape.q_heads * shape.head_dim, shape.kv_heads * shape.head_dim
    qkv = _randn(gen, dtype, tokens, q_size + 2 * kv_size)
    q, k, _ = qkv.split([q_size, kv_size, kv_size], dim=-1)
    rotary = RotaryEmbedding(shape.head_dim, shape.max_positions, shape.theta).to(gen.device)
    weight = 1 + 0.1 * torch.randn(shape.head_dim, generator=gen, device=gen.device)
    positions = torch.randint(0, shape.max_positions, (tokens,), generator=gen, device=gen.device)
    return {"q": q.view(tokens, shape.q_heads, shape.head_dim),
            "k": k.view(tokens, shape.kv_heads, shape.head_dim), "positions": positions,
            "cache": rotary.cos_sin_cache, "weight": weight.to(dtype)}  # fmt: skip


def _mlp_inputs(shape: Shape, tokens: int, dtype: torch.dtype, gen: torch.Generator) -> Inputs:
    return {"gate_up": 2 * _randn(gen, dtype, tokens, 2 * shape.intermediate)}


def _add_norm_reference(i: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
    summed = i["x"] + i["residual"]
    return rms_norm_reference(summed, i["weight"], EPS), summed


OPS = [
    Op("add+rmsnorm", _norm_inputs, _add_norm_reference,
       lambda i: triton_ops.fused_add_rms_norm(i["x"], i["residual"], i["weight"], EPS),
       lambda s, t, b: 4 * t * s.hidden * b + s.hidden * b),
    Op("rmsnorm", _norm_inputs, lambda i: rms_norm_reference(i["x"], i["weight"], EPS),
       lambda i: triton_ops.rms_norm(i["x"], i["weight"], EPS),
       lambda s, t, b: 2 * t * s.hidden * b + s.hidden * b),
    Op("q head-norm", _qkv_inputs, lambda i: rms_norm_reference(i["q"], i["weight"], EPS),
       lambda i: triton_ops.rms_norm(i["q"], i["weight"], EPS),
       lambda s, t, b: 2 * t * s.q_heads * s.head_dim * b + s.head_dim * b),
    Op("silu*mul", _mlp_inputs, lambda i: silu_and_mul_reference(i["gate_up"]),
       lambda i: triton_ops.silu_and_mul(i["gate_up"]),
       lambda s, t, b: 3 * t * s.intermediate * b),
    Op("rotary q+k", _qkv_inputs,
       lambda i: rotary_reference(i["positions"], i["q"], i["k"], i["cache"]),
       lambda i: triton_ops.rotary_embedding(i["positions"], i["q"], i["k"], i["cache"]),
       lambda s, t, b: 2 * t * (s.q_heads + s.kv_heads) * s.head_dim * b
       + t * (s.head_dim * 4 + 8)),
]  # fmt: skip


# ------------------------------------------------------------------------------------- checks


def relative_error(ours: Any, ref: Any) -> float:
    """Largest ‖ours − ref‖ / ‖ref‖ over the outputs (a tensor or a tuple of them); inf on NaN."""
    pairs = zip(ours, ref) if isinstance(ref, tuple) else [(ours, ref)]
    worst = 0.0
    for a, b in pairs:
        err = ((a.float() - b.float()).norm() / b.float().norm()).item()
        worst = max(worst, err if err == err else float("inf"))
    return worst


def check_ops(shape: Shape, tokens: int, device: torch.device) -> list[dict]:
    """Every op against its reference in bf16 (bound: one bf16 unit in the last place on
    average; two under the interpreter, which truncates) and float32 (bound 1e-5)."""
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        bound = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps
        bound *= 1 if device.type == "cuda" or dtype == torch.float32 else 2
        for seed, op in enumerate(OPS):
            inputs = op.make(shape, tokens, dtype, torch.Generator(device).manual_seed(seed))
            err = relative_error(op.fused(inputs), op.reference(inputs))
            rows.append({"op": op.name, "dtype": str(dtype).removeprefix("torch."),
                         "tokens": tokens, "rel_err": err, "bound": bound,
                         "ok": err <= bound})  # fmt: skip
    return rows


# ------------------------------------------------------------------------------ kernel timings


def time_ops(shape: Shape, tokens: list[int], layers: int, device: torch.device,
             ceil: Ceilings) -> list[dict]:  # fmt: skip
    """µs per call of each op, torch vs fused, ``layers`` calls on distinct inputs per graph."""
    rows = []
    for t in tokens:
        for seed, op in enumerate(OPS):
            gen = torch.Generator(device).manual_seed(100 + seed)
            sets = [op.make(shape, t, torch.bfloat16, gen) for _ in range(layers)]
            torch_us = time_calls(lambda i, op=op, sets=sets: op.reference(sets[i]), layers, device)
            fused_us = time_calls(lambda i, op=op, sets=sets: op.fused(sets[i]), layers, device)
            nbytes = op.nbytes(shape, t, 2)
            rows.append({"op": op.name, "tokens": t, "torch_us": torch_us, "fused_us": fused_us,
                         "speedup": torch_us / fused_us, "bytes": nbytes,
                         "fused_gbps": nbytes / fused_us / 1e3,
                         "pct_hbm": 100 * nbytes / fused_us / 1e3 / ceil.hbm_gbps})  # fmt: skip
    return rows


def time_calls(call: Callable[[int], Any], layers: int, device: torch.device) -> float:
    """µs per ``call(i)``: replayed from a CUDA graph of all ``layers`` calls on CUDA; one pass
    on the host clock elsewhere (a smoke run's figures mean nothing)."""
    if device.type == "cuda":
        return time_per_layer(call, layers, 200.0)
    start = time.perf_counter()
    for i in range(layers):
        call(i)
    return (time.perf_counter() - start) * 1e6 / layers


# --------------------------------------------------------------------------------- decode step


@contextlib.contextmanager
def fused_layers(enabled: bool) -> Iterator[None]:
    """Layers built or captured inside take the fused kernels or (``enabled=False``) torch."""
    before = os.environ.get(DISABLE_FUSED_ENV)
    os.environ[DISABLE_FUSED_ENV] = "0" if enabled else "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ[DISABLE_FUSED_ENV]
        else:
            os.environ[DISABLE_FUSED_ENV] = before


def build_decode_setup(preset: str, batch_sizes: list[int], context: int, device: str = "cuda"):
    """Random-weight bf16 model, a KV pool of random K/V, and a decode batch per batch size whose
    sequences hold ``context`` tokens each (the last one being decoded now)."""
    from radixlm.batch import ForwardBatch
    from radixlm.kvcache.pool import KVPool
    from radixlm.model.random_model import build_random_model

    model = build_random_model(preset, torch.bfloat16, device)
    arch = model.arch
    pool = KVPool(arch.num_layers, arch.num_kv_heads, arch.head_dim,
                  max(batch_sizes) * context + 1, 1, torch.bfloat16, device)  # fmt: skip
    for layer in range(arch.num_layers):
        pool.k(layer).normal_()
        pool.v(layer).normal_()
    first = pool.first_usable_slot
    batches = {}
    for bs in batch_sizes:
        slots = [torch.arange(first + i * context, first + (i + 1) * context) for i in range(bs)]
        ids = torch.randint(0, arch.vocab_size, (bs,)).tolist()
        batches[bs] = ForwardBatch.build([[t] for t in ids], slots, device=device)
    return model, pool, batches


def capture_runners(model, pool, batch_sizes: list[int], context: int) -> dict[str, Any]:
    """One DecodeGraphRunner per layer variant, each with its own Triton attention backend."""
    from radixlm.executor.cuda_graph import DecodeGraphRunner
    from radixlm.model.attention.triton_backend import TritonAttentionBackend

    runners = {}
    for variant in ("torch", "fused"):
        with fused_layers(variant == "fused"):
            attn = TritonAttentionBackend("cuda")
            runner = DecodeGraphRunner(model, pool, attn, max(batch_sizes), context_length=context,
                                       buckets=tuple(sorted(batch_sizes)))  # fmt: skip
            runner.capture()
        runners[variant] = runner
    return runners


def time_decode_steps(args: argparse.Namespace, ceil: Ceilings) -> tuple[list[dict], Any]:
    """ms per replayed decode step, torch layers vs fused, against the step's HBM floor."""
    model, pool, batches = build_decode_setup(args.preset, args.batch_sizes, args.context)
    runners = capture_runners(model, pool, args.batch_sizes, args.context)
    cost = ModelCost.of(model.arch)
    device = torch.device("cuda")
    rows = []
    for bs, batch in batches.items():
        logits = {v: r.run(batch).clone() for v, r in runners.items()}
        times: dict[str, list[float]] = {v: [] for v in runners}
        for _ in range(args.rounds):  # alternate, so drift (clocks, heat) hits both alike
            for variant, runner in runners.items():
                step = lambda runner=runner, batch=batch: runner.run(batch)  # noqa: E731
                times[variant].append(1e3 * time_median(step, device, repeats=args.repeats))
        nbytes, flops = cost.decode_step([args.context] * bs)
        floor_ms = 1e3 * ceil.floor_s(nbytes, flops)
        agree = (logits["fused"].argmax(-1) == logits["torch"].argmax(-1)).float().mean().item()
        for variant in runners:
            ms = statistics.median(times[variant])
            rows.append({"batch": bs, "layers": variant, "ms_step": ms,
                         "spread_ms": max(times[variant]) - min(times[variant]),
                         "floor_ms": floor_ms, "pct_roofline": 100 * floor_ms / ms,
                         "tok_s": bs * 1e3 / ms,
                         "logits_rel_diff": relative_error(logits["fused"], logits["torch"]),
                         "argmax_agree": agree})  # fmt: skip
    return rows, (runners, batches)


def profile_step(runners: dict[str, Any], batches: dict, top: int = 20, replays: int = 5) -> None:
    """Per-kernel device time inside replays of each variant's smallest-batch graph."""
    from torch.profiler import ProfilerActivity, profile

    bs = min(batches)
    for variant, runner in runners.items():
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(replays):
                runner.run(batches[bs])
            torch.cuda.synchronize()
        kernels = [e for e in prof.key_averages() if e.device_time_total > 0]
        kernels.sort(key=lambda e: e.device_time_total, reverse=True)
        total = sum(e.device_time_total for e in kernels) / replays
        launches = sum(e.count for e in kernels) / replays
        print(f"\nprofile: batch {bs}, {variant} layers: {launches:.0f} kernels, "
              f"{total / 1e3:.3f} ms of kernel time per step")  # fmt: skip
        rows = [{"kernel": e.key[:64], "calls": e.count / replays,
                 "us_step": e.device_time_total / replays,
                 "pct": 100 * e.device_time_total / replays / total}
                for e in kernels[:top]]  # fmt: skip
        print(format_table(rows, [("kernel", "kernel"), ("calls", "calls/step"),
                                  ("us_step", "µs/step"), ("pct", "%")]), flush=True)  # fmt: skip


# ------------------------------------------------------------------------------------- driver


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run (interpreter)")
    parser.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 512])
    parser.add_argument("--layers", type=int, default=32, help="input sets per timed graph")
    parser.add_argument("--skip-model", action="store_true", help="no whole decode step")
    parser.add_argument("--preset", default="llama3-8b", help="random model of the decode step")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--context", type=int, default=512, help="tokens per sequence")
    parser.add_argument("--repeats", type=int, default=20, help="replays per timing")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timings per variant")
    parser.add_argument("--profile", action="store_true", help="kernel times inside the step")
    parser.add_argument("--out", type=Path, help="write results as JSON here")
    return parser.parse_args(argv)


STEP_COLUMNS = [("batch", "batch"), ("layers", "layers"), ("ms_step", "ms/step"),
                ("spread_ms", "spread"), ("floor_ms", "floor ms"), ("pct_roofline", "% roofline"),
                ("tok_s", "tok/s"), ("logits_rel_diff", "logits rel diff"),
                ("argmax_agree", "argmax agree")]  # fmt: skip


def _print_rows(title: str, rows: list[dict], columns: list[tuple[str, str]]) -> None:
    print(f"\n{title}\n{format_table(rows, columns)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Check, then time the kernels and (on CUDA) the decode step; print tables.

    Args:
        argv: command-line arguments (default: sys.argv[1:]).

    Returns:
        0 when every check passed, 1 otherwise (or without the CUDA device asked for).
    """
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("layer kernel benchmark: no CUDA device (use --device cpu for a smoke run)")
        return 1
    shape = SHAPES[args.shape]
    ceil = measure_ceilings(device)
    print(f"device: {device_name(device)}; HBM copy {ceil.hbm_gbps:.0f} GB/s, "
          f"matmul {ceil.matmul_tflops:.0f} TFLOP/s", flush=True)  # fmt: skip
    checks = check_ops(shape, max(args.tokens), device)
    _print_rows("checks: fused vs torch reference (relative error)", checks,
                [("op", "op"), ("dtype", "dtype"), ("tokens", "T"), ("rel_err", "rel err"),
                 ("bound", "bound"), ("ok", "ok")])  # fmt: skip
    kernels = time_ops(shape, args.tokens, args.layers, device, ceil)
    _print_rows(f"kernels ({args.shape}, bf16): µs per call, {args.layers} calls per graph",
                kernels, [("op", "op"), ("tokens", "T"), ("torch_us", "torch µs"),
                          ("fused_us", "fused µs"), ("speedup", "speed-up"),
                          ("fused_gbps", "fused GB/s"), ("pct_hbm", "% HBM")])  # fmt: skip
    steps: list[dict] = []
    if not args.skip_model and device.type == "cuda":
        steps, (runners, batches) = time_decode_steps(args, ceil)
        _print_rows(f"decode step, {args.preset} bf16, {args.context}-token contexts, "
                    "CUDA graph replay", steps, STEP_COLUMNS)  # fmt: skip
        if args.profile:
            try:
                profile_step(runners, batches)
            except Exception as exc:  # the profile is extra: never lose the timings to it
                print(f"profile failed: {exc!r}")
            _print_rows("decode step (repeated)", steps, STEP_COLUMNS)
    write_json(args.out, {"device": device_name(device), "ceilings": ceil, "checks": checks,
                          "kernels": kernels, "decode_steps": steps,
                          "args": vars(args)})  # fmt: skip
    return 0 if all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
