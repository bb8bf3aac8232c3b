"""Server hardening (issue 14), each against the real server on 127.0.0.1 (demo model).

Exact request ids, request-size limits and a responsive event loop, strict types, the header
deadline, logprobs without null, overload answers, deadlines, CORS, docs, hidden paths.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow

MiB = 1024 * 1024
MAX_BYTES = 12 * MiB
MAX_SEQUENCES = 16
MAX_RUNNING = 4
MAX_QUEUED = 4
HEADER_TIMEOUT_S = 1.0
REQUEST_TIMEOUT_S = 4.0
ORIGIN = "http://app.example"


@pytest.fixture(scope="module")
def server(launch_server, demo_model_dir):
    return launch_server(
        [
            "--model",
            str(demo_model_dir),
            "--kv-cache-tokens",
            "8192",
            "--max-running-requests",
            str(MAX_RUNNING),
            "--max-queued-requests",
            str(MAX_QUEUED),
            "--max-request-bytes",
            str(MAX_BYTES),
            "--max-sequences-per-request",
            str(MAX_SEQUENCES),
            "--header-timeout",
            str(HEADER_TIMEOUT_S),
            "--request-timeout",
            str(REQUEST_TIMEOUT_S),
            "--allowed-origins",
            ORIGIN,
            "--disable-docs",
        ]
    )


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def _error(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"}, body
    return body["error"]


# ---- 1. exact request ids ---------------------------------------------------------------------


class Stream:
    """A native streaming request in a thread; records chunk arrival times and the last chunk."""

    def __init__(self, url: str, body: dict):
        self.chunks: list[tuple[float, dict]] = []
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(url, body), daemon=True)
        self.thread.start()

    def _run(self, url: str, body: dict) -> None:
        with httpx.stream(
            "POST", url + "/generate", json={**body, "stream": True}, timeout=120
        ) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    self.chunks.append((time.monotonic(), json.loads(line[6:])))
                    self.started.set()

    def finishes(self) -> dict:
        """Per job (the ``index`` tag, or 0), the finish reason type."""
        out = {}
        for _, chunk in self.chunks:
            reason = chunk["meta_info"]["finish_reason"]
            if reason is not None:
                out[chunk.get("index", 0)] = reason["type"]
        return out

    def join(self) -> None:
        self.thread.join(60)
        assert not self.thread.is_alive(), "the stream hung"


LONG = {"max_new_tokens": 3000, "ignore_eos": True, "temperature": 0}


def test_abort_matches_request_ids_exactly(server, http):
    job7 = Stream(server.url, {"text": "one", "rid": "job-7", "sampling_params": LONG})
    job = Stream(server.url, {"text": "two", "rid": "job", "sampling_params": LONG})
    assert job7.started.wait(60) and job.started.wait(60)
    # neither a prefix nor a name some job starts with aborts anything
    for rid in ("jo", "job-", "job-7-0"):
        r = http.post("/abort", json={"rid": rid}).json()
        assert r == {"success": False, "rids": []}, rid
    assert http.post("/abort", json={"rid": "job"}).json() == {"success": True, "rids": ["job"]}
    job.join()
    assert job.finishes() == {0: "abort"}
    aborted_at = time.monotonic()
    time.sleep(0.5)
    assert not job7.finishes(), "aborting 'job' finished 'job-7'"
    assert any(t > aborted_at for t, _ in job7.chunks), "'job-7' stopped generating"
    assert http.post("/abort", json={"rid": "job-7"}).json()["rids"] == ["job-7"]
    job7.join()
    assert job7.finishes() == {0: "abort"}


def test_abort_of_a_request_aborts_its_own_samples(server, http):
    both = Stream(server.url, {"text": "three", "rid": "grp", "sampling_params": {**LONG, "n": 2}})
    other = Stream(server.url, {"text": "four", "rid": "grp-x", "sampling_params": LONG})
    assert both.started.wait(60) and other.started.wait(60)
    assert sorted(http.post("/abort", json={"rid": "grp"}).json()["rids"]) == ["grp-0", "grp-1"]
    both.join()
    assert both.finishes() == {0: "abort", 1: "abort"}
    assert not other.finishes()
    http.post("/abort", json={"rid": "grp-x"})
    other.join()


def test_a_disconnect_aborts_only_its_own_request(server, http):
    keep = Stream(server.url, {"text": "five", "rid": "conn-1", "sampling_params": LONG})
    assert keep.started.wait(60)
    with httpx.stream(
        "POST",
        server.url + "/generate",
        timeout=60,
        json={"text": "six", "rid": "conn", "stream": True, "sampling_params": LONG},
    ) as r:
        next(r.iter_lines())  # started; leaving the block drops the connection
    left_at = time.monotonic()
    time.sleep(1.0)
    assert not keep.finishes() and any(t > left_at for t, _ in keep.chunks)
    http.post("/abort", json={"rid": "conn-1"})
    keep.join()


# ---- 4. large requests ------------------------------------------------------------------------


def _raw_request(port: int, head: bytes, body_chunks=(), timeout: float = 30) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head)
        for chunk in body_chunks:
            sock.sendall(chunk)
        data = b""
        while b"\r\n\r\n" not in data:
            part = sock.recv(65536)
            if not part:
                break
            data += part
        return data


def test_content_length_over_the_limit_is_413_before_the_body(server):
    head = (
        f"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {MAX_BYTES + 1}\r\n\r\n"
    ).encode()
    start = time.monotonic()
    reply = _raw_request(server.port, head)  # no body sent at all
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert time.monotonic() - start < 5


def test_a_chunked_body_over_the_limit_is_413(server):
    head = (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    piece = b"x" * MiB
    chunks = [b"%x\r\n%s\r\n" % (len(piece), piece)] * 12 + [b"1\r\nx\r\n"]
    reply = _raw_request(server.port, head, chunks)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]


# Polls /health every 20 ms until its stdin closes, then prints the latencies (JSON). A process
# of its own: the test's own client threads must not delay the probe's measurements.
_PROBE = """
import json, sys, threading, time
import httpx
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
latencies, failures = [], []
with httpx.Client(timeout=30) as client:
    while not stop.is_set():
        start = time.monotonic()
        try:
            status = client.get(sys.argv[1] + "/health").status_code
            if status != 200:
                failures.append(str(status))
        except httpx.HTTPError as exc:
            failures.append(repr(exc))
        latencies.append(time.monotonic() - start)
        time.sleep(0.02)
print(json.dumps({"latencies": latencies, "failures": failures}))
"""


class HealthProbe:
    """Polls /health from a separate process until stopped; keeps every latency."""

    def __init__(self, url: str):
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _PROBE, url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def stop(self) -> float:
        """Stop polling; returns the 99th-percentile latency."""
        out, _ = self._proc.communicate("", timeout=60)
        result = json.loads(out)
        self.latencies, self.failures = result["latencies"], result["failures"]
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]


def test_health_stays_responsive_while_8mb_requests_are_processed(server, http):
    text = ("lorem ipsum dolor sit amet " * 400_000)[: 8 * MiB]
    ids = [i % 2000 for i in range(1_700_000)]  # ~8 MB of JSON
    bodies = [
        ("/generate", {"text": text}),
        ("/v1/completions", {"prompt": ids, "max_tokens": 4}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": text}]}),
    ]
    probe = HealthProbe(server.url)
    time.sleep(0.3)
    try:
        for route, body in bodies:
            raw = json.dumps(body).encode()
            assert len(raw) >= 8 * MiB - 1024
            r = http.post(route, content=raw, headers={"Content-Type": "application/json"})
            err = _error(r)
            assert r.status_code == 400 and "context length" in err["message"], err
    finally:
        p99 = probe.stop()
    assert not probe.failures
    assert len(probe.latencies) >= 5
    print(
        f"/health during 8 MB requests: {len(probe.latencies)} probes, "
        f"p99 {p99 * 1000:.1f} ms, max {max(probe.latencies) * 1000:.1f} ms"
    )
    assert p99 < 0.2, f"/health p99 {p99 * 1000:.0f} ms while 8 MB requests were processed"


def test_prompts_times_n_is_capped(http):
    r = http.post(
        "/v1/completions", json={"prompt": ["a", "b", "c", "d", "e"], "n": 4, "max_tokens": 1}
    )
    assert r.status_code == 400 and _error(r)["param"] == "n"
    assert "--max-sequences-per-request" in _error(r)["message"]
    r = http.post("/generate", json={"text": ["a"] * (MAX_SEQUENCES + 1)})
    assert r.status_code == 400 and _error(r)["param"] == "text"
    r = http.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "n": MAX_SEQUENCES + 1},
    )
    assert r.status_code == 400


# ---- 7. strict types --------------------------------------------------------------------------

USER = [{"role": "user", "content": "hi"}]
NAN_SCHEMA = '{"type": "number", "maximum": NaN}'


@pytest.mark.parametrize(
    "route, body, param",
    [
        ("/v1/completions", {"prompt": "hi", "stream": "yes"}, "stream"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": "4"}, "max_tokens"),
        ("/v1/completions", {"prompt": "hi", "logprobs": True}, "logprobs"),
        ("/v1/chat/completions", {"messages": USER, "logprobs": 1}, "logprobs"),
        ("/v1/chat/completions", {"messages": USER, "json_schema": NAN_SCHEMA}, "json_schema"),
        ("/tokenize", {"prompt": "hi", "add_special_tokens": "no"}, "add_special_tokens"),
        ("/abort", {"abort_all": "yes"}, "abort_all"),
        ("/generate", {"input_ids": [True]}, "input_ids"),
        ("/generate", {"text": "hi", "stream": 0}, "stream"),
        (
            "/generate",
            {"text": "hi", "sampling_params": {"json_schema": NAN_SCHEMA}},
            "json_schema",
        ),
        ("/generate", {"text": "hi", "sampling_params": {"max_new_tokens": "4"}}, "max_new_tokens"),
    ],
)
def test_lax_types_are_400_naming_the_field(http, route, body, param):
    r = http.post(route, json=body)
    assert r.status_code == 400, r.text
    err = _error(r)
    assert err["param"] and param in err["param"], err
    assert param in err["message"]


# ---- 8. header deadline -----------------------------------------------------------------------


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_connections_with_half_their_headers_are_closed(server):
    socks = []
    for _ in range(20):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        socks.append(sock)
    start = time.monotonic()
    try:
        assert all(_closed_within(s, HEADER_TIMEOUT_S + 5) for s in socks)
        assert time.monotonic() - start < HEADER_TIMEOUT_S + 5
    finally:
        for s in socks:
            s.close()


def test_a_kept_alive_connection_gets_the_same_deadline(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /health HTTP/1.1\r\nHo")  # the next request stalls mid-header
        assert _closed_within(sock, HEADER_TIMEOUT_S + 5)


def test_slow_but_complete_headers_are_served(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        for piece in (b"GET /health HTTP/1.1\r\n", b"Host: x\r\n", b"\r\n"):
            sock.sendall(piece)
            time.sleep(HEADER_TIMEOUT_S / 4)
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")


# ---- 10. logprobs under a grammar -------------------------------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 6}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def _finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def test_constrained_logprobs_have_no_null_and_no_masked_alternatives(http):
    native = http.post(
        "/generate",
        json={
            "text": "Person:",
            "sampling_params": {
                "json_schema": json.dumps(SCHEMA),
                "max_new_tokens": 40,
                "temperature": 0,
            },
        },
    ).json()
    assert native["meta_info"]["jump_forward_tokens"] > 0  # the grammar forced some tokens
    chat = http.post(
        "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "A person"}],
            "max_tokens": 40,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": 5,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "p", "schema": SCHEMA},
            },
        },
    )
    assert chat.status_code == 200
    assert "null" not in json.dumps(chat.json()["choices"][0]["logprobs"]["content"])
    content = chat.json()["choices"][0]["logprobs"]["content"]
    assert content and all(_finite_number(e["logprob"]) for e in content)
    for entry in content:
        assert all(_finite_number(t["logprob"]) for t in entry["top_logprobs"])
    comp = http.post(
        "/v1/completions",
        json={
            "prompt": "Person:",
            "max_tokens": 40,
            "temperature": 0,
            "logprobs": 5,
            "json_schema": json.dumps(SCHEMA),
        },
    ).json()
    lp = comp["choices"][0]["logprobs"]
    assert lp["tokens"] and all(_finite_number(x) for x in lp["token_logprobs"])
    assert len(lp["tokens"]) == len(lp["top_logprobs"]) == len(lp["text_offset"])
    assert all(_finite_number(v) for top in lp["top_logprobs"] for v in top.values())
    # the omitted tokens still advance the offsets of the tokens after them
    assert lp["text_offset"] == sorted(lp["text_offset"])
    assert lp["text_offset"][-1] > lp["text_offset"][0] + len(lp["tokens"]) - 1


# ---- 11. overload, deadlines, CORS, docs, paths -----------------------------------------------


def test_a_full_queue_is_429_with_retry_after(http):
    r = http.post(
        "/generate",
        json={
            "text": ["q"] * (MAX_RUNNING + MAX_QUEUED + 1),
            "sampling_params": {"max_new_tokens": 1},
        },
    )
    assert r.status_code == 429
    assert int(r.headers["Retry-After"]) >= 1
    assert _error(r)["code"] == "queue_full"
    assert http.get("/health").status_code == 200


def test_request_timeout_aborts_a_long_request(http):
    start = time.monotonic()
    r = http.post("/v1/completions", json={"prompt": "go", "max_tokens": 4000, "ignore_eos": True})
    elapsed = time.monotonic() - start
    assert r.status_code == 200
    assert r.json()["choices"][0]["finish_reason"] == "abort"
    assert REQUEST_TIMEOUT_S - 0.5 < elapsed < REQUEST_TIMEOUT_S + 10


def test_cors_allows_only_the_configured_origin(http):
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    ok = http.options("/v1/completions", headers={"Origin": ORIGIN, **preflight})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ORIGIN
    bad = http.options("/v1/completions", headers={"Origin": "http://evil.example", **preflight})
    assert "access-control-allow-origin" not in bad.headers
    simple = http.get("/health", headers={"Origin": ORIGIN})
    assert simple.headers["access-control-allow-origin"] == ORIGIN


def test_docs_can_be_disabled(http):
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert http.get(path).status_code == 404


def _absolute_paths(value: object) -> list[str]:
    if isinstance(value, str):
        return [value] if value.startswith("/") else []
    if isinstance(value, dict):
        return [p for v in value.values() for p in _absolute_paths(v)]
    if isinstance(value, list):
        return [p for v in value for p in _absolute_paths(v)]
    return []


def test_no_absolute_paths_without_an_api_key(http, demo_model_dir):
    info = http.get("/server_info").json()
    assert info["model_path"] == demo_model_dir.name
    assert _absolute_paths(info) == []
    assert _absolute_paths(http.get("/v1/models").json()) == []


# ---- the soak: mixed, malformed and disconnecting requests -------------------------------------

SOAK_REQUESTS = 300
SOAK_CONCURRENCY = 8
SOAK_TIMEOUT_S = 60


def _soak_request(i: int) -> tuple[str, str, object, dict]:
    """The i-th soak request: (kind, route, body or raw bytes, options)."""
    small = {"max_new_tokens": 3, "temperature": 0.5, "seed": i}
    user = [{"role": "user", "content": f"hello {i}"}]
    kinds = [
        ("ok", "/generate", {"text": f"soak {i}", "sampling_params": small}, {}),
        (
            "ok",
            "/generate",
            {"input_ids": [1, 2, i % 500 + 3], "stream": True, "sampling_params": small},
            {},
        ),
        ("ok", "/v1/completions", {"prompt": f"soak {i}", "max_tokens": 3, "n": 2}, {}),
        (
            "ok",
            "/v1/chat/completions",
            {
                "messages": user,
                "max_tokens": 3,
                "stream": True,
                "logprobs": True,
                "top_logprobs": 2,
            },
            {},
        ),
        ("bad", "/v1/completions", b'{"prompt": "x", "max_tokens": ', {}),
        ("bad", "/v1/chat/completions", {"messages": user, "stream": "yes"}, {}),
        ("bad", "/generate", {"text": "x", "sampling_params": {"temperature": "hot"}}, {}),
        ("bad", "/generate", b"[" * 5000, {}),
        ("bad", "/v1/completions", {"prompt": [[True]]}, {}),
        ("bad", "/nope", {}, {}),
        (
            "drop",
            "/generate",
            {
                "text": f"drop {i}",
                "stream": True,
                "sampling_params": {"max_new_tokens": 500, "ignore_eos": True},
            },
            {},
        ),
        (
            "drop",
            "/v1/completions",
            {"prompt": f"drop {i}", "max_tokens": 500, "ignore_eos": True},
            {"timeout": 0.2},
        ),
        ("ok", "/abort", {"rid": f"nobody-{i}"}, {}),
        ("ok", "/tokenize", {"prompt": f"soak {i}"}, {}),
    ]
    return kinds[i % len(kinds)]


async def _soak_one(client, i: int, statuses: list, hangs: list) -> None:
    kind, route, body, options = _soak_request(i)
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    try:
        if kind == "drop" and "timeout" not in options:
            async with client.stream("POST", route, content=content, headers=headers) as r:
                statuses.append((kind, r.status_code))
                async for _ in r.aiter_lines():
                    break  # the client goes away mid-stream
            return
        timeout = options.get("timeout", SOAK_TIMEOUT_S)
        if route.startswith("/v1/chat") or b'"stream": true' in content:
            async with client.stream(
                "POST", route, content=content, headers=headers, timeout=timeout
            ) as r:
                statuses.append((kind, r.status_code))
                async for _ in r.aiter_lines():
                    pass
        else:
            r = await client.post(route, content=content, headers=headers, timeout=timeout)
            statuses.append((kind, r.status_code))
    except httpx.TimeoutException:
        if kind != "drop":  # a deliberate short timeout is a disconnect, anything else a hang
            hangs.append((i, route))


def test_soak_mixed_malformed_and_disconnecting_requests(server, http):
    import asyncio

    statuses: list[tuple[str, int]] = []
    hangs: list = []

    async def run() -> None:
        limits = httpx.Limits(max_connections=SOAK_CONCURRENCY * 2)
        async with httpx.AsyncClient(
            base_url=server.url, timeout=SOAK_TIMEOUT_S, limits=limits
        ) as client:
            gate = asyncio.Semaphore(SOAK_CONCURRENCY)

            async def gated(i: int) -> None:
                async with gate:
                    await _soak_one(client, i, statuses, hangs)

            await asyncio.wait_for(
                asyncio.gather(*(gated(i) for i in range(SOAK_REQUESTS))), SOAK_TIMEOUT_S
            )

    start = time.monotonic()
    probe = HealthProbe(server.url)
    big = threading.Thread(
        target=lambda: statuses.append(
            ("big", http.post("/generate", json={"text": "z" * (8 * MiB)}).status_code)
        ),
        daemon=True,
    )
    big.start()
    try:
        asyncio.run(run())
        big.join(SOAK_TIMEOUT_S)
    finally:
        p99 = probe.stop()
    counts: dict = {}
    for kind, status in statuses:
        counts.setdefault(kind, {}).setdefault(status, 0)
        counts[kind][status] += 1
    print(f"soak: {counts}; /health {len(probe.latencies)} probes, p99 {p99 * 1000:.1f} ms")
    assert time.monotonic() - start < SOAK_TIMEOUT_S
    assert not hangs, hangs
    assert len(statuses) >= SOAK_REQUESTS - SOAK_REQUESTS // 14  # short-timeout drops aside
    assert not [s for _, s in statuses if s >= 500], counts
    # valid requests are served or, past the queue limit (8 engine requests here), told to
    # come back: 429 with Retry-After; bad ones are refused before they queue
    assert set(counts["ok"]) <= {200, 429} and counts["ok"].get(200, 0) >= SOAK_REQUESTS // 5
    assert all(400 <= status < 500 and status != 429 for status in counts["bad"])
    assert counts["big"] == {400: 1}
    assert not probe.failures and p99 < 0.2, f"/health p99 {p99 * 1000:.0f} ms"


def test_free_kv_is_back_to_capacity(http):
    deadline = time.monotonic() + 30
    while http.get("/server_info").json()["running_requests"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert http.post("/flush_cache").status_code == 200
    info = http.get("/server_info").json()
    assert info["kv_free_tokens"] == info["kv_capacity_tokens"]


# ---- TLS, then 9. a dead core (one server, killed at the end) ---------------------------------


def _self_signed(directory) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1, made by the openssl command."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    key, cert = directory / "key.pem", directory / "cert.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return str(key), str(cert)


@pytest.fixture(scope="module")
def tls_server(launch_server, demo_model_dir, tmp_path_factory):
    key, cert = _self_signed(tmp_path_factory.mktemp("tls"))
    server = launch_server(
        [
            "--model",
            str(demo_model_dir),
            "--kv-cache-tokens",
            "4096",
            "--ssl-keyfile",
            key,
            "--ssl-certfile",
            cert,
        ],
        scheme="https",
    )
    server.cert = cert
    return server


def test_tls_serves_https_only(tls_server):
    with httpx.Client(base_url=tls_server.url, verify=tls_server.cert, timeout=60) as client:
        assert client.get("/health").status_code == 200
        out = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert out.status_code == 200 and out.json()["usage"]["completion_tokens"] >= 1
    with pytest.raises(httpx.HTTPError):
        httpx.get(tls_server.url.replace("https:", "http:") + "/health", timeout=10)


def _children(pid: int) -> list[int]:
    out = []
    for task in (Path(f"/proc/{pid}/task")).iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _state(pid: int) -> str | None:
    """The process's state letter (``Z`` for a zombie), None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return None


def test_a_dead_core_is_reaped_and_the_server_exits_non_zero(tls_server):
    server = tls_server
    client = httpx.Client(base_url=server.url, verify=server.cert, timeout=60)
    # the engine core: a multiprocessing child (not the resource tracker)
    cores = [
        pid
        for pid in _children(server.proc.pid)
        if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
        and b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    assert len(cores) == 1, cores
    result: dict = {}

    def in_flight() -> None:
        r = client.post(
            "/v1/completions", json={"prompt": "x", "max_tokens": 3000, "ignore_eos": True}
        )
        result["status"] = r.status_code
        result["body"] = r.json()

    thread = threading.Thread(target=in_flight, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while client.get("/server_info").json()["running_requests"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    for pid in cores:
        os.kill(pid, signal.SIGKILL)
    # the in-flight request is answered (not left hanging) ...
    thread.join(30)
    assert result["status"] == 503 and result["body"]["error"]["code"] == "engine_dead"
    # ... the dead children are reaped while the server still runs (no <defunct>) ...
    seen_reaped_while_alive = False
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        alive = server.proc.poll() is None
        if all(_state(pid) in (None,) for pid in cores):
            seen_reaped_while_alive = alive
            break
        time.sleep(0.02)
    assert seen_reaped_while_alive, [_state(pid) for pid in cores]
    # ... and the server exits non-zero, so that a supervisor notices
    assert server.proc.wait(60) != 0
    assert "engine core died" in server.output
    client.close()
