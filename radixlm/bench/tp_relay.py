"""Host cost of relaying one decode batch to the tensor-parallel ranks (no model, no GPU).

Under ``--tp-size N`` every step's ``ScheduledBatch`` is pickled in the engine core, piped to
rank 0 and broadcast by rank 0 to the other ranks over gloo. This times those pieces for a decode
batch of B rows whose sequences are C tokens long (every row carries its C slot numbers): the
compacted batch's pickle size, ``pickle.dumps``/``loads`` (median of repeats), and the whole
relay core -> rank 0 -> rank 1 between real processes (median round trip, answered by rank 1).
The uncompacted batch (token lists included) is shown beside it.

Usage: ``radixlm bench tp-relay [--batch-sizes 1 64 256] [--context 1280] [--repeats 20]``
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import pickle
import statistics
import time

import numpy as np

from radixlm.batch import ForwardMode, ScheduledBatch, ScheduledSeq
from radixlm.bench.common import format_table
from radixlm.executor.tp_worker import compact_batch, free_port
from radixlm.sampling_params import SamplingParams


def decode_batch(rows: int, context: int, prompt_len: int) -> ScheduledBatch:
    """B greedy decode rows with C slots each (prompt ``prompt_len``, the rest output)."""
    params = SamplingParams(max_new_tokens=context, temperature=0.0)
    seqs = [
        ScheduledSeq(
            rid=f"r{i}",
            new_tokens=[5],
            sample=True,
            params=params,
            slots=np.arange(i * context, (i + 1) * context, dtype=np.int64),
            prompt_ids=list(range(prompt_len)),
            output_ids=list(range(context - prompt_len)),
        )
        for i in range(rows)
    ]
    return ScheduledBatch(mode=ForwardMode.DECODE, seqs=seqs)


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _rank(rank: int, port: int, conn, repeats: int) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    for _ in range(repeats):
        box = [conn.recv()] if rank == 0 else [None]
        dist.broadcast_object_list(box, src=0)
        if rank == 1:
            conn.send(len(box[0].seqs))
    dist.destroy_process_group()


def relay_ms(batch: ScheduledBatch, repeats: int) -> float:
    """Median round trip: send to rank 0, broadcast to rank 1, rank 1's answer back."""
    ctx = mp.get_context("spawn")
    to_rank0, rank0_end = ctx.Pipe()
    from_rank1, rank1_end = ctx.Pipe()
    port = free_port()
    procs = [
        ctx.Process(target=_rank, args=(0, port, rank0_end, repeats + 1)),
        ctx.Process(target=_rank, args=(1, port, rank1_end, repeats + 1)),
    ]
    for proc in procs:
        proc.start()
    to_rank0.send(batch)  # warm-up: connections, first pickles
    from_rank1.recv()

    def once():
        to_rank0.send(batch)
        from_rank1.recv()

    ms = _median_ms(once, repeats)
    for proc in procs:
        proc.join(30)
    return ms


def main(argv: list[str] | None = None) -> int:
    """Print one row per batch size (compacted and full batches)."""
    parser = argparse.ArgumentParser(
        prog="radixlm bench tp-relay",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--context", type=int, default=1280, help="tokens per sequence")
    parser.add_argument("--prompt-len", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    rows = []
    for size in args.batch_sizes:
        full = decode_batch(size, args.context, args.prompt_len)
        for name, batch in (("compact", compact_batch(full)), ("full", full)):
            data = pickle.dumps(batch)
            rows.append(
                {
                    "batch": size,
                    "form": name,
                    "mb": len(data) / 1e6,
                    "dumps": _median_ms(lambda b=batch: pickle.dumps(b), args.repeats),
                    "loads": _median_ms(lambda d=data: pickle.loads(d), args.repeats),
                    "relay": relay_ms(batch, args.repeats) if name == "compact" else None,
                }
            )
    print(
        format_table(
            rows,
            [
                ("batch", "batch"),
                ("form", "form"),
                ("mb", "MB"),
                ("dumps", "dumps ms"),
                ("loads", "loads ms"),
                ("relay", "core->rank0->rank1->core ms"),
            ],
        )
    )
    return 0
