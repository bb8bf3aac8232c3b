"""Overlap scheduling through the engine core with a tiny random Llama: same outputs as serial."""

from __future__ import annotations

import random
import sys

import pytest
import torch

from radixlm.config import EngineConfig
from radixlm.engine import ipc
from radixlm.engine.core import EngineCore
from radixlm.request import LogprobOptions
from radixlm.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="CPU torch path tested on Linux")

NO_LOGPROBS = LogprobOptions()


def make_core(model_dir, overlap: bool, **kwargs) -> EngineCore:
    config = EngineConfig.from_kwargs(model=str(model_dir), enable_overlap=overlap, **kwargs)
    return EngineCore(config, progress=False)


@pytest.fixture(scope="module")
def serial(tiny_llama3_dir):
    return make_core(tiny_llama3_dir, overlap=False, kv_cache_tokens=16384)


@pytest.fixture(scope="module")
def overlapped(tiny_llama3_dir):
    core = make_core(tiny_llama3_dir, overlap=True, kv_cache_tokens=16384)
    launches_with_futures = []
    launch = core.runner.launch

    def counting_launch(batch, futures=None):
        launches_with_futures.append(batch.has_future_tokens)
        return launch(batch, futures)

    core.runner.launch = counting_launch
    core.launches_with_futures = launches_with_futures
    return core


Work = list[tuple[str, list[int], dict, LogprobOptions]]


def submit(core: EngineCore, work: Work) -> dict[str, dict]:
    results = {}
    for rid, ids, params, logprob in work:
        core.add_request(ipc.AddRequest(rid, ids, SamplingParams(**params), logprob))
        results[rid] = {"ids": [], "finish": None, "logprobs": [], "top": [], "input": None}
    return results


def collect(results: dict[str, dict], outputs) -> None:
    for out in outputs:
        r = results[out.rid]
        r["ids"].extend(out.new_token_ids)
        r["logprobs"].extend(v for v, _ in out.output_logprobs)
        r["top"].extend(out.output_top_logprobs)
        if out.input_logprobs is not None:
            r["input"] = out.input_logprobs
        if out.finish is not None:
            r["finish"] = (out.finish.kind.value, out.finish.matched)


def run(core: EngineCore, work: Work) -> dict[str, dict]:
    results = submit(core, work)
    while core.has_work():
        collect(results, core.step())
        core.check_invariants()
    assert_all_free(core)
    return results


def assert_all_free(core: EngineCore) -> None:
    assert core.flush_cache()
    core.check_invariants()
    info = core.server_info()
    assert info["kv_free_tokens"] == info["kv_capacity_tokens"]


def assert_same(got: dict[str, dict], want: dict[str, dict]) -> None:
    assert got.keys() == want.keys()
    for rid in want:
        assert got[rid]["ids"] == want[rid]["ids"], rid
        assert got[rid]["finish"] == want[rid]["finish"], rid
        torch.testing.assert_close(torch.tensor(got[rid]["logprobs"], dtype=torch.float64),
                                   torch.tensor(want[rid]["logprobs"], dtype=torch.float64),
                                   rtol=1e-4, atol=1e-4)
        assert [[t for _, t in top] for top in got[rid]["top"]] == \
            [[t for _, t in top] for top in want[rid]["top"]], rid
        assert (got[rid]["input"] is None) == (want[rid]["input"] is None), rid


def mixed_work(serial: EngineCore) -> Work:
    """Greedy and seeded requests of many lengths, shared prefixes with n>1-style siblings,
    stop tokens and stop strings taken from real outputs so they fire mid-generation,
    max_new_tokens 1 and 2, logprobs, and penalised / min_new_tokens rows (which drain)."""
    rng = random.Random(4)
    shared = [rng.randrange(128000) for _ in range(48)]
    prompts = [shared[: rng.randint(0, 48)] + [rng.randrange(128000)
                                               for _ in range(rng.randint(1, 20))]
               for _ in range(12)]
    greedy = {"temperature": 0.0, "ignore_eos": True}
    probe = run(serial, [(f"p{i}", p, dict(greedy, max_new_tokens=12), NO_LOGPROBS)
                         for i, p in enumerate(prompts)])
    tokens = [probe[f"p{i}"]["ids"] for i in range(len(prompts))]
    text = serial.tokenizer.decode(tokens[1][:6])
    with_top = LogprobOptions(return_logprob=True, top_logprobs_num=2)
    work: Work = [
        ("g0", prompts[0], dict(greedy, max_new_tokens=12), NO_LOGPROBS),
        ("g1", prompts[0], dict(greedy, max_new_tokens=7), with_top),
        ("one", prompts[2], dict(greedy, max_new_tokens=1), NO_LOGPROBS),
        ("two", prompts[3], dict(greedy, max_new_tokens=2), with_top),
        ("stop_token", prompts[4], dict(greedy, max_new_tokens=12,
                                        stop_token_ids=[tokens[4][4]]), NO_LOGPROBS),
        ("stop_string", prompts[1], dict(greedy, max_new_tokens=12, stop=[text[-3:]]),
         NO_LOGPROBS),
        ("penalised", prompts[5], dict(greedy, max_new_tokens=9, frequency_penalty=0.7),
         NO_LOGPROBS),
        ("min_new", prompts[6], dict(max_new_tokens=9, temperature=0.0, min_new_tokens=5,
                                     stop_token_ids=[tokens[6][1]]), NO_LOGPROBS),
        ("input_lp", prompts[7], dict(greedy, max_new_tokens=5),
         LogprobOptions(return_logprob=True, logprob_start_len=0)),
    ]
    for i in range(4):  # siblings of one prompt, as n=4 fans out
        work.append((f"n{i}", prompts[8], {"max_new_tokens": 10, "temperature": 0.9,
                                           "top_p": 0.95, "seed": 100 + i}, with_top))
    for i in range(9, 12):
        work.append((f"s{i}", prompts[i], {"max_new_tokens": rng.randint(3, 14),
                                           "temperature": 1.0, "top_k": 50, "seed": i},
                     NO_LOGPROBS))
    return work


def test_overlap_gives_the_same_outputs_as_serial(serial, overlapped):
    work = mixed_work(serial)
    want = run(serial, work)
    got = run(overlapped, work)
    assert_same(got, want)
    assert want["stop_token"]["finish"][0] == "stop" and len(want["stop_token"]["ids"]) <= 5
    assert want["stop_string"]["finish"][0] == "stop"
    assert len(want["one"]["ids"]) == 1 and len(want["two"]["ids"]) == 2
    assert sum(overlapped.launches_with_futures) > 0, "decode steps overlapped"


def test_only_serial_core_never_launches_placeholders(tiny_llama3_dir):
    core = make_core(tiny_llama3_dir, overlap=False, kv_cache_tokens=2048)
    seen = []
    launch = core.runner.launch
    core.runner.launch = lambda batch, futures=None: (seen.append(batch.has_future_tokens),
                                                      launch(batch, futures))[1]
    run(core, [("a", [1, 2, 3], {"max_new_tokens": 6, "temperature": 0.0}, NO_LOGPROBS)])
    assert seen and not any(seen)


def test_small_pool_retraction_gives_the_same_outputs(tiny_llama3_dir, serial):
    rng = random.Random(3)
    work = [(f"s{i}", [rng.randrange(128000) for _ in range(30)],
             {"max_new_tokens": 40, "temperature": 0.0, "ignore_eos": True}, NO_LOGPROBS)
            for i in range(8)]
    small = make_core(tiny_llama3_dir, overlap=True, kv_cache_tokens=400)
    got = run(small, work)
    assert small.server_info()["num_retractions"] > 0
    assert_same(got, run(serial, work))


def test_chunked_prefill_with_input_logprobs_gives_the_same_outputs(tiny_llama3_dir, serial):
    ids = [random.Random(5).randrange(128000) for _ in range(90)]
    lp = LogprobOptions(return_logprob=True, logprob_start_len=3)
    work = [("c", ids, {"max_new_tokens": 8, "temperature": 0.0, "ignore_eos": True}, lp),
            ("d", ids[:40], {"max_new_tokens": 12, "temperature": 0.0, "ignore_eos": True},
             NO_LOGPROBS)]
    chunked = make_core(tiny_llama3_dir, overlap=True, kv_cache_tokens=4096,
                        chunked_prefill_size=16)
    got = run(chunked, work)
    want = run(serial, work)
    assert_same(got, want)
    torch.testing.assert_close(torch.tensor([v for v, _ in got["c"]["input"]]),
                               torch.tensor([v for v, _ in want["c"]["input"]]),
                               rtol=1e-4, atol=1e-4)


def test_abort_with_its_step_in_flight(serial, overlapped):
    rng = random.Random(8)
    work = [(f"a{i}", [rng.randrange(128000) for _ in range(12)],
             {"max_new_tokens": 24, "temperature": 0.0, "ignore_eos": True}, NO_LOGPROBS)
            for i in range(4)]
    want = run(serial, work)
    results = submit(overlapped, work)
    while not results["a1"]["ids"] or overlapped.loop.in_flight is None:
        collect(results, overlapped.step())
    info = overlapped.server_info()  # with a step in flight
    assert info["running_requests"] == 4
    collect(results, [overlapped.abort("a1")])
    overlapped.check_invariants()
    while overlapped.has_work():
        collect(results, overlapped.step())
        overlapped.check_invariants()
    assert results["a1"]["finish"] == ("abort", None)
    got_a1 = results["a1"]["ids"]
    assert 0 < len(got_a1) < 24 and got_a1 == want["a1"]["ids"][: len(got_a1)]
    for rid in ("a0", "a2", "a3"):
        assert results[rid]["ids"] == want[rid]["ids"], rid
    assert_all_free(overlapped)


def test_flush_right_after_the_last_finish_drains_the_step_in_flight(serial, overlapped):
    ids = [random.Random(12).randrange(128000) for _ in range(10)]
    greedy = {"max_new_tokens": 12, "temperature": 0.0, "ignore_eos": True}
    plain = run(serial, [("x", ids, greedy, NO_LOGPROBS)])["x"]["ids"]
    stop = plain[5]
    results = submit(overlapped, [("x", ids, dict(greedy, stop_token_ids=[stop]),
                                   NO_LOGPROBS)])
    while results["x"]["finish"] is None:
        collect(results, overlapped.step())
    assert results["x"]["ids"] == plain[: plain.index(stop) + 1]
    assert overlapped.loop.in_flight is not None, "the row after the stop was launched"
    assert overlapped.has_work()
    assert_all_free(overlapped)
    assert overlapped.step() == [] and not overlapped.has_work()
