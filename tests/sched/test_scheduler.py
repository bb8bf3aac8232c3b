"""The scheduler on CPU with a fake KV budget and a null model (vLLM-style scheduler tests)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from radixlm.config import SchedulerConfig
from radixlm.engine.overlap import StepLoop
from radixlm.executor.null_runner import NullRunner
from radixlm.kvcache.allocator import PageAllocator
from radixlm.kvcache.radix_tree import RadixCache
from radixlm.request import FinishKind, Request
from radixlm.sampling_params import SamplingParams
from radixlm.sched.kv_manager import KVManager
from radixlm.sched.scheduler import Scheduler, SchedulerLimits

EOS = 999


class Harness:
    """A scheduler over a real allocator and radix tree, driven step by step.

    Steps go through the engine's StepLoop: serially, or overlapped one step deep.
    """

    def __init__(self, capacity: int, page_size: int = 1, enable_cache: bool = True,
                 max_running: int = 64, overlap: bool = False, **sched_kwargs):
        self.allocator = PageAllocator(capacity // page_size, page_size, first_slot=page_size)
        tree = RadixCache(page_size, free_fn=self.allocator.free, disabled=not enable_cache)
        self.kv = KVManager(self.allocator, tree, enable_cache)
        limits = SchedulerLimits(max_running, context_length=100_000,
                                 eos_token_ids=frozenset({EOS}))
        self.sched = Scheduler(SchedulerConfig(**sched_kwargs), limits, self.kv)
        self.runner = NullRunner(vocab_size=1000)
        self.loop = StepLoop(self.sched, self.runner, overlap)
        self.outputs: dict[str, list[int]] = {}
        self.finish: dict[str, object] = {}
        self.cached: dict[str, int] = {}

    def add(self, rid: str, prompt: list[int], max_new: int = 8, **params) -> None:
        sp = SamplingParams(max_new_tokens=max_new, temperature=0.0, **params)
        self.sched.add(Request(rid=rid, input_ids=prompt, params=sp))
        self.outputs[rid] = []

    def step(self) -> bool:
        """One loop step; False when it neither launched nor processed anything."""
        had_in_flight = self.loop.in_flight is not None
        launched = self.loop.steps_launched
        self.collect(self.loop.step())
        self.check()
        return had_in_flight or self.loop.steps_launched > launched

    def collect(self, outputs) -> None:
        for out in outputs:
            self.outputs[out.rid].extend(out.new_token_ids)
            self.cached[out.rid] = out.cached_tokens
            if out.finish is not None:
                self.finish[out.rid] = out.finish

    def run(self, max_steps: int = 100_000) -> None:
        for _ in range(max_steps):
            if not self.step():
                assert not self.loop.has_work(), "work left but nothing schedulable"
                return
        raise AssertionError("did not finish")

    def check(self) -> None:
        live = self.kv.live_slots(self.sched.all_requests())
        self.kv.tree.check_invariants(self.allocator, live)

    def assert_no_leak(self) -> None:
        self.kv.flush()
        assert self.allocator.free_tokens == self.allocator.capacity_tokens


def reference_output(prompt: list[int], max_new: int) -> list[int]:
    """What the null model produces for one request alone: apply it token by token."""
    runner, seq, out = NullRunner(vocab_size=1000), list(prompt), []
    for _ in range(max_new):
        token = runner.next_token(seq)
        out.append(token)
        seq.append(token)
        if token == EOS:
            break
    return out


def random_workload(rng: random.Random, count: int) -> list[tuple[str, list[int], int]]:
    prefixes = [[rng.randrange(1000) for _ in range(rng.randint(20, 120))] for _ in range(5)]
    work = []
    for i in range(count):
        head = rng.choice(prefixes) if rng.random() < 0.7 else []
        tail = [rng.randrange(1000) for _ in range(rng.randint(1, 60))]
        work.append((f"r{i}", head + tail, rng.randint(1, 24)))
    return work


OVERLAP = pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlap"])


@OVERLAP
@pytest.mark.parametrize("page_size", [1, 4])
def test_many_concurrent_requests_match_running_alone(page_size, overlap):
    rng = random.Random(0)
    h = Harness(capacity=16_384, page_size=page_size, max_prefill_tokens=2048, overlap=overlap)
    work = random_workload(rng, 200)
    for rid, prompt, max_new in work:
        h.add(rid, prompt, max_new)
    h.run()
    for rid, prompt, max_new in work:
        assert h.outputs[rid] == reference_output(prompt, max_new), rid
    assert h.sched.stats["cached_tokens"] > 0
    h.assert_no_leak()


@OVERLAP
@pytest.mark.parametrize("page_size", [1, 4])
def test_small_pool_forces_retraction_and_outputs_stay_the_same(page_size, overlap):
    rng = random.Random(1)
    h = Harness(capacity=512, page_size=page_size, max_prefill_tokens=512, overlap=overlap)
    work = [(f"r{i}", [rng.randrange(1000) for _ in range(40)], 60) for i in range(12)]
    for rid, prompt, max_new in work:
        h.add(rid, prompt, max_new, ignore_eos=True)
    h.run()
    assert h.sched.stats["retractions"] > 0
    for rid, prompt, max_new in work:
        assert h.outputs[rid] == reference_output_ignore_eos(prompt, max_new), rid
    h.assert_no_leak()


def reference_output_ignore_eos(prompt: list[int], max_new: int) -> list[int]:
    runner, seq = NullRunner(vocab_size=1000), list(prompt)
    for _ in range(max_new):
        seq.append(runner.next_token(seq))
    return seq[len(prompt):]


def test_chunked_prefill_equals_unchunked_and_caches_each_chunk():
    prompt = list(range(300))
    h = Harness(capacity=4096, chunked_prefill_size=64)
    h.add("long", prompt, 10)
    batch = h.sched.schedule()
    assert len(batch.seqs[0].new_tokens) == 64
    h.sched.process(batch, h.runner.forward(batch))
    assert h.kv.tree.total_tokens() == 64, "a finished chunk goes into the radix tree"
    h.run()
    assert h.outputs["long"] == reference_output(prompt, 10)
    h.assert_no_leak()


def test_cached_tokens_for_repeated_extended_and_follow_up_prompts():
    prompt = [5 + i % 90 for i in range(100)]
    h = Harness(capacity=4096)
    h.add("first", prompt, 6)
    h.run()
    h.add("repeat", prompt, 6)
    h.run()
    assert h.cached["repeat"] == len(prompt) - 1  # one token is always recomputed for logits
    h.add("extended", prompt + [7, 8, 9], 6)
    h.run()
    assert h.cached["extended"] == len(prompt)
    answer = h.outputs["first"]
    h.add("follow_up", prompt + answer + [11, 12], 6)
    h.run()
    # The first request's prompt and all generated tokens but the last (never computed) hit.
    assert h.cached["follow_up"] >= len(prompt) + len(answer) - 1
    h.assert_no_leak()


def test_shared_uncached_prefix_is_computed_once_within_a_batch():
    prefix = list(range(200))
    h = Harness(capacity=8192)
    for i in range(4):
        h.add(f"r{i}", prefix + [500 + i], 4)
    first = h.sched.schedule()
    assert len(first.seqs) == 1, "siblings wait for the first to fill the cache"
    h.sched.process(first, h.runner.forward(first))
    h.run()
    assert all(h.cached[f"r{i}"] >= 200 for i in range(1, 4))
    h.assert_no_leak()


@OVERLAP
def test_abort_returns_every_slot(overlap):
    h = Harness(capacity=2048, overlap=overlap)
    h.add("a", list(range(50)), 100, ignore_eos=True)
    h.add("b", list(range(60)), 100, ignore_eos=True)
    for _ in range(5):
        h.step()
    assert (h.loop.in_flight is not None) == overlap
    out = h.sched.abort("a")
    assert out.finish.kind is FinishKind.ABORT
    h.check()
    h.run()
    assert h.outputs["b"] == reference_output_ignore_eos(list(range(60)), 100)
    assert h.outputs["a"] == reference_output_ignore_eos(list(range(50)), 100)[:len(h.outputs["a"])]
    h.assert_no_leak()


def test_disabled_cache_reuses_nothing_and_leaks_nothing():
    h = Harness(capacity=4096, enable_cache=False)
    for i in range(5):
        h.add(f"r{i}", list(range(80)), 5)
    h.run()
    assert h.sched.stats["cached_tokens"] == 0
    assert h.allocator.free_tokens == h.allocator.capacity_tokens


def _hit_rate(policy: str) -> float:
    rng = random.Random(7)
    groups = [[rng.randrange(1000) for _ in range(200)] for _ in range(6)]
    work = [(g, q) for g in range(6) for q in range(6)]
    rng.shuffle(work)
    h = Harness(capacity=700, max_running=3, schedule_policy=policy, max_prefill_tokens=4096)
    for i, (g, q) in enumerate(work):
        h.add(f"r{i}", groups[g] + [q, 999 - q], 4, ignore_eos=True)
    h.run()
    h.assert_no_leak()
    stats = h.sched.stats
    return stats["cached_tokens"] / stats["prompt_tokens"]


def test_lpm_beats_fcfs_on_cache_hit_rate():
    lpm, fcfs = _hit_rate("lpm"), _hit_rate("fcfs")
    assert lpm > fcfs + 0.1, (lpm, fcfs)


def test_dfs_weight_keeps_siblings_together():
    from radixlm.sched.policy import order_dfs_weight

    reqs = []
    for i, head in enumerate([[1, 2], [3, 4], [1, 2], [3, 4], [1, 2]]):
        reqs.append(Request(rid=f"r{i}", input_ids=head + [i], params=SamplingParams()))
    order = [r.rid for r in order_dfs_weight(reqs, lambda r: 0)]
    assert order == ["r0", "r2", "r4", "r1", "r3"]


@OVERLAP
@pytest.mark.parametrize("page_size", [1, 4])
def test_long_chunked_prompts_in_a_small_pool_all_finish(page_size, overlap):
    rng = random.Random(21)
    h = Harness(capacity=320, page_size=page_size, chunked_prefill_size=48,
                max_prefill_tokens=96, overlap=overlap)
    work = [(f"r{i}", [rng.randrange(1000) for _ in range(220)], 24) for i in range(3)]
    for rid, prompt, max_new in work:
        h.add(rid, prompt, max_new, ignore_eos=True)
    h.run()
    for rid, prompt, max_new in work:
        assert h.outputs[rid] == reference_output_ignore_eos(prompt, max_new), rid
    h.assert_no_leak()


@settings(max_examples=80, deadline=None)
@given(
    page_size=st.sampled_from([1, 2, 4]),
    capacity_pages=st.integers(80, 200),
    chunk=st.sampled_from([None, 8, 32]),
    policy=st.sampled_from(["lpm", "fcfs", "dfs-weight", "random"]),
    overlap=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_random_workloads_always_finish_with_solo_outputs(page_size, capacity_pages, chunk,
                                                          policy, overlap, seed):
    rng = random.Random(seed)
    capacity = capacity_pages * page_size
    h = Harness(capacity=capacity, page_size=page_size, chunked_prefill_size=chunk,
                schedule_policy=policy, max_prefill_tokens=rng.choice([32, 128, 1024]),
                max_running=rng.choice([2, 8, 64]), overlap=overlap)
    base = [rng.randrange(1000) for _ in range(rng.randint(1, 40))]
    work = []
    for i in range(rng.randint(1, 12)):
        prompt = base[: rng.randint(0, len(base))] + [rng.randrange(1000)
                                                       for _ in range(rng.randint(1, 30))]
        max_new = rng.randint(1, min(20, capacity - len(prompt) - page_size))
        work.append((f"r{i}", prompt, max_new))
        h.add(f"r{i}", prompt, max_new, ignore_eos=True)
    h.run(max_steps=20_000)
    for rid, prompt, max_new in work:
        assert h.outputs[rid] == reference_output_ignore_eos(prompt, max_new), rid
    h.assert_no_leak()
