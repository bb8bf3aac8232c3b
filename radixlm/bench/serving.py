"""Online serving benchmark against a running radixlm server (or any SGLang-style server).

Requests are token ids from the offline benchmark's datasets (``random``, ``shared-prefix``),
sent as streaming ``/generate`` (``--backend native``) or ``/v1/completions`` (``--backend
openai``) calls with ``ignore_eos``, arriving as a Poisson process at ``--request-rate`` (inf: all
at once) and capped at ``--max-concurrency`` in flight. For each request the client records the
time to the first streamed token (TTFT), the gaps between streamed chunks (inter-token latency;
a chunk may carry more than one token) and the end-to-end latency; the summary gives their p50
and p99 and the request/token throughput over the whole run.

Usage: radixlm bench serving --base-url http://127.0.0.1:30000 --num-requests 200
       --request-rate 8 [--backend openai] [--out serving.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from radixlm.bench.common import format_table, percentile, write_json
from radixlm.bench.offline import BenchRequest, random_dataset, shared_prefix_dataset

SUMMARY_COLUMNS = [
    ("completed", "ok"), ("failed", "failed"), ("wall_s", "wall s"),
    ("request_per_s", "req/s"), ("output_tok_s", "out tok/s"),
    ("ttft_p50_ms", "TTFT p50 ms"), ("ttft_p99_ms", "TTFT p99 ms"),
    ("itl_p50_ms", "ITL p50 ms"), ("itl_p99_ms", "ITL p99 ms"),
    ("e2e_p50_s", "e2e p50 s"), ("e2e_p99_s", "e2e p99 s"),
]


@dataclass
class RequestRecord:
    """What the client saw of one request (times in seconds from its send)."""

    prompt_tokens: int
    output_tokens: int = 0
    ttft: float | None = None
    chunk_times: list[float] = field(default_factory=list)
    e2e: float | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.e2e is not None

    def inter_token_gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]


async def sse_events(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """The JSON objects of a server-sent event stream, up to ``data: [DONE]``."""
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            return
        yield json.loads(payload)


def _error_of(event: dict[str, Any]) -> str | None:
    error = event.get("error")
    if error is None:
        return None
    return error.get("message", str(error)) if isinstance(error, dict) else str(error)


async def send_native(client: httpx.AsyncClient, req: BenchRequest, record: RequestRecord,
                      start: float) -> None:
    """Stream one ``/generate`` request; ``output_ids`` in each chunk is cumulative."""
    body = {"input_ids": req.input_ids, "stream": True, "sampling_params": {
        "max_new_tokens": req.output_len, "temperature": 0.0, "ignore_eos": True}}
    async with client.stream("POST", "/generate", json=body) as response:
        response.raise_for_status()
        async for event in sse_events(response):
            if (message := _error_of(event)) is not None:
                record.error = message
                return
            count = len(event.get("output_ids", []))
            if count > record.output_tokens:
                _on_chunk(record, time.perf_counter() - start)
                record.output_tokens = count


async def send_openai(client: httpx.AsyncClient, req: BenchRequest, record: RequestRecord,
                      start: float, model: str) -> None:
    """Stream one ``/v1/completions`` request; the final usage chunk gives the token count."""
    body = {"model": model, "prompt": req.input_ids, "max_tokens": req.output_len,
            "temperature": 0.0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for event in sse_events(response):
            if (message := _error_of(event)) is not None:
                record.error = message
                return
            if any(c.get("text") for c in event.get("choices", [])):
                _on_chunk(record, time.perf_counter() - start)
            if event.get("usage"):
                record.output_tokens = event["usage"]["completion_tokens"]


def _on_chunk(record: RequestRecord, now: float) -> None:
    if record.ttft is None:
        record.ttft = now
    record.chunk_times.append(now)


async def run_one(client: httpx.AsyncClient, req: BenchRequest, args: argparse.Namespace,
                  model: str, gate: asyncio.Semaphore | None) -> RequestRecord:
    record = RequestRecord(len(req.input_ids))
    if gate is not None:
        await gate.acquire()
    start = time.perf_counter()
    try:
        if args.backend == "native":
            await send_native(client, req, record, start)
        else:
            await send_openai(client, req, record, start, model)
        if record.error is None:
            record.e2e = time.perf_counter() - start
    except (httpx.HTTPError, ValueError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"
    finally:
        if gate is not None:
            gate.release()
    return record


async def run_benchmark(requests: list[BenchRequest], args: argparse.Namespace,
                        transport: httpx.AsyncBaseTransport | None = None
                        ) -> tuple[list[RequestRecord], float]:
    """Send every request on its Poisson schedule; returns the records and the wall time."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=args.base_url, timeout=args.timeout,
                                 limits=limits, transport=transport) as client:
        model = args.model_name or await _served_model(client, args.backend)
        gate = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
        rng = random.Random(args.seed)
        start = time.perf_counter()
        tasks = []
        for i, req in enumerate(requests):
            if i and args.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(args.request_rate))
            tasks.append(asyncio.create_task(run_one(client, req, args, model, gate)))
        records = await asyncio.gather(*tasks)
        return list(records), time.perf_counter() - start


async def _served_model(client: httpx.AsyncClient, backend: str) -> str:
    if backend != "openai":
        return ""
    response = await client.get("/v1/models")
    response.raise_for_status()
    return response.json()["data"][0]["id"]


def summarize(records: list[RequestRecord], wall_s: float) -> dict[str, Any]:
    """Throughput and latency percentiles over the completed requests."""
    ok = [r for r in records if r.ok]
    gaps = [g for r in ok for g in r.inter_token_gaps()]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    e2e = [r.e2e for r in ok]
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok
            if r.ttft is not None and r.output_tokens > 1]
    out_tokens = sum(r.output_tokens for r in ok)
    return {
        "completed": len(ok), "failed": len(records) - len(ok), "wall_s": wall_s,
        "request_per_s": len(ok) / wall_s, "output_tok_s": out_tokens / wall_s,
        "input_tok_s": sum(r.prompt_tokens for r in ok) / wall_s,
        "output_tokens": out_tokens,
        "ttft_p50_ms": percentile(ttft, 50) * 1e3, "ttft_p99_ms": percentile(ttft, 99) * 1e3,
        "ttft_mean_ms": sum(ttft) / len(ttft) * 1e3 if ttft else float("nan"),
        "itl_p50_ms": percentile(gaps, 50) * 1e3, "itl_p99_ms": percentile(gaps, 99) * 1e3,
        "tpot_p50_ms": percentile(tpot, 50) * 1e3,
        "e2e_p50_s": percentile(e2e, 50), "e2e_p99_s": percentile(e2e, 99),
        "errors": sorted({r.error for r in records if r.error})[:5],
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="radixlm bench serving", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:30000")
    parser.add_argument("--backend", choices=["native", "openai"], default="native")
    parser.add_argument("--model-name", default=None,
                        help="model name for /v1 requests (default: the server's first)")
    parser.add_argument("--dataset", choices=["random", "shared-prefix"], default="random")
    parser.add_argument("--num-requests", type=int, default=200)
    parser.add_argument("--input-len", type=int, default=1024)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--range-ratio", type=float, default=1.0)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--prompts-per-group", type=int, default=16)
    parser.add_argument("--system-len", type=int, default=2048)
    parser.add_argument("--question-len", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="draw ids below this (default: the server's vocab_size)")
    parser.add_argument("--request-rate", type=float, default=float("inf"),
                        help="requests per second (Poisson arrivals); inf sends all at once")
    parser.add_argument("--max-concurrency", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=600.0, help="per-request seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


def build_requests(args: argparse.Namespace, vocab: int) -> list[BenchRequest]:
    rng = random.Random(args.seed)
    if args.dataset == "random":
        return random_dataset(rng, args.num_requests, args.input_len, args.output_len,
                              args.range_ratio, vocab)
    return shared_prefix_dataset(rng, args.groups, args.prompts_per_group, args.system_len,
                                 args.question_len, args.output_len, vocab)


def server_vocab(base_url: str, transport: httpx.BaseTransport | None = None) -> int:
    """The served model's vocabulary size, from ``/server_info``."""
    with httpx.Client(base_url=base_url, timeout=30, transport=transport) as client:
        response = client.get("/server_info")
        response.raise_for_status()
        return int(response.json()["vocab_size"])


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the summary; write JSON with --out."""
    args = parse_args(argv)
    vocab = args.vocab_size or server_vocab(args.base_url)
    requests = build_requests(args, vocab)
    records, wall = asyncio.run(run_benchmark(requests, args))
    summary = summarize(records, wall)
    print(f"serving {args.backend} {args.dataset} at {args.base_url}: "
          f"{len(requests)} requests, rate {args.request_rate}, "
          f"max concurrency {args.max_concurrency or 'none'}")
    print(format_table([summary], SUMMARY_COLUMNS))
    for error in summary["errors"]:
        print(f"error: {error}")
    write_json(args.out, {"bench": "serving", "args": vars(args), "summary": summary,
                          "date": time.strftime("%Y-%m-%d %H:%M:%S")})
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
