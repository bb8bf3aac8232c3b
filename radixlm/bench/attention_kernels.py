"""Benchmark of the Triton attention kernels (KV store, extend, split-K decode) on CUDA.

Checks each kernel against the torch reference backend, measures the device's HBM bandwidth
(device-to-device copy) and bf16 matmul rate in the same run, then times the kernels at a
Llama-3-8B attention shape (32 query heads, 8 KV heads, head_dim 128, bf16) over batch sizes and
context lengths. Each case captures one call per layer of a multi-layer pool in a CUDA graph (so
successive calls read different KV, as in a model, and launch gaps do not count), replays it many
times after warm-up, and reports the median time per call.

Bytes are the fewest a kernel must move: K and V of every context token read once per KV head,
the slot indices, the queries and the outputs (the split-K scratch is not counted). Extend also
reports its matmul FLOPs; its roofline is the larger of bytes / bandwidth and FLOPs / matmul rate.

Usage: python -m radixlm.bench.attention_kernels [--out results.json] [--sweep]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import torch

from radixlm.batch import ForwardBatch
from radixlm.bench.common import time_median
from radixlm.kvcache.pool import KVPool
from radixlm.model.attention.torch_backend import TorchAttentionBackend
from radixlm.model.attention.triton_backend import TritonAttentionBackend
from radixlm.model.attention.triton_kernels import (
    NARROW_EXTEND,
    WIDE_EXTEND,
    DecodeConfig,
    ExtendConfig,
)

Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
DTYPE = torch.bfloat16
SCALE = HEAD_DIM**-0.5
# Cycle calls over enough layers that their KV outgrows the L2 cache (50 MB on an H100).
ROTATE_BYTES = 512 * 2**20
MAX_LAYERS = 64


@dataclass
class Roofline:
    """The device's ceilings, measured in the same run."""

    hbm_gbps: float
    matmul_tflops: float


@dataclass
class Case:
    """One timed kernel call shape and its result."""

    kernel: str
    batch: int
    context: int
    new_tokens: int
    bytes: int
    flops: int = 0
    us: float = 0.0
    extra: dict = field(default_factory=dict)

    def gbps(self) -> float:
        return self.bytes / (self.us * 1e-6) / 1e9

    def tflops(self) -> float:
        return self.flops / (self.us * 1e-6) / 1e12

    def roofline_us(self, roof: Roofline) -> float:
        return max(self.bytes / (roof.hbm_gbps * 1e3), self.flops / (roof.matmul_tflops * 1e6))


# ------------------------------------------------------------------------------ measurement


def measure_roofline() -> Roofline:
    """HBM bandwidth of a 1 GiB device-to-device copy (read + write) and the bf16 matmul rate."""
    src = torch.randn(2**29, device="cuda", dtype=DTYPE)
    dst = torch.empty_like(src)
    copy_ms = _median_event_ms(lambda: dst.copy_(src), repeats=30)
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=DTYPE) for _ in range(2))
    mm_ms = _median_event_ms(lambda: a @ b, repeats=20)
    return Roofline(2 * src.numel() * 2 / (copy_ms * 1e-3) / 1e9, 2 * 8192**3 / (mm_ms * 1e9))


def _median_event_ms(fn: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    return time_median(fn, torch.device("cuda"), repeats, warmup) * 1e3


def time_per_layer(call: Callable[[int], object], layers: int, target_ms: float) -> float:
    """Median µs of ``call(layer)``, one call per layer captured in a CUDA graph and replayed.

    Off CUDA (a smoke run of this script), one timed pass without a graph.
    """
    start = time.perf_counter()
    for layer in range(layers):  # compiles, and allocates scratch outside the capture
        call(layer)
    if not torch.cuda.is_available():
        return (time.perf_counter() - start) * 1e6 / layers
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for layer in range(layers):
            call(layer)
    first = _median_event_ms(graph.replay, repeats=3, warmup=2)
    repeats = max(10, min(200, int(target_ms / max(first, 1e-3))))
    return _median_event_ms(graph.replay, repeats=repeats, warmup=0) * 1e3 / layers


# ------------------------------------------------------------------------------ workloads


def layers_for(kv_bytes_per_layer: int) -> int:
    return max(1, min(MAX_LAYERS, math.ceil(ROTATE_BYTES / max(1, kv_bytes_per_layer))))


def make_pool(num_slots: int, layers: int, page_size: int, gen: torch.Generator) -> KVPool:
    pool = KVPool(layers, KV_HEADS, HEAD_DIM, math.ceil(num_slots / page_size) + 1, page_size,
                  DTYPE, gen.device)  # fmt: skip
    for layer in range(layers):
        pool.k(layer).normal_(generator=gen)
        pool.v(layer).normal_(generator=gen)
    return pool


def shuffled_slots(seq_lens: list[int], pool: KVPool, gen: torch.Generator) -> list[torch.Tensor]:
    """Each sequence gets whole pages in random order (the scratch page 0 excluded)."""
    page = pool.page_size
    order = torch.randperm(pool.num_pages, generator=gen, device=gen.device) + 1
    slots, used = [], 0
    for n in seq_lens:
        pages = -(-n // page)
        mine = order[used : used + pages]
        used += pages
        slots.append((mine[:, None] * page + torch.arange(page, device=gen.device)).flatten()[:n])
    return slots


def make_batch(new_lens: list[int], slots: list[torch.Tensor]) -> ForwardBatch:
    """A batch whose sequences bring ``new_lens`` new tokens at the end of ``slots``."""
    tokens = [[1] * n for n in new_lens]
    return ForwardBatch.build(tokens, slots, device=slots[0].device)


def attention_bytes(batch: int, context: int, new_tokens: int) -> int:
    """K and V once per KV head, slot indices, queries in, outputs out."""
    item = torch.empty((), dtype=DTYPE).element_size()
    kv = 2 * batch * context * KV_HEADS * HEAD_DIM * item
    q_and_out = 2 * batch * new_tokens * Q_HEADS * HEAD_DIM * item
    return kv + batch * context * 8 + q_and_out


def extend_flops(batch: int, context: int, new_tokens: int) -> int:
    """QK^T and PV over the visible (causal) pairs only."""
    prefix = context - new_tokens
    pairs = new_tokens * prefix + new_tokens * (new_tokens + 1) // 2
    return 4 * batch * pairs * Q_HEADS * HEAD_DIM


@dataclass
class Setup:
    pool: KVPool
    batch: ForwardBatch
    q: torch.Tensor


def build_setup(
    batch: int, context: int, new_tokens: int, page_size: int, gen: torch.Generator
) -> Setup:
    kv_per_layer = 2 * batch * context * KV_HEADS * HEAD_DIM * 2
    pool = make_pool(batch * context, layers_for(kv_per_layer), page_size, gen)
    slots = shuffled_slots([context] * batch, pool, gen)
    fb = make_batch([new_tokens] * batch, slots)
    q = torch.randn(batch * new_tokens, Q_HEADS, HEAD_DIM, device=gen.device, generator=gen)
    return Setup(pool, fb, q.to(DTYPE))


def time_decode(backend, setup: Setup, target_ms: float = 300.0) -> float:
    backend.prepare(setup.batch)
    return time_per_layer(
        lambda layer: backend.decode(setup.q, layer, setup.batch, setup.pool, SCALE),
        setup.pool.num_layers,
        target_ms,
    )


def time_extend(backend, setup: Setup, target_ms: float = 300.0) -> float:
    backend.prepare(setup.batch)
    return time_per_layer(
        lambda layer: backend.extend(setup.q, layer, setup.batch, setup.pool, SCALE),
        setup.pool.num_layers,
        target_ms,
    )


def time_store(backend, tokens: int, gen: torch.Generator) -> Case:
    item_bytes = KV_HEADS * HEAD_DIM * 2
    layers = layers_for(4 * tokens * item_bytes)
    pool = make_pool(tokens * 2, layers, 16, gen)
    loc = torch.randperm(pool.capacity_tokens, generator=gen, device=gen.device)[:tokens]
    loc = loc + pool.first_usable_slot
    k, v = (torch.randn(tokens, KV_HEADS, HEAD_DIM, device=gen.device, generator=gen).to(DTYPE)
            for _ in "kv")  # fmt: skip
    us = time_per_layer(lambda layer: backend.store_kv(k, v, layer, loc, pool), layers, 300.0)
    # Read K and V, write them to the pool, read the slot indices.
    return Case("store", tokens, 0, tokens, 4 * tokens * item_bytes + 8 * tokens, us=us)


# ------------------------------------------------------------------------------ checks


def check_against_torch(gen: torch.Generator) -> list[dict]:
    """Ragged batch on shuffled pages: each kernel against the torch backend (bf16)."""
    prefixes, new = [0, 300, 1500, 17], [700, 1, 200, 64]
    seq_lens = [p + n for p, n in zip(prefixes, new)]
    results, device = [], gen.device
    for name, news in (("extend", new), ("decode", [1] * 4)):
        pools = [make_pool(sum(seq_lens) + 64, 1, 16, torch.Generator(device).manual_seed(3))
                 for _ in range(2)]  # fmt: skip
        slots = shuffled_slots(seq_lens, pools[0], gen)
        fb = make_batch(news, slots)
        qkv = [torch.randn(fb.num_tokens, h, HEAD_DIM, device=device, generator=gen).to(DTYPE)
               for h in (Q_HEADS, KV_HEADS, KV_HEADS)]  # fmt: skip
        outs = []
        triton_backend = TritonAttentionBackend(device)
        for backend, pool in zip((triton_backend, TorchAttentionBackend()), pools):
            backend.prepare(fb)
            outs.append(backend.forward(*qkv, 0, fb, pool, SCALE).float())
        stored = torch.equal(pools[0].k(0), pools[1].k(0)) and torch.equal(
            pools[0].v(0), pools[1].v(0)
        )
        err = ((outs[0] - outs[1]).norm() / outs[1].norm()).item()
        results.append({"kernel": name, "rel_err": err, "ok": err < 2e-2})
        results.append({"kernel": f"store ({name})", "pools_equal": stored, "ok": stored})
    return results


# ------------------------------------------------------------------------------ runs


def run_cases(args, backend, roof: Roofline, gen: torch.Generator) -> list[Case]:
    cases = []
    for batch in args.batches:
        for tokens in sorted({batch, batch * args.extend_new}):
            cases.append(time_store(backend, tokens, gen))
        for context in args.contexts:
            first = len(cases)
            cases.extend(decode_cases(args, backend, batch, context, gen))
            cases.extend(extend_cases(args, backend, batch, context, gen))
            torch.cuda.empty_cache()
            for case in cases[first:]:
                _print_case(case, roof)
    return cases


def extend_cases(args, backend, batch: int, context: int, gen: torch.Generator) -> list[Case]:
    new = min(context, args.extend_new)
    setup = build_setup(batch, context, new, args.page_size, gen)
    case = Case("extend", batch, context, new, attention_bytes(batch, context, new),
                extend_flops(batch, context, new), time_extend(backend, setup))  # fmt: skip
    if not args.compare_extend or backend.extend_config is not None:
        return [case]
    cases = [case]
    for name, config in (("wide", WIDE_EXTEND), ("narrow", NARROW_EXTEND)):
        other = TritonAttentionBackend(backend.device, extend_config=config)
        cases.append(replace(case, kernel=f"extend {name}", us=time_extend(other, setup)))
    return cases


def decode_cases(args, backend, batch: int, context: int, gen: torch.Generator) -> list[Case]:
    setup = build_setup(batch, context, 1, args.page_size, gen)
    case = Case("decode", batch, context, 1, attention_bytes(batch, context, 1),
                extend_flops(batch, context, 1), time_decode(backend, setup))  # fmt: skip
    if not args.compare_fused:
        return [case]
    fused = not backend.decode_config.fused_merge
    config = replace(backend.decode_config, fused_merge=fused)
    other = TritonAttentionBackend(backend.device, decode_config=config)
    return [case, replace(case, kernel=f"decode fused_merge={fused}", us=time_decode(other, setup))]


def _print_case(case: Case, roof: Roofline) -> None:
    print(f"  {case.kernel} b={case.batch} ctx={case.context} {case.us:.1f} us", flush=True)


def format_table(cases: list[Case], roof: Roofline) -> str:
    head = ("| kernel | batch | context | new tok/seq | µs | GB/s | % HBM | TFLOP/s "
            "| roofline µs | % of roofline |")  # fmt: skip
    lines = [head, "|" + "---|" * 10]
    for c in cases:
        ctx = str(c.context) if c.context else "-"
        tflops = f"{c.tflops():.0f}" if c.flops else "-"
        roof_us = c.roofline_us(roof)
        lines.append(
            f"| {c.kernel} | {c.batch} | {ctx} | {c.new_tokens} | {c.us:.1f} | {c.gbps():.0f} "
            f"| {100 * c.gbps() / roof.hbm_gbps:.0f} | {tflops} | {roof_us:.1f} "
            f"| {100 * roof_us / c.us:.0f} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------ tuning sweep

DECODE_SWEEP_SHAPES = [(1, 512), (1, 8192), (8, 2048), (64, 2048)]
EXTEND_SWEEP_SHAPES = [(1, 8192), (8, 2048), (8, 512)]


def sweep(args, gen: torch.Generator) -> dict:
    """Time the kernels' launch parameters on a few shapes; print and return the rankings."""
    found = {"decode_kernel": [], "decode_splits": [], "extend": []}
    base = DecodeConfig()
    setups = {s: build_setup(*s, 1, args.page_size, gen) for s in DECODE_SWEEP_SHAPES}
    for block_n in (32, 64, 128):
        for warps in (1, 2, 4):
            for stages in (2, 3):
                for fused in (False, True):
                    cfg = replace(base, block_n=block_n, num_warps=warps, num_stages=stages,
                                  fused_merge=fused)  # fmt: skip
                    found["decode_kernel"].append(_sweep_point(cfg, setups, time_decode))
    best = min(found["decode_kernel"], key=lambda r: r["geomean_us"])["config"]
    for target in (132, 264, 528, 1056):
        for min_len in (64, 128, 256):
            cfg = DecodeConfig(**{**best, "target_programs": target, "min_split_len": min_len})
            found["decode_splits"].append(_sweep_point(cfg, setups, time_decode))
    del setups
    setups = {s: build_setup(s[0], s[1], 512, args.page_size, gen) for s in EXTEND_SWEEP_SHAPES}
    for rows in (128, 256):
        for block_n in (64, 128):
            for warps in (4, 8):
                for stages in (2, 3, 4):
                    cfg = ExtendConfig(rows, block_n, warps, stages)
                    found["extend"].append(_sweep_point(cfg, setups, time_extend))
    for key, rows in found.items():
        rows.sort(key=lambda r: r["geomean_us"])
        print(f"sweep {key}: best 6 of {len(rows)}")
        for r in rows[:6]:
            print(f"  {r['geomean_us']:9.1f} us geomean  {r['us']}  {r['config']}")
    return found


def profile_decode(args, gen: torch.Generator) -> None:
    """Per-kernel device time of eager decode calls (stage 1 vs merge), from the profiler."""
    for fused in (False, True):
        config = replace(DecodeConfig(), fused_merge=fused)
        backend = TritonAttentionBackend("cuda", decode_config=config)
        for batch, context in ((1, 512), (1, 8192), (64, 8192)):
            setup = build_setup(batch, context, 1, args.page_size, gen)
            _profile_calls(backend, setup, f"fused={fused} b={batch} ctx={context}")


def _profile_calls(backend, setup: Setup, label: str, calls: int = 20) -> None:
    from torch.profiler import ProfilerActivity, profile

    def call():
        backend.decode(setup.q, 0, setup.batch, setup.pool, SCALE)

    for _ in range(3):
        call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            call()
        torch.cuda.synchronize()
    for evt in prof.key_averages():
        if evt.device_time_total > 0 and evt.count:
            avg = evt.device_time_total / evt.count
            print(f"profile {label} {evt.key[:40]}: {avg:.1f} us x{evt.count}")


def args_device(setups: dict) -> torch.device:
    return next(iter(setups.values())).q.device


def _sweep_point(cfg, setups: dict, timer) -> dict:
    kind = {"decode_config": cfg} if isinstance(cfg, DecodeConfig) else {"extend_config": cfg}
    backend = TritonAttentionBackend(args_device(setups), **kind)
    try:
        us = {f"{b}x{c}": timer(backend, s, 80.0) for (b, c), s in setups.items()}
    except Exception as exc:  # a config the compiler rejects (e.g. out of shared memory)
        return {"config": asdict(cfg), "us": str(exc)[:80], "geomean_us": float("inf")}
    geo = math.exp(sum(math.log(v) for v in us.values()) / len(us))
    return {"config": asdict(cfg), "us": {k: round(v, 1) for k, v in us.items()},
            "geomean_us": geo}  # fmt: skip


# ------------------------------------------------------------------------------ entry


def describe_extend_config(backend: TritonAttentionBackend) -> str:
    if backend.extend_config is not None:
        return str(backend.extend_config)
    return f"by launch size: {WIDE_EXTEND} under 2 programs per SM, else {NARROW_EXTEND}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    parser.add_argument("--batches", type=ints, default=[1, 8, 64])
    parser.add_argument("--contexts", type=ints, default=[512, 2048, 8192])
    parser.add_argument(
        "--extend-new",
        type=int,
        default=512,
        help="new tokens per sequence in extend (the rest is cached prefix)",
    )
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--sweep", action="store_true", help="also rank launch configs")
    parser.add_argument("--profile", action="store_true", help="per-kernel decode times")
    parser.add_argument(
        "--compare-fused",
        action="store_true",
        help="also time decode with the other fused_merge setting",
    )
    parser.add_argument(
        "--compare-extend", action="store_true", help="also time extend with each fixed config"
    )
    parser.add_argument("--out", help="write results as JSON here")
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run of this script")
    return parser.parse_args(argv)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Run the checks and the timings; print a markdown table.

    Args:
        argv: command-line arguments (default: sys.argv[1:]).

    Returns:
        0 when every check passed, 1 otherwise.
    """
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("attention kernel benchmark needs a CUDA device")
        return 1
    gen = torch.Generator(args.device).manual_seed(0)
    name = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    checks = check_against_torch(gen)
    print(f"device: {name}\nchecks vs torch reference: {checks}", flush=True)
    roof = measure_roofline() if args.device == "cuda" else Roofline(1.0, 1.0)
    print(f"HBM copy {roof.hbm_gbps:.0f} GB/s, bf16 matmul {roof.matmul_tflops:.0f} TFLOP/s")
    tuned = sweep(args, gen) if args.sweep else None
    if args.profile:
        profile_decode(args, gen)
    backend = TritonAttentionBackend(args.device)
    cases = run_cases(args, backend, roof, gen)
    extend_config = describe_extend_config(backend)
    print(f"\nconfigs: extend {extend_config}; decode {backend.decode_config}")
    print(format_table(cases, roof))
    if args.out:
        report = {"device": name, "roofline": asdict(roof), "checks": checks, "sweep": tuned,
                  "extend_config": str(extend_config),
                  "decode_config": asdict(backend.decode_config),
                  "cases": [{**asdict(c), "gbps": c.gbps(), "roofline_us": c.roofline_us(roof)}
                            for c in cases]}  # fmt: skip
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0 if all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
