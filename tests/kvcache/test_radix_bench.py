"""The radix cache benchmark runs end to end at a tiny size and prints one row per operation."""

from __future__ import annotations

from radixlm.bench.radix_cache import main


def test_benchmark_prints_a_row_per_operation(capsys):
    main(["--tree-tokens", "4000", "--key-len", "256", "--runs", "20", "--page-size", "4"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    ops = [row.split("|")[1].strip() for row in rows[1:]]
    assert [op.split(",")[0] for op in ops] == [
        "match 256 (full hit)",
        "match 256 (half hit)",
        "match 256 (miss)",
        "insert 256 (half new)",
        "insert 256 (all cached)",
        "evict 128 tokens",
        "allocator alloc 4 slots",
        "allocator free 4 slots",
        "allocator alloc 256 slots",
        "allocator free 256 slots",
    ]
    for row in rows[1:]:
        wall_median, wall_p99, cpu_median, cpu_p99, runs = row.split("|")[2:7]
        assert 0 < float(wall_median) <= float(wall_p99) and int(runs) == 20
        assert 0 <= float(cpu_median) <= float(cpu_p99)
