"""Overlap scheduling with the null model: ordering, dropped rows, aborts in flight, no leaks."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st
from test_scheduler import EOS, Harness

from radixlm.batch import ForwardMode, future_row, future_token
from radixlm.executor.null_runner import NullRunner
from radixlm.request import FinishKind


def reference(prompt: list[int], max_new: int, stop: frozenset[int] = frozenset(),
              ignore_eos: bool = False) -> list[int]:
    """The null model's output for one request alone, with its stop rules."""
    runner, seq, out = NullRunner(vocab_size=1000), list(prompt), []
    for _ in range(max_new):
        token = runner.next_token(seq)
        out.append(token)
        seq.append(token)
        if token in stop or (token == EOS and not ignore_eos):
            break
    return out


class RecordingRunner(NullRunner):
    """A null runner that logs launches and result() calls, and keeps every launched batch."""

    def __init__(self, log: list):
        super().__init__(vocab_size=1000)
        self.log = log
        self.batches = []

    def launch(self, batch, futures=None):
        step = super().launch(batch, futures)
        n = len(self.batches)
        self.batches.append(batch)
        self.log.append(("launch", n))
        ready = step.result

        def result():
            self.log.append(("result", n))
            return ready()

        step.result = result
        return step


def recording_harness(overlap: bool = True, **kwargs) -> tuple[Harness, list]:
    log: list = []
    h = Harness(overlap=overlap, **kwargs)
    h.runner = h.loop.runner = RecordingRunner(log)
    schedule = h.sched.schedule

    def logged_schedule(in_flight=None):
        batch = schedule(in_flight)
        log.append(("schedule", batch))
        return batch

    h.sched.schedule = logged_schedule
    return h, log


def test_decode_of_step_t_plus_1_is_scheduled_and_launched_before_step_t_resolves():
    h, log = recording_harness(capacity=4096)
    for i in range(4):
        h.add(f"r{i}", [i, 5, 6, 7], 12, ignore_eos=True)
    h.run()
    batches = h.runner.batches
    pairs = [(t, t + 1) for t in range(len(batches) - 1)
             if batches[t].mode is ForwardMode.DECODE and batches[t + 1].mode is ForwardMode.DECODE]
    assert len(pairs) >= 10
    for t, nxt in pairs:
        resolved = log.index(("result", t))
        scheduled = next(i for i, (kind, what) in enumerate(log)
                         if kind == "schedule" and what is batches[nxt])
        assert scheduled < log.index(("launch", nxt)) < resolved, (t, log)
        assert all(future_row(s.new_tokens[0]) is not None for s in batches[nxt].seqs)
    for rid in h.outputs:
        assert h.outputs[rid] == reference([int(rid[1:]), 5, 6, 7], 12, ignore_eos=True)
    h.assert_no_leak()


def test_serial_loop_resolves_each_step_before_scheduling_the_next():
    h, log = recording_harness(overlap=False, capacity=4096)
    h.add("r", [1, 2, 3], 6, ignore_eos=True)
    h.run()
    launches = [e for e in log if e[0] in ("launch", "result")]
    assert launches == [e for n in range(len(h.runner.batches)) for e in
                        (("launch", n), ("result", n))]
    assert not any(b.has_future_tokens for b in h.runner.batches)


def test_a_request_that_stops_in_step_t_has_its_row_in_t_plus_1_dropped():
    prompt = [3, 1, 4, 1, 5]
    full = reference(prompt, 20, ignore_eos=True)
    stop = frozenset({full[5]}) - frozenset(full[:5])
    assert stop, "pick a prompt whose 6th token is new"
    h, _ = recording_harness(capacity=1024)
    h.add("stops", prompt, 20, ignore_eos=True, stop_token_ids=list(stop))
    h.add("goes_on", [9, 9, 9], 20, ignore_eos=True)
    h.run()
    assert h.outputs["stops"] == full[:6]
    assert h.finish["stops"].kind is FinishKind.STOP
    scheduled_rows = sum(1 for b in h.runner.batches for s in b.seqs
                         if s.rid == "stops" and s.sample)
    assert scheduled_rows == 7, "one row past the stop was launched, and its token dropped"
    assert h.outputs["goes_on"] == reference([9, 9, 9], 20, ignore_eos=True)
    h.assert_no_leak()


def test_max_new_tokens_one_and_two_schedule_no_wasted_row():
    h, _ = recording_harness(capacity=1024)
    h.add("one", [1, 2, 3], 1, ignore_eos=True)
    h.add("two", [4, 5, 6], 2, ignore_eos=True)
    h.add("long", [7, 8, 9], 10, ignore_eos=True)
    h.run()
    assert h.outputs["one"] == reference([1, 2, 3], 1, ignore_eos=True)
    assert h.outputs["two"] == reference([4, 5, 6], 2, ignore_eos=True)
    for rid, want in (("one", 1), ("two", 2)):
        rows = sum(1 for b in h.runner.batches for s in b.seqs if s.rid == rid and s.sample)
        assert rows == want, "a token that certainly ends the request gets no next row"
    h.assert_no_leak()


@settings(max_examples=80, deadline=None)
@given(
    page_size=st.sampled_from([1, 2, 4]),
    capacity_pages=st.integers(80, 200),
    chunk=st.sampled_from([None, 8, 32]),
    seed=st.integers(0, 10_000),
)
def test_random_workloads_with_stops_and_aborts_in_flight(page_size, capacity_pages, chunk,
                                                          seed):
    """Stop tokens, tiny max_new_tokens, retraction, drains and aborts while a step is in
    flight: every request still gets its solo output (a prefix of it when aborted), and slots
    never leak (the harness checks the invariants after every step)."""
    rng = random.Random(seed)
    capacity = capacity_pages * page_size
    h = Harness(capacity=capacity, page_size=page_size, chunked_prefill_size=chunk,
                max_prefill_tokens=rng.choice([32, 128, 1024]),
                max_running=rng.choice([2, 8, 64]), overlap=True)
    base = [rng.randrange(1000) for _ in range(rng.randint(1, 40))]
    expected = {}
    for i in range(rng.randint(1, 12)):
        prompt = base[: rng.randint(0, len(base))] + [rng.randrange(1000)
                                                       for _ in range(rng.randint(1, 30))]
        max_new = rng.randint(1, min(20, capacity - len(prompt) - page_size))
        solo = reference(prompt, max_new, ignore_eos=True)
        stop = [rng.choice(solo)] if rng.random() < 0.4 else []
        # A penalised request makes the loop drain (the null model ignores the penalty).
        penalty = 0.5 if rng.random() < 0.15 else 0.0
        h.add(f"r{i}", prompt, max_new, ignore_eos=True, stop_token_ids=stop,
              frequency_penalty=penalty)
        expected[f"r{i}"] = reference(prompt, max_new, frozenset(stop), ignore_eos=True)
    aborted = set()
    for _ in range(20_000):
        if rng.random() < 0.05 and h.sched.running:
            victim = rng.choice(h.sched.running)
            h.collect([h.sched.abort(victim.rid)])
            aborted.add(victim.rid)
            h.check()
        if not h.step():
            break
    assert not h.loop.has_work()
    for rid, want in expected.items():
        got = h.outputs[rid]
        if rid in aborted:
            assert got == want[: len(got)], rid
            assert h.finish[rid].kind is FinishKind.ABORT
        else:
            assert got == want, rid
    h.assert_no_leak()


def test_a_penalised_request_makes_every_decode_wait_for_the_previous_results():
    h, log = recording_harness(capacity=4096)
    h.add("plain", [1, 2, 3], 8, ignore_eos=True)
    h.add("penalised", [4, 5, 6], 8, ignore_eos=True, presence_penalty=0.5)
    h.run()
    for n in range(1, len(h.runner.batches)):
        assert log.index(("result", n - 1)) < log.index(("launch", n)), log
    assert not any(b.has_future_tokens for b in h.runner.batches)
    assert h.outputs["plain"] == reference([1, 2, 3], 8, ignore_eos=True)
    h.assert_no_leak()


def test_drain_rules_and_one_step_by_hand():
    h = Harness(capacity=4096, overlap=True)
    h.add("a", [1, 2, 3], 8, ignore_eos=True)
    extend = h.sched.schedule()
    assert extend.mode is ForwardMode.EXTEND and h.sched.needs_results_before_next(extend)
    h.sched.process(extend, h.runner.forward(extend))
    decode = h.sched.schedule()
    assert decode.mode is ForwardMode.DECODE and not h.sched.needs_results_before_next(decode)
    decode_step = h.runner.launch(decode)
    nxt = h.sched.schedule(in_flight=decode)
    assert nxt.seqs[0].new_tokens == [future_token(0)]
    assert nxt.seqs[0].future_tokens == 1 and nxt.seqs[0].sample_step == 2
    assert nxt.seqs[0].slots.shape[0] == decode.seqs[0].slots.shape[0] + 1
    h.check()  # the slot of the token in flight belongs to the request
    nxt_step = h.runner.launch(nxt, futures=decode_step)
    h.sched.process(decode, decode_step.result())
    h.sched.process(nxt, nxt_step.result())
    assert h.sched.running[0].output_ids == reference([1, 2, 3], 3, ignore_eos=True)
    h.check()
