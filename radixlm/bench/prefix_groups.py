"""Host cost of finding prefix groups for cascade decode attention (CPU only, no device).

A decode batch of ``--groups`` x ``--group-size`` sequences; each group shares ``--shared-len``
slots and each sequence owns ``--own-len`` more (slot numbers shuffled, as a pool hands them
out). Times, median over ``--repeats`` calls:

- ``find_prefix_groups_flat``: what ``ForwardBatch.build`` adds, on the slot lists it has
  already concatenated: on a freshly concatenated array each call (as in build: its gathers
  miss the cache more) and on the same array again (warm);
- ``find_prefix_groups``: from per-sequence int64 tensors (includes the concatenation);
- ``ForwardBatch.build`` without and with ``prefix_min_shared`` (the runner's real path).

Usage: python -m radixlm.bench.prefix_groups [--groups 32 --group-size 16 --shared-len 2048
       --own-len 352 --min-shared 256 --repeats 200]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from radixlm.batch import ForwardBatch
from radixlm.prefix_groups import find_prefix_groups, find_prefix_groups_flat


def make_slots(groups: int, size: int, shared: int, own: int, seed: int) -> list[torch.Tensor]:
    """Per sequence: its group's shared slots, then its own; all slot numbers distinct."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(groups * shared + groups * size * own + 1, generator=gen) + 1
    prefixes = perm[: groups * shared].view(groups, shared)
    owns = perm[groups * shared : groups * shared + groups * size * own].view(-1, own)
    return [torch.cat([prefixes[i // size], owns[i]]) for i in range(groups * size)]


def median_us(
    fn: Callable[[], object], repeats: int, prepare: Callable[[], object] | None = None
) -> float:
    """Median µs of ``fn(prepare())`` (untimed ``prepare``), or of ``fn()`` without one."""
    times = []
    for i in range(repeats + 1):
        arg = prepare() if prepare else None
        start = time.perf_counter()
        fn(arg) if prepare else fn()
        if i:  # the first call warms up
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--groups", type=int, default=32)
    parser.add_argument("--group-size", type=int, default=16)
    parser.add_argument("--shared-len", type=int, default=2048)
    parser.add_argument("--own-len", type=int, default=352)
    parser.add_argument("--min-shared", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=200)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Time the finder and print one line per measurement.

    Args:
        argv: command-line arguments (default: sys.argv[1:]).

    Returns:
        0 when the finder found the groups that were built, 1 otherwise.
    """
    args = parse_args(argv)
    slots = make_slots(args.groups, args.group_size, args.shared_len, args.own_len, seed=0)
    flat, lens = torch.cat(slots), [len(s) for s in slots]
    found = find_prefix_groups_flat(flat, lens, args.min_shared)
    ok = (found is not None and found.group_sizes_cpu == [args.group_size] * args.groups
          and found.shared_lens_cpu == [args.shared_len] * args.groups)  # fmt: skip
    tokens = [[1]] * len(slots)
    rows = [
        ("find_prefix_groups_flat, fresh slot array",
         median_us(lambda f: find_prefix_groups_flat(f, lens, args.min_shared), args.repeats,
                   prepare=lambda: torch.cat(slots))),
        ("find_prefix_groups_flat, same array again",
         median_us(lambda: find_prefix_groups_flat(flat, lens, args.min_shared), args.repeats)),
        ("find_prefix_groups (from per-sequence tensors)",
         median_us(lambda: find_prefix_groups(slots, args.min_shared), args.repeats)),
        ("ForwardBatch.build, no groups",
         median_us(lambda: ForwardBatch.build(tokens, slots), args.repeats)),
        ("ForwardBatch.build, prefix_min_shared",
         median_us(lambda: ForwardBatch.build(tokens, slots, prefix_min_shared=args.min_shared),
                   args.repeats)),
    ]  # fmt: skip
    print(
        f"{len(slots)} sequences x {lens[0]} slots, {args.groups} groups of "
        f"{args.group_size} sharing {args.shared_len}; torch threads {torch.get_num_threads()}; "
        f"groups found as built: {ok}"
    )
    for name, us in rows:
        print(f"  {name:<48} {us:9.1f} us median of {args.repeats}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
