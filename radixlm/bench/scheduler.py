"""Scheduler overhead: CPU time per step with a null model, apart from any model cost.

Per decode step it times ``schedule()``, ``process()`` and, separately, ``ForwardBatch.build``
of the scheduled batch on the CPU exactly as ``ModelRunner.launch`` calls it (the host part of
a launch that does not depend on the model); "µs/request" covers schedule + process.

Usage: ``radixlm bench scheduler [--batch-sizes 1 64 256] [--prompt-len 512] [--steps 200]
[--device-ms 5]``

With ``--device-ms`` it also runs decode steps through the engine's step loop against a null
runner that emulates an asynchronous device taking that long per step, serially and with
overlap scheduling, and reports steps/s and the share of time the emulated device sat idle
waiting for the host. That measures how much host work overlap hides, not GPU speed.

With ``--constrained-tokenizer DIR`` and ``--regex``/``--json-schema``/``--choices`` it runs the
same comparison for whole constrained requests (prefill, then decode until every grammar
completes or ``--output-len`` tokens), with real grammars (llguidance) over that tokenizer: the
null model samples the first token each mask allows, so mask filling, grammar advance and
jump-forward are all on the host as in the engine. Unconstrained requests of the same lengths
run alongside as the reference. Usage: ``radixlm bench scheduler --batch-sizes 64 256
--device-ms 5 --constrained-tokenizer ../shared/tokenizers/llama3 --regex '[0-9a-f]{128}'``
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

from radixlm.batch import ForwardBatch, ScheduledBatch
from radixlm.config import SchedulerConfig
from radixlm.engine.overlap import StepLoop
from radixlm.executor.logits import LogitsLayout
from radixlm.executor.null_runner import NullRunner
from radixlm.kvcache.allocator import PageAllocator
from radixlm.kvcache.radix_tree import RadixCache
from radixlm.request import Request
from radixlm.sampling_params import SamplingParams
from radixlm.sched.kv_manager import KVManager
from radixlm.sched.scheduler import Scheduler, SchedulerLimits


def build(batch_size: int, prompt_len: int, steps: int, page_size: int) -> Scheduler:
    capacity = batch_size * (prompt_len + steps + 64) + 1024
    allocator = PageAllocator(-(-capacity // page_size), page_size, first_slot=page_size)
    tree = RadixCache(page_size, free_fn=allocator.free)
    limits = SchedulerLimits(batch_size, context_length=1 << 20, eos_token_ids=frozenset())
    config = SchedulerConfig(max_prefill_tokens=batch_size * prompt_len + 1)
    sched = Scheduler(config, limits, KVManager(allocator, tree, True))
    params = SamplingParams(max_new_tokens=steps + 16, temperature=0.0, ignore_eos=True)
    for i in range(batch_size):
        prompt = [(i * 7919 + j) % 32000 for j in range(prompt_len)]
        sched.add(Request(rid=f"r{i}", input_ids=prompt, params=params))
    return sched


def time_forward_batch_build(batch: ScheduledBatch) -> float:
    """Seconds ``ForwardBatch.build`` takes for ``batch``, called as the runner calls it (CPU
    device)."""
    layout = LogitsLayout.of(batch.seqs)
    t0 = time.perf_counter()
    ForwardBatch.build(
        [s.new_tokens for s in batch.seqs], [s.slots for s in batch.seqs],
        logits_rows=layout.rows_per_seq, mode=batch.mode, device="cpu")
    return time.perf_counter() - t0


def measure(batch_size: int, prompt_len: int, steps: int, page_size: int) -> dict:
    gc.collect()
    sched = build(batch_size, prompt_len, steps, page_size)
    runner = NullRunner(vocab_size=32000)
    while sched.waiting or sched.prefilling:  # prefill everything first
        batch = sched.schedule()
        sched.process(batch, runner.forward(batch))
    schedule_us, process_us, build_us = [], [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        batch = sched.schedule()
        t1 = time.perf_counter()
        build_us.append(time_forward_batch_build(batch) * 1e6)
        result = runner.forward(batch)
        t2 = time.perf_counter()
        sched.process(batch, result)
        t3 = time.perf_counter()
        schedule_us.append((t1 - t0) * 1e6)
        process_us.append((t3 - t2) * 1e6)
    total = [a + b for a, b in zip(schedule_us, process_us)]
    return {"batch_size": batch_size, "prompt_len": prompt_len, "page_size": page_size,
            "schedule_us_p50": statistics.median(schedule_us),
            "process_us_p50": statistics.median(process_us),
            "build_us_p50": statistics.median(build_us),
            "step_us_p50": statistics.median(total),
            "step_us_p99": sorted(total)[int(len(total) * 0.99) - 1],
            "us_per_request": statistics.median(total) / batch_size}


def measure_overlap(batch_size: int, prompt_len: int, steps: int, page_size: int,
                    device_ms: float, overlap: bool) -> dict:
    """Decode ``steps`` steps through the step loop against an emulated asynchronous device.

    Returns:
        steps/s, wall ms per step, host CPU ms per step and the device's idle share.
    """
    gc.collect()  # the previous run's garbage would otherwise be collected inside this one
    sched = build(batch_size, prompt_len, steps, page_size)
    runner = NullRunner(vocab_size=32000, device_ms=device_ms)
    loop = StepLoop(sched, runner, overlap)
    while sched.waiting or sched.prefilling:  # prefill everything first
        loop.step()
    loop.drain()
    busy_before, launched_before = runner.device_busy_seconds, loop.steps_launched
    wall_start, cpu_start = time.perf_counter(), time.thread_time()
    for _ in range(steps):
        loop.step()
    loop.drain()
    wall = time.perf_counter() - wall_start
    cpu = time.thread_time() - cpu_start
    launched = loop.steps_launched - launched_before
    busy = runner.device_busy_seconds - busy_before
    return {"batch_size": batch_size, "device_ms": device_ms, "overlap": overlap,
            "steps": launched, "steps_per_s": launched / wall, "ms_per_step": wall / launched * 1e3,
            "host_cpu_ms_per_step": cpu / launched * 1e3, "device_idle": max(0.0, 1 - busy / wall)}


def measure_constrained(batch_size: int, prompt_len: int, output_len: int, device_ms: float,
                        overlap: bool, grammar, constraint: dict | None) -> dict:
    """Run ``batch_size`` requests (constrained by ``constraint``, or not) to completion
    through the step loop against an emulated device.

    Returns:
        Steps, output tokens, tokens/s, and the device's idle share over the whole run.
    """
    gc.collect()
    compiler = grammar.compiler
    eos = frozenset(compiler.info.eos_ids)
    capacity = batch_size * (prompt_len + output_len + 64) + 1024
    allocator = PageAllocator(capacity, 1, first_slot=1)
    kv = KVManager(allocator, RadixCache(1, free_fn=allocator.free), True)
    limits = SchedulerLimits(batch_size, context_length=1 << 20, eos_token_ids=eos)
    sched = Scheduler(SchedulerConfig(max_prefill_tokens=batch_size * prompt_len + 1), limits,
                      kv, grammar)
    runner = NullRunner(vocab_size=compiler.vocab_size, device_ms=device_ms)
    loop = StepLoop(sched, runner, overlap)
    params = SamplingParams(max_new_tokens=output_len, temperature=0.0,
                            ignore_eos=constraint is None, **(constraint or {}))
    for i in range(batch_size):
        prompt = [(i * 7919 + j) % 32000 + 1000 for j in range(prompt_len)]
        req = Request(rid=f"r{i}", input_ids=prompt, params=params)
        grammar.submit(req)
        sched.add(req)
    tokens = 0
    wall_start, cpu_start = time.perf_counter(), time.thread_time()
    while loop.has_work():
        tokens += sum(len(out.new_token_ids) for out in loop.step())
    wall = time.perf_counter() - wall_start
    cpu = time.thread_time() - cpu_start
    kind = next(iter(constraint)) if constraint else "none"
    return {"batch_size": batch_size, "device_ms": device_ms, "overlap": overlap,
            "constraint": kind, "steps": loop.steps_launched, "output_tokens": tokens,
            "tokens_per_s": tokens / wall, "ms_per_step": wall / loop.steps_launched * 1e3,
            "host_cpu_ms_per_step": cpu / loop.steps_launched * 1e3,
            "dry_waits": runner.syncs_on_empty_queue,
            "device_idle": max(0.0, 1 - runner.device_busy_seconds / wall)}


def print_constrained(rows: list[dict]) -> None:
    print(f"\n{'batch':>6} {'device ms':>9} {'constraint':>11} {'loop':>8} {'steps':>6} "
          f"{'tokens':>7} {'tok/s':>8} {'ms/step':>8} {'host CPU ms/step':>16} "
          f"{'dry waits':>9} {'device idle':>11}")
    for r in rows:
        loop = "overlap" if r["overlap"] else "serial"
        print(f"{r['batch_size']:>6} {r['device_ms']:>9.1f} {r['constraint']:>11} {loop:>8} "
              f"{r['steps']:>6} {r['output_tokens']:>7} {r['tokens_per_s']:>8.0f} "
              f"{r['ms_per_step']:>8.2f} {r['host_cpu_ms_per_step']:>16.2f} "
              f"{r['dry_waits']:>9} {r['device_idle']:>10.1%}")


def run_constrained(args: argparse.Namespace) -> list[dict]:
    from transformers import AutoTokenizer

    from radixlm.constrained import GrammarCompiler
    from radixlm.sched.grammar_state import GrammarState

    if args.regex:
        constraint = {"regex": args.regex}
    elif args.json_schema:
        constraint = {"json_schema": args.json_schema}
    else:
        constraint = {"choices": args.choices}
    tokenizer = AutoTokenizer.from_pretrained(args.constrained_tokenizer)
    rows = []
    with GrammarCompiler(tokenizer, backend=args.grammar_backend, isolate=False) as compiler:
        grammar = GrammarState(compiler, tokenizer, mask_threads=args.mask_threads)
        compiler.submit(*next(iter(constraint.items()))).result()  # compile (cached) up front
        for b in args.batch_sizes:
            for which in (None, constraint):
                for overlap in (False, True):
                    rows.append(measure_constrained(b, args.prompt_len, args.output_len,
                                                    args.device_ms, overlap, grammar, which))
    print_constrained(rows)
    return rows


def print_overlap(rows: list[dict]) -> None:
    print(f"\n{'batch':>6} {'device ms':>9} {'loop':>8} {'steps/s':>8} {'ms/step':>8} "
          f"{'host CPU ms/step':>16} {'device idle':>11}")
    for r in rows:
        loop = "overlap" if r["overlap"] else "serial"
        print(f"{r['batch_size']:>6} {r['device_ms']:>9.1f} {loop:>8} {r['steps_per_s']:>8.1f} "
              f"{r['ms_per_step']:>8.2f} {r['host_cpu_ms_per_step']:>16.2f} "
              f"{r['device_idle']:>10.1%}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="radixlm bench scheduler", description=__doc__)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--page-size", type=int, default=1)
    parser.add_argument("--device-ms", type=float, default=0.0,
                        help="also compare serial and overlapped loops against an emulated "
                             "device taking this long per step")
    parser.add_argument("--out", help="write the rows as JSON here")
    con = parser.add_argument_group("constrained requests (with --device-ms)")
    con.add_argument("--constrained-tokenizer", default=None,
                     help="a real tokenizer directory: run constrained requests to completion")
    con.add_argument("--regex", default=None)
    con.add_argument("--json-schema", default=None, help="a JSON schema (text)")
    con.add_argument("--choices", nargs="+", default=None)
    con.add_argument("--output-len", type=int, default=128)
    con.add_argument("--grammar-backend", default="llguidance")
    con.add_argument("--mask-threads", type=int, default=None,
                     help="threads filling masks (default: the engine's, up to 8)")
    args = parser.parse_args(argv)
    if args.constrained_tokenizer:
        if args.device_ms <= 0 or not (args.regex or args.json_schema or args.choices):
            parser.error("--constrained-tokenizer needs --device-ms and a constraint")
        rows = run_constrained(args)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=2)
        return
    rows = [measure(b, args.prompt_len, args.steps, args.page_size) for b in args.batch_sizes]
    print(f"{'batch':>6} {'schedule µs':>12} {'process µs':>11} {'step p50 µs':>12} "
          f"{'step p99 µs':>12} {'µs/request':>11} {'build µs':>9}")
    for r in rows:
        print(f"{r['batch_size']:>6} {r['schedule_us_p50']:>12.1f} {r['process_us_p50']:>11.1f} "
              f"{r['step_us_p50']:>12.1f} {r['step_us_p99']:>12.1f} {r['us_per_request']:>11.2f} "
              f"{r['build_us_p50']:>9.1f}")
    if args.device_ms > 0:
        overlap_rows = [measure_overlap(b, args.prompt_len, args.steps, args.page_size,
                                        args.device_ms, overlap)
                        for b in args.batch_sizes for overlap in (False, True)]
        print_overlap(overlap_rows)
        rows = rows + overlap_rows
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
