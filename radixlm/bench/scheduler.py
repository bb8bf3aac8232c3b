"""Scheduler overhead: CPU time per step with a null model, apart from any model cost.

Usage: ``radixlm bench scheduler [--batch-sizes 1 64 256] [--prompt-len 512] [--steps 200]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from radixlm.config import SchedulerConfig
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


def measure(batch_size: int, prompt_len: int, steps: int, page_size: int) -> dict:
    sched = build(batch_size, prompt_len, steps, page_size)
    runner = NullRunner(vocab_size=32000)
    while sched.waiting or sched.prefilling:  # prefill everything first
        batch = sched.schedule()
        sched.process(batch, runner.forward(batch))
    schedule_us, process_us = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        batch = sched.schedule()
        t1 = time.perf_counter()
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
            "step_us_p50": statistics.median(total),
            "step_us_p99": sorted(total)[int(len(total) * 0.99) - 1],
            "us_per_request": statistics.median(total) / batch_size}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="radixlm bench scheduler", description=__doc__)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--page-size", type=int, default=1)
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    rows = [measure(b, args.prompt_len, args.steps, args.page_size) for b in args.batch_sizes]
    print(f"{'batch':>6} {'schedule µs':>12} {'process µs':>11} {'step p50 µs':>12} "
          f"{'step p99 µs':>12} {'µs/request':>11}")
    for r in rows:
        print(f"{r['batch_size']:>6} {r['schedule_us_p50']:>12.1f} {r['process_us_p50']:>11.1f} "
              f"{r['step_us_p50']:>12.1f} {r['step_us_p99']:>12.1f} {r['us_per_request']:>11.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
