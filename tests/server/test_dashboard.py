"""The dashboard on a real server: its JSON state against /server_info and /metrics, the event
stream, the API key, and the page itself in headless Chromium while shared-prefix requests run."""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest

KEY = "dash-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SHARED = ("You are a careful assistant for a small bookshop. Answer in one short sentence, "
          "name the shelf, and never invent titles. ")
QUESTIONS = ["Where are the cookbooks?", "Do you sell maps?", "Where is poetry?",
             "Is there a children's corner?", "Where are the travel guides?",
             "Do you have comics?"]
ARTIFACTS = Path(os.environ.get("RADIXLM_TEST_ARTIFACTS",
                                Path(__file__).resolve().parents[2] / "test-artifacts"))


@pytest.fixture(scope="module")
def server(launch_server):
    return launch_server(["--api-key", KEY])


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120, headers=AUTH) as client:
        yield client


def run_shared_prefix(http: httpx.Client, questions: list[str]) -> None:
    def one(question: str) -> None:
        body = {"text": SHARED + question,
                "sampling_params": {"max_new_tokens": 6, "temperature": 0}}
        assert http.post("/generate", json=body).status_code == 200

    one(questions[0])  # the first request leaves the shared prefix in the cache
    threads = [threading.Thread(target=one, args=(q,)) for q in questions[1:]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def wait_idle(http: httpx.Client) -> dict:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        info = http.get("/server_info").json()
        if info["running_requests"] == 0 and info["waiting_requests"] == 0:
            return info
        time.sleep(0.1)
    raise AssertionError("server did not become idle")


def fresh_state(http: httpx.Client, after: float) -> dict:
    """A dashboard state sampled after ``after`` (the sampler runs every half second)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        state = http.get("/dashboard/state").json()
        if state["time"] > after:
            return state
        time.sleep(0.2)
    raise AssertionError("no fresh dashboard state")


def metric(text: str, name: str) -> float:
    match = re.search(rf"^radixlm_{name}(?:_total)?{{[^}}]*}} ([0-9.e+-]+)$", text, re.M)
    assert match, f"metric {name} missing"
    return float(match.group(1))


def test_state_matches_server_info_and_metrics(http):
    run_shared_prefix(http, QUESTIONS[:4])
    info = wait_idle(http)
    state = fresh_state(http, time.time())
    shown = state["info"]
    for key in ("kv_capacity_tokens", "kv_free_tokens", "radix_cache_tokens",
                "num_prompt_tokens", "num_cached_tokens", "num_generated_tokens",
                "cache_hit_rate", "running_requests", "waiting_requests"):
        assert shown[key] == info[key], key
    assert state["tree"]["total_tokens"] == info["radix_cache_tokens"]
    metrics = http.get("/metrics").text
    assert metric(metrics, "kv_cache_capacity_tokens") == shown["kv_capacity_tokens"]
    assert metric(metrics, "radix_cache_tokens") == state["tree"]["total_tokens"]
    assert metric(metrics, "prompt_tokens") == shown["num_prompt_tokens"]
    assert metric(metrics, "cached_prompt_tokens") == shown["num_cached_tokens"]
    assert metric(metrics, "cache_hit_rate") == pytest.approx(shown["cache_hit_rate"])
    point = state["history"][-1]
    assert point["kv_free"] + point["kv_cached"] + point["kv_in_use"] == info["kv_capacity_tokens"]


def test_state_shows_the_shared_prefix_node_and_cached_requests(http):
    run_shared_prefix(http, QUESTIONS[2:])
    wait_idle(http)
    state = fresh_state(http, time.time())
    nodes = state["tree"]["nodes"]
    assert nodes, "the tree holds the requests' prompts"
    top = max(nodes, key=lambda n: n["subtree_tokens"])
    # the largest subtree starts with the shared instructions, and its edge holds them
    assert SHARED[:20] in top["text"] or top["text"] in SHARED
    assert top["tokens"] >= 20 and top["lock_ref"] == 0
    cached = [r for r in state["requests"] if r["cached_tokens"] > 0]
    assert cached, "later requests reuse the shared prefix"
    for r in cached:
        assert r["cached_tokens"] + r["computed_tokens"] == r["prompt_tokens"]
        assert r["node_id"] is not None
        # the cached text is the prompt's start: the shared instructions after any BOS token
        text = re.sub(r"^(<[^>]+>)+", "", r["cached_text"]).lstrip()
        assert text and (SHARED.startswith(text[:30]) or text in SHARED)
    kinds = {b["kind"] for b in state["batches"]}
    assert "decode" in kinds and kinds & {"extend", "mixed"}
    assert all(b["num_tokens"] >= b["num_seqs"] > 0 for b in state["batches"])


def test_compile_times_are_recorded(http):
    schema = {"type": "object", "properties": {"shelf": {"type": "string", "maxLength": 8}},
              "required": ["shelf"]}
    body = {"text": SHARED + QUESTIONS[0],
            "sampling_params": {"max_new_tokens": 24, "temperature": 0, "json_schema": schema}}
    assert http.post("/generate", json=body).status_code == 200
    state = fresh_state(http, time.time())
    recent = state["compile"]["recent"]
    assert recent and recent[0]["kind"] == "json_schema" and recent[0]["ok"]
    assert recent[0]["ms"] >= 0 and state["compile"]["pending"] == 0


def test_events_stream_several_states(server):
    seen = []
    with httpx.stream("GET", server.url + "/dashboard/events", headers=AUTH, timeout=10) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                seen.append(json.loads(line[6:])["time"])
                if len(seen) == 3:
                    break
    assert seen == sorted(seen) and len(set(seen)) == 3


def test_dashboard_needs_the_key_by_header_or_query(server):
    assert httpx.get(server.url + "/dashboard/state").status_code == 401
    assert httpx.get(server.url + "/dashboard").status_code == 401
    assert httpx.get(server.url + "/dashboard", params={"api_key": "wrong"}).status_code == 401
    page = httpx.get(server.url + "/dashboard", params={"api_key": KEY})
    assert page.status_code == 200 and "<svg id=\"tree\"" in page.text
    # the query key opens the dashboard only, not the API
    assert httpx.get(server.url + "/server_info", params={"api_key": KEY}).status_code == 401


def _chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason="needs Debian's chromium and chromium-driver "
                    "(.ci/run installs them: apt-get install chromium chromium-driver)")
def test_page_draws_the_tree_and_hit_rate_and_updates_in_chromium(server, http):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver_path = _chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--window-size=1400,1100"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(f"{server.url}/dashboard?api_key={KEY}")
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: d.find_element("id", "status").text == "live")

        def attr(element_id: str, name: str) -> int:
            return int(driver.find_element("id", element_id).get_attribute(f"data-{name}") or 0)

        run_shared_prefix(http, QUESTIONS)
        wait.until(lambda d: attr("tree", "nodes") > 0)
        wait.until(lambda d: attr("hit", "points") > 0)
        before = attr("tree", "updates")
        wait.until(lambda d: attr("tree", "updates") >= before + 2)  # still updating, live
        # the page redraws twice a second: read what it shows in one script, not element by
        # element (references go stale between redraws)
        shown = driver.execute_script("""return {
            labels: [...document.querySelectorAll('#tree text')].map(t => t.textContent),
            rows: [...document.querySelectorAll('#requests tr.req')].map(r => r.innerText),
            hit: document.getElementById('s-hit').textContent,
            model: document.getElementById('s-model').textContent};""")
        labels = " ".join(shown["labels"])
        assert "bookshop" in labels or "careful" in labels or "assistant" in labels
        assert shown["rows"] and any("bookshop" in row for row in shown["rows"])
        assert shown["hit"].endswith("%") and float(shown["hit"][:-1]) > 0
        assert shown["model"]
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "dashboard.png"))
        assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
    finally:
        driver.quit()
