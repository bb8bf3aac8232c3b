"""Radix cache micro-benchmark: match_prefix / insert / evict of long keys in a large tree.

The tree is filled with a realistic mix: each sequence is one of a few system prompts, then one of
a few few-shot blocks for that prompt, then a unique tail, so the tree is three levels deep with
wide fan-out at the bottom. Queries are fresh int objects (as a tokenizer would produce), so list
comparison cannot take the identity shortcut.

Usage: python -m radixlm.bench.radix_cache [--tree-tokens 1000000] [--key-len 4096] [--page-size 1]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from radixlm.kvcache import PageAllocator, RadixCache

VOCAB = 128_256


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree-tokens", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--key-len", type=int, default=4096)
    parser.add_argument("--page-size", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=8, help="distinct system prompts")
    parser.add_argument("--shots", type=int, default=4, help="few-shot blocks per prompt")
    parser.add_argument("--runs", type=int, default=1000, help="timed calls per operation")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


class Workload:
    """Builds keys from shared prompt/few-shot blocks plus unique tails; owns the cache."""

    def __init__(self, args: argparse.Namespace, pool_tokens: int):
        self.rng = random.Random(args.seed)
        self.key_len, self.ps = args.key_len, args.page_size
        block = args.key_len // 4
        self.prompts = [self._random(block) for _ in range(args.prompts)]
        self.shots = [[self._random(block) for _ in range(args.shots)] for _ in self.prompts]
        num_pages = -(-pool_tokens // self.ps)
        self.alloc = PageAllocator(num_pages, self.ps, first_slot=self.ps)
        self.cache = RadixCache(self.ps, free_fn=self.alloc.free)
        self.cached: list[list[int]] = []

    def _random(self, n: int) -> list[int]:
        return [self.rng.randrange(VOCAB) for _ in range(n)]

    def key(self, shared_blocks: int = 2) -> list[int]:
        """A key sharing its first ``shared_blocks`` quarter blocks with the workload's mix."""
        p = self.rng.randrange(len(self.prompts))
        head = [self.prompts[p], self.rng.choice(self.shots[p])][:shared_blocks]
        prefix = [t for part in head for t in part]
        return prefix + self._random(self.key_len - len(prefix))

    def insert(self, key: list[int]) -> int:
        """Insert ``key`` with fresh slots, freeing duplicates as the engine does."""
        slots = self.alloc.alloc(-(-len(key) // self.ps) * self.ps)
        if slots is None:
            raise RuntimeError("benchmark pool too small")
        present = self.cache.insert(key, slots)
        aligned = len(key) - len(key) % self.ps
        for part in (slots[:present], slots[aligned:]):
            if part.size:
                self.alloc.free(part)
        return present

    def fill(self, tree_tokens: int) -> None:
        while self.cache.total_tokens() < tree_tokens:
            key = self.key()
            self.insert(key)
            self.cached.append(key)


def fresh(key: list[int]) -> list[int]:
    """The same token ids as new int objects."""
    return torch.tensor(key).tolist()


def time_calls(fn: Callable[[int], object], runs: int) -> tuple[list[float], list[float]]:
    """Wall-clock and thread-CPU microseconds of ``fn(i)`` for i in range(runs).

    CPU time is reported beside wall time because the machine is shared: wall time includes
    preemption by other processes, thread CPU time does not.
    """
    wall, cpu = [], []
    for i in range(runs):
        start, start_cpu = time.perf_counter_ns(), time.thread_time_ns()
        fn(i)
        cpu.append((time.thread_time_ns() - start_cpu) / 1e3)
        wall.append((time.perf_counter_ns() - start) / 1e3)
    return wall, cpu


def _p99(values: list[float]) -> float:
    return sorted(values)[min(len(values) - 1, int(0.99 * len(values)))]


def summarize(name: str, timings: tuple[list[float], list[float]]) -> str:
    wall, cpu = timings
    return (
        f"| {name:<40} | {statistics.median(wall):>8.1f} | {_p99(wall):>8.1f} "
        f"| {statistics.median(cpu):>8.1f} | {_p99(cpu):>8.1f} | {len(wall):>5} |"
    )


def bench_tree(args: argparse.Namespace, tree_tokens: int) -> list[str]:
    """Fill a tree to ``tree_tokens`` and time each operation; returns table rows."""
    runs = args.runs
    work = Workload(args, tree_tokens + (runs + 8) * args.key_len * 2)
    work.fill(tree_tokens)
    cache, rows = work.cache, []
    size = f"{cache.total_tokens() / 1e6:.2f}M"

    hits = [fresh(work.rng.choice(work.cached)) for _ in range(runs)]
    rows.append(
        summarize(
            f"match {args.key_len} (full hit), tree {size}",
            time_calls(lambda i: cache.match_prefix(hits[i]), runs),
        )
    )
    partial = [fresh(work.key()) for _ in range(runs)]
    for key in partial:  # the first match of a new key splits a node; time the steady state
        cache.match_prefix(key)
    rows.append(
        summarize(
            f"match {args.key_len} (half hit), tree {size}",
            time_calls(lambda i: cache.match_prefix(partial[i]), runs),
        )
    )
    misses = [fresh(work.key(shared_blocks=0)) for _ in range(runs)]
    rows.append(
        summarize(
            f"match {args.key_len} (miss), tree {size}",
            time_calls(lambda i: cache.match_prefix(misses[i]), runs),
        )
    )
    slot_sets = [work.alloc.alloc(len(key)) for key in partial]
    present: list[int] = []
    rows.append(
        summarize(
            f"insert {args.key_len} (half new), tree {size}",
            time_calls(lambda i: present.append(cache.insert(partial[i], slot_sets[i])), runs),
        )
    )
    for slots, n in zip(slot_sets, present):
        work.alloc.free(slots[:n])  # duplicates of the cached half
    dummy = torch.zeros(args.key_len, dtype=torch.int64)  # nothing is taken: all cached
    rows.append(
        summarize(
            f"insert {args.key_len} (all cached), tree {size}",
            time_calls(lambda i: cache.insert(hits[i], dummy), runs),
        )
    )
    rows.append(
        summarize(
            f"evict {args.key_len // 2} tokens, tree {size}",
            time_calls(lambda i: cache.evict(args.key_len // 2), runs),
        )
    )
    return rows


def bench_allocator(args: argparse.Namespace) -> list[str]:
    """Time alloc and free of one page and of a whole key's pages; returns table rows."""
    alloc = PageAllocator(-(-1_000_000 // args.page_size), args.page_size, args.page_size)
    rows = []
    for tokens in (args.page_size, _aligned_up(args.key_len, args.page_size)):
        rows.extend(_alloc_free_rows(alloc, tokens, args.runs))
    return rows


def _alloc_free_rows(alloc: PageAllocator, tokens: int, runs: int) -> list[str]:
    """Rounds of as many allocations as fit, then their frees, until ``runs`` of each."""
    per_round = alloc.capacity_tokens // tokens
    alloc_times: tuple[list[float], list[float]] = ([], [])
    free_times: tuple[list[float], list[float]] = ([], [])
    for start in range(0, runs, per_round):
        taken = [
            _timed_once(alloc.alloc, tokens, alloc_times) for _ in range(start, runs)[:per_round]
        ]
        for slots in taken:
            _timed_once(alloc.free, slots, free_times)
    return [
        summarize(f"allocator alloc {tokens} slots", alloc_times),
        summarize(f"allocator free {tokens} slots", free_times),
    ]


def _timed_once(fn: Callable[[Any], Any], arg: Any, sink: tuple[list[float], list[float]]) -> Any:
    """``fn(arg)``, appending its wall and thread-CPU microseconds to ``sink``."""
    start, start_cpu = time.perf_counter_ns(), time.thread_time_ns()
    out = fn(arg)
    sink[1].append((time.thread_time_ns() - start_cpu) / 1e3)
    sink[0].append((time.perf_counter_ns() - start) / 1e3)
    return out


def _aligned_up(n: int, page_size: int) -> int:
    return -(-n // page_size) * page_size


def main(argv: list[str] | None = None) -> None:
    """Print a markdown table of median / p99 latencies per operation."""
    args = _parse(argv)
    print(
        f"# radix cache: key {args.key_len} tokens, page_size {args.page_size}, "
        f"torch {torch.__version__}"
    )
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    print("| operation | wall median µs | wall p99 µs | CPU median µs | CPU p99 µs | runs |")
    print("|---|---:|---:|---:|---:|---:|")
    for tree_tokens in args.tree_tokens:
        for row in bench_tree(args, tree_tokens):
            print(row, flush=True)
    for row in bench_allocator(args):
        print(row, flush=True)


if __name__ == "__main__":
    main()
