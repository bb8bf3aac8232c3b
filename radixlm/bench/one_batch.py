"""Static-batch latency through the engine core: one prefill, then decode steps.

For every batch size x input length, B random prompts go into an in-process ``EngineCore`` at
once (radix cache off, every prompt admitted in one extend step) and the core steps until they
finish: the same step loop as serving, overlapped by default (``--no-enable-overlap`` runs it
serially), with no device sync around the steps. Each step is the host time between two
``step()`` returns (with overlap a call returns the previous step's tokens, so in steady state
that interval is one step's time as a client sees it). The prefill is every step until each
request has its first token, the decode steps are the rest. A warm-up run of the same shape
(other token ids) comes first, so Triton compilation is not timed.

``--profile`` records ``--profile-steps`` decode steps of each case with the torch profiler
(after the first decode steps) and prints the device kernel time per step beside the step's
wall time, and the top kernels; with ``--out`` the Chrome traces go beside the JSON.

Beside each result the roofline of that batch (see radixlm.bench.common): the prefill floor and
the median decode-step floor, from the HBM bandwidth and matmul rate measured in the same run.

``--baseline hf`` then loads the same weights into HF transformers and times ``generate`` on the
same prompts (default, and static cache + torch.compile), and prints radixlm's speed-up.

Usage: radixlm bench one-batch --random-model llama3-8b --batch-sizes 1 64 --input-lens 512
       --output-len 128 [--baseline hf] [--out one_batch.json]
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from radixlm.bench import hf_baseline
from radixlm.bench.common import (
    Ceilings,
    ModelCost,
    add_model_args,
    engine_options,
    format_table,
    resolve_setup,
    run_header,
    static_batch_roofline,
    synchronize,
    write_json,
)

RESULT_COLUMNS = [
    ("batch", "batch"), ("input_len", "in"), ("output_len", "out"),
    ("prefill_ms", "prefill ms"), ("prefill_roof_ms", "roof ms"),
    ("decode_ms", "decode ms/step"), ("decode_roof_ms", "roof ms"),
    ("decode_tok_s", "decode tok/s"), ("decode_roof_pct", "% roof"),
    ("output_tok_s", "out tok/s"), ("roof_tok_s", "roof tok/s"), ("roof_pct", "% roof"),
]
HF_COLUMNS = [
    ("variant", "HF variant"), ("batch", "batch"), ("input_len", "in"), ("output_len", "out"),
    ("prefill_ms", "prefill ms"), ("decode_ms", "decode ms/step"),
    ("output_tok_s", "out tok/s"), ("radixlm_speedup", "radixlm x"),
]


PROFILE_COLUMNS = [
    ("batch", "batch"), ("input_len", "in"), ("profiled_steps", "steps"),
    ("step_wall_ms", "step wall ms"), ("kernel_ms_per_step", "kernel ms/step"),
    ("host_op_ms_per_step", "host op ms/step"),
]


@dataclass
class StepLog:
    """Wall time of each engine step and whether it was part of the prefill."""

    seconds: list[float] = field(default_factory=list)
    prefill: list[bool] = field(default_factory=list)

    def prefill_s(self) -> float:
        return sum(s for s, p in zip(self.seconds, self.prefill) if p)

    def decode_steps(self) -> list[float]:
        return [s for s, p in zip(self.seconds, self.prefill) if not p]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="radixlm bench one-batch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--input-lens", type=int, nargs="+", default=[512])
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--no-warmup", dest="warmup", action="store_false",
                        help="skip the warm-up run of each shape")
    parser.add_argument("--baseline", choices=["hf"], default=None,
                        help="also time HF transformers generate on the same prompts")
    parser.add_argument("--hf-variants", nargs="+", default=list(hf_baseline.HF_VARIANTS),
                        choices=hf_baseline.HF_VARIANTS)
    parser.add_argument("--profile", action="store_true",
                        help="torch-profile decode steps: kernel time vs step wall time")
    parser.add_argument("--profile-steps", type=int, default=8,
                        help="decode steps recorded per case with --profile")
    return parser.parse_args(argv)


def build_core(model_dir: Path, args: argparse.Namespace):
    """An EngineCore sized for the largest case: exact KV pool, one extend step per batch."""
    from radixlm.config import EngineConfig
    from radixlm.engine.core import EngineCore

    biggest = max(args.batch_sizes)
    longest = max(args.input_lens) + args.output_len
    config = EngineConfig.from_kwargs(
        model=str(model_dir), **engine_options(args),
        kv_cache_tokens=biggest * (longest + args.page_size) + 4 * args.page_size,
        max_running_requests=biggest, enable_radix_cache=False, schedule_policy="fcfs",
        max_prefill_tokens=biggest * max(args.input_lens), chunked_prefill_size=0)
    return EngineCore(config, progress=False)


def random_prompts(rng: random.Random, batch: int, length: int, vocab: int) -> list[list[int]]:
    return [[rng.randrange(vocab) for _ in range(length)] for _ in range(batch)]


def run_batch(core, prompts: list[list[int]], output_len: int, tag: str,
              device: torch.device, profiler: StepProfiler | None = None) -> StepLog:
    """Put every prompt in, step until all finish; time the interval between step returns."""
    from radixlm.engine import ipc
    from radixlm.request import LogprobOptions
    from radixlm.sampling_params import SamplingParams

    params = SamplingParams(max_new_tokens=output_len, temperature=0.0, ignore_eos=True)
    for i, ids in enumerate(prompts):
        core.add_request(ipc.AddRequest(f"{tag}-{i}", ids, params, LogprobOptions()))
    log, started = StepLog(), set()
    synchronize(device)
    last = time.perf_counter()
    while core.has_work():
        in_prefill = len(started) < len(prompts)
        if profiler is not None and not in_prefill:
            profiler.before_step()
        outputs = core.step()
        now = time.perf_counter()
        log.seconds.append(now - last)
        log.prefill.append(in_prefill)
        if profiler is not None and not in_prefill:
            profiler.after_step(now - last)
        last = now
        started.update(o.rid for o in outputs if o.new_token_ids)
        _check_not_aborted(outputs)
    if profiler is not None:
        profiler.stop()
    return log


class StepProfiler:
    """Records a window of decode steps with the torch profiler.

    Args:
        skip: decode steps to let pass first (steady state).
        steps: decode steps to record.
        device: the engine's device (CUDA kernels are recorded there).
    """

    def __init__(self, skip: int, steps: int, device: torch.device):
        self.skip, self.steps, self.device = skip, steps, device
        self.seen = 0
        self.wall: list[float] = []
        self.prof = None
        self.done = False

    def before_step(self) -> None:
        if self.seen == self.skip and self.prof is None:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(ProfilerActivity.CUDA)
            self.prof = profile(activities=activities)
            synchronize(self.device)
            self.prof.__enter__()

    def after_step(self, seconds: float) -> None:
        self.seen += 1
        if self.prof is not None and len(self.wall) < self.steps:
            self.wall.append(seconds)
            if len(self.wall) == self.steps:
                self.stop()

    def stop(self) -> None:
        if self.prof is not None and not self.done:
            synchronize(self.device)
            self.prof.__exit__(None, None, None)
            self.done = True

    def summary(self) -> dict[str, Any]:
        """Kernel (device) time and host op time per step beside the steps' wall time."""
        if self.prof is None or not self.wall:
            return {"profiled_steps": 0}
        events = self.prof.key_averages()
        cuda = self.device.type == "cuda"
        kernel_us = sum(_device_self_us(e) for e in events) if cuda else 0.0
        cpu_us = sum(e.self_cpu_time_total for e in events)
        steps = len(self.wall)
        top = sorted(events, key=_device_self_us if cuda else (lambda e: e.self_cpu_time_total),
                     reverse=True)[:12]
        return {
            "profiled_steps": steps,
            "step_wall_ms": 1e3 * sum(self.wall) / steps,
            "kernel_ms_per_step": kernel_us / 1e3 / steps,
            "host_op_ms_per_step": cpu_us / 1e3 / steps,
            "top": [{"name": e.key[:60], "calls_per_step": e.count / steps,
                     "ms_per_step": (_device_self_us(e) if cuda else e.self_cpu_time_total)
                     / 1e3 / steps} for e in top],
        }

    def export(self, path: Path) -> None:
        if self.prof is not None and self.wall:
            self.prof.export_chrome_trace(str(path))


def _device_self_us(event) -> float:
    value = getattr(event, "self_device_time_total", None)
    if value is None:
        value = getattr(event, "self_cuda_time_total", 0.0)
    return float(value or 0.0)


def _check_not_aborted(outputs) -> None:
    """A request the engine aborted (a failed forward pass) makes every timing meaningless."""
    for out in outputs:
        if out.finish is not None and out.finish.kind.value == "abort":
            raise RuntimeError(f"request {out.rid} aborted: {out.finish.message}")


def measure_case(core, cost: ModelCost, ceil: Ceilings, batch: int, input_len: int,
                 args: argparse.Namespace, rng: random.Random, device: torch.device
                 ) -> tuple[dict[str, Any], list[list[int]]]:
    """Warm up, then time one (batch, input_len) case. Returns the row and the prompts."""
    vocab = core.runner.vocab_size
    if args.warmup:
        run_batch(core, random_prompts(rng, batch, input_len, vocab), args.output_len,
                  f"warm-{batch}-{input_len}", device)
    prompts = random_prompts(rng, batch, input_len, vocab)
    profiler = StepProfiler(2, args.profile_steps, device) if args.profile else None
    log = run_batch(core, prompts, args.output_len, f"run-{batch}-{input_len}", device, profiler)
    roof = static_batch_roofline(cost, ceil, batch, input_len, args.output_len)
    row = result_row(log, roof, batch, input_len, args.output_len)
    if profiler is not None:
        row["profile"] = profiler.summary()
        if args.out is not None:
            profiler.export(args.out.with_name(f"{args.out.stem}-trace-bs{batch}-in{input_len}.json"))
    return row, prompts


def result_row(log: StepLog, roof, batch: int, input_len: int, output_len: int
               ) -> dict[str, Any]:
    """The table row of one case: measured times beside their floors."""
    steps = log.decode_steps()
    decode = statistics.median(steps) if steps else float("nan")
    total = sum(log.seconds)
    out_tok_s = batch * output_len / total
    roof_tok_s = batch * output_len / roof.total_s
    row = {"batch": batch, "input_len": input_len, "output_len": output_len,
           "prefill_ms": log.prefill_s() * 1e3, "prefill_roof_ms": roof.prefill_s * 1e3,
           "decode_ms": decode * 1e3, "decode_roof_ms": roof.decode_step_median_s * 1e3,
           "decode_steps": len(steps), "total_s": total, "roof_total_s": roof.total_s,
           "output_tok_s": out_tok_s, "roof_tok_s": roof_tok_s,
           "roof_pct": 100 * out_tok_s / roof_tok_s, "step_seconds": log.seconds}
    row["decode_tok_s"] = batch / decode if steps else float("nan")
    row["decode_roof_pct"] = 100 * roof.decode_step_median_s / decode if steps else float("nan")
    return row


def run_hf(model_dir: Path, cases: list[tuple[dict[str, Any], list[list[int]]]],
           args: argparse.Namespace, device: torch.device, dtype: torch.dtype
           ) -> list[dict[str, Any]]:
    """Time HF generate on every case's prompts, for each variant."""
    model = hf_baseline.load_hf_model(model_dir, dtype, device)
    rows = []
    for variant in args.hf_variants:
        for row, prompts in cases:
            timing = hf_baseline.time_static_batch(model, prompts, args.output_len, variant,
                                                   warmup=args.warmup)
            rows.append({"variant": variant, "batch": row["batch"],
                         "input_len": row["input_len"], "output_len": args.output_len,
                         "prefill_ms": timing.prefill_s * 1e3,
                         "decode_ms": timing.decode_step_s(args.output_len) * 1e3,
                         "output_tok_s": timing.output_tok_s,
                         "radixlm_speedup": row["output_tok_s"] / timing.output_tok_s})
    hf_baseline.release(model)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the tables; write JSON with --out."""
    args = parse_args(argv)
    setup = resolve_setup(args)
    device, model_dir, ceil = setup.device, setup.model_dir, setup.ceil
    cases = run_engine(model_dir, args, setup.cost, ceil, device)
    rows = [row for row, _ in cases]
    header = run_header(device, ceil, model_dir)
    print(f"one-batch on {header['device']}: HBM {ceil.hbm_gbps:.4g} GB/s, "
          f"matmul {ceil.matmul_tflops:.3g} TFLOP/s ({'measured' if ceil.measured else 'given'})")
    print(format_table(rows, RESULT_COLUMNS), flush=True)
    if args.profile:
        print_profiles(rows)
    save(args, header, rows, [])  # the engine's figures survive a baseline that fails
    if args.baseline == "hf":
        hf_rows = run_hf(model_dir, cases, args, device, setup.dtype)
        print(format_table(hf_rows, HF_COLUMNS))
        save(args, header, rows, hf_rows)
    return 0


def print_profiles(rows: list[dict[str, Any]]) -> None:
    """Kernel time per decode step beside its wall time, and the top kernels, per case."""
    table = [{"batch": r["batch"], "input_len": r["input_len"], **r["profile"]} for r in rows
             if r.get("profile", {}).get("profiled_steps")]
    print(format_table(table, PROFILE_COLUMNS))
    for row in table:
        print(f"top kernels, batch {row['batch']} in {row['input_len']} (ms per step):")
        for item in row["top"]:
            print(f"  {item['ms_per_step']:9.3f}  x{item['calls_per_step']:<6.1f} {item['name']}")


def run_engine(model_dir: Path, args: argparse.Namespace, cost: ModelCost, ceil: Ceilings,
               device: torch.device) -> list[tuple[dict[str, Any], list[list[int]]]]:
    """Every case through one EngineCore, which is released afterwards (memory for HF)."""
    rng = random.Random(args.seed)
    core = build_core(model_dir, args)
    cases = [measure_case(core, cost, ceil, b, n, args, rng, device)
             for b in args.batch_sizes for n in args.input_lens]
    del core
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return cases


def save(args: argparse.Namespace, header: dict[str, Any], rows: list[dict[str, Any]],
         hf_rows: list[dict[str, Any]]) -> None:
    write_json(args.out, {**header, "bench": "one-batch", "args": vars(args),
                          "results": rows, "hf_baseline": hf_rows})


if __name__ == "__main__":
    raise SystemExit(main())
