"""`radixlm bench serving`: stream parsing and metrics; a run against the real server (slow)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from radixlm.bench import serving
from radixlm.bench.offline import BenchRequest
from radixlm.bench.serving import RequestRecord, summarize


def _args(**overrides):
    args = serving.parse_args([])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def _sse(events: list[dict]) -> bytes:
    body = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    return body.encode()


def _mock(routes: dict[str, list[dict]], seen: list[dict]) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "tiny"}]})
        seen.append(json.loads(request.content))
        return httpx.Response(200, content=_sse(routes[request.url.path]),
                              headers={"content-type": "text/event-stream"})
    return httpx.MockTransport(handle)


def test_native_stream_counts_cumulative_output_ids():
    events = [{"output_ids": [5], "meta_info": {}}, {"output_ids": [5, 6, 7], "meta_info": {}},
              {"output_ids": [5, 6, 7], "meta_info": {"finish_reason": {"type": "length"}}}]
    seen: list[dict] = []
    reqs = [BenchRequest([1, 2, 3], 3), BenchRequest([4, 5], 3)]
    records, wall = asyncio.run(serving.run_benchmark(
        reqs, _args(base_url="http://x"), transport=_mock({"/generate": events}, seen)))
    assert [r.output_tokens for r in records] == [3, 3]
    assert all(r.ok and len(r.chunk_times) == 2 and r.ttft <= r.e2e for r in records)
    assert seen[0]["input_ids"] == [1, 2, 3] and seen[0]["stream"] is True
    assert seen[0]["sampling_params"] == {"max_new_tokens": 3, "temperature": 0.0,
                                          "ignore_eos": True}


def test_openai_stream_takes_tokens_from_usage_and_reports_errors():
    events = [{"choices": [{"text": "t1"}]}, {"choices": [{"text": ""}]},
              {"choices": [{"text": "t2 t3"}]}, {"choices": [], "usage": {"completion_tokens": 3}}]
    seen: list[dict] = []
    records, _ = asyncio.run(serving.run_benchmark(
        [BenchRequest([1, 2], 3)], _args(base_url="http://x", backend="openai"),
        transport=_mock({"/v1/completions": events}, seen)))
    assert records[0].output_tokens == 3 and len(records[0].chunk_times) == 2
    assert seen[0]["model"] == "tiny" and seen[0]["prompt"] == [1, 2]
    failing = [{"error": {"message": "boom"}}]
    records, _ = asyncio.run(serving.run_benchmark(
        [BenchRequest([1], 2)], _args(base_url="http://x"),
        transport=_mock({"/generate": failing}, [])))
    assert records[0].error == "boom" and not records[0].ok


def test_summarize_by_hand():
    records = [RequestRecord(10, 3, 0.1, [0.1, 0.3, 0.4], 0.5),
               RequestRecord(20, 2, 0.2, [0.2, 0.6], 0.7),
               RequestRecord(5, error="HTTPStatusError: 500")]
    s = summarize(records, wall_s=2.0)
    assert (s["completed"], s["failed"], s["output_tokens"]) == (2, 1, 5)
    assert s["request_per_s"] == 1.0 and s["output_tok_s"] == 2.5 and s["input_tok_s"] == 15
    assert s["ttft_p50_ms"] == pytest.approx(150)
    assert s["itl_p50_ms"] == pytest.approx(200)  # gaps 0.2, 0.1, 0.4
    assert s["e2e_p50_s"] == pytest.approx(0.6)
    assert s["tpot_p50_ms"] == pytest.approx((0.2 + 0.5) / 2 * 1e3)
    assert s["errors"] == ["HTTPStatusError: 500"]


@pytest.mark.slow
def test_serving_against_the_real_server(bench_model_dir, tmp_path):
    url, server = _start_server(bench_model_dir, tmp_path)
    try:
        for backend in ("native", "openai"):
            out = tmp_path / f"{backend}.json"
            status = serving.main(["--base-url", url, "--backend", backend,
                                   "--num-requests", "6", "--input-len", "16",
                                   "--output-len", "4", "--request-rate", "50",
                                   "--max-concurrency", "4", "--out", str(out)])
            summary = json.loads(out.read_text())["summary"]
            assert status == 0 and summary["completed"] == 6
            assert summary["output_tokens"] == 24
            assert summary["ttft_p50_ms"] <= summary["e2e_p50_s"] * 1e3
    finally:
        server.terminate()
        server.wait(60)


def _start_server(model_dir: Path, tmp_path: Path) -> tuple[str, subprocess.Popen]:
    """``radixlm serve`` on a free port, once /health answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = open(tmp_path / "server.log", "w")  # kept open while the server runs
    proc = subprocess.Popen(
        [sys.executable, "-m", "radixlm", "serve", "--model", str(model_dir), "--port",
         str(port), "--max-running-requests", "8"], stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "RADIXLM_CACHE": str(tmp_path)}, cwd=Path(__file__).parents[2])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return url, proc
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError((tmp_path / "server.log").read_text())
