"""Constrained decoding under overlap scheduling, with a real tokenizer and a null model.

The null model samples, for a constrained row, the first token its mask allows at or after the
sequence hash, so outputs depend on the masks, the splices and nothing else: serial and
overlapped loops must agree token for token, and the overlapped loop must never wait for a
decode step with nothing queued behind it.
"""

from __future__ import annotations

import json
import re

import pytest

from radixlm.batch import ForwardMode
from radixlm.config import SchedulerConfig
from radixlm.engine.overlap import StepLoop
from radixlm.executor.null_runner import NullRunner
from radixlm.kvcache.allocator import PageAllocator
from radixlm.kvcache.radix_tree import RadixCache
from radixlm.request import FinishKind, Request
from radixlm.sampling_params import SamplingParams
from radixlm.sched.grammar_state import GrammarState
from radixlm.sched.kv_manager import KVManager
from radixlm.sched.scheduler import Scheduler, SchedulerLimits

LLAMA3_EOS = (128001, 128009)
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 5},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
HEX = "[0-9a-f]{24}"


@pytest.fixture(scope="module")
def tokenizer(llama3_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(llama3_tokenizer_dir))


@pytest.fixture(scope="module")
def compiler(tokenizer):
    from radixlm.constrained import GrammarCompiler

    with GrammarCompiler(
        tokenizer, backend="llguidance", eos_token_ids=list(LLAMA3_EOS), isolate=False
    ) as compiler:
        yield compiler


class ModeLog(NullRunner):
    """A null runner that records which launched batches were waited for with nothing queued
    behind them (where a real device would run dry)."""

    def __init__(self, vocab_size: int):
        super().__init__(vocab_size=vocab_size)
        self.modes: list[ForwardMode] = []
        self.dry_waits: list[ForwardMode] = []

    def launch(self, batch, futures=None):
        step = super().launch(batch, futures)
        self.modes.append(batch.mode)
        ready = step.result

        def result():
            if self.launched == step.index + 1:
                self.dry_waits.append(batch.mode)
            return ready()

        step.result = result
        return step


def run(
    compiler,
    tokenizer,
    overlap: bool,
    specs: list[dict],
    jump_forward: bool = True,
    mask_threads: int = 1,
    capacity: int = 8192,
):
    grammar = GrammarState(
        compiler, tokenizer, enable_jump_forward=jump_forward, mask_threads=mask_threads
    )
    allocator = PageAllocator(capacity, 1, first_slot=1)
    kv = KVManager(allocator, RadixCache(1, free_fn=allocator.free), True)
    limits = SchedulerLimits(64, context_length=100_000, eos_token_ids=frozenset(LLAMA3_EOS))
    sched = Scheduler(SchedulerConfig(), limits, kv, grammar)
    runner = ModeLog(compiler.vocab_size)
    loop = StepLoop(sched, runner, overlap)
    ids: dict[str, list[int]] = {}
    finish: dict[str, object] = {}
    jumped: dict[str, int] = {}
    for i, spec in enumerate(specs):
        req = Request(
            rid=f"r{i}",
            input_ids=[1000 + i, 2000 + 7 * i, 300],
            params=SamplingParams(temperature=0.0, **spec),
        )
        grammar.submit(req)
        sched.add(req)
        ids[req.rid] = []
    for _ in range(5000):
        if not loop.has_work():
            break
        outputs = loop.step()
        kv.tree.check_invariants(allocator, kv.live_slots(sched.all_requests()))
        for out in outputs:
            ids[out.rid].extend(out.new_token_ids)
            jumped[out.rid] = out.jump_forward_tokens
            if out.finish is not None:
                finish[out.rid] = out.finish
    assert not loop.has_work()
    run.retractions = sched.stats["retractions"]
    kv.flush()
    assert allocator.free_tokens == allocator.capacity_tokens
    return ids, finish, jumped, runner


def text(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode([t for t in ids if t not in LLAMA3_EOS])


WORKLOAD = (
    [{"max_new_tokens": 60, "json_schema": json.dumps(PERSON)}] * 6
    + [{"max_new_tokens": 40, "regex": HEX}] * 6
    + [{"max_new_tokens": 12, "ignore_eos": True}] * 4
    + [{"max_new_tokens": 8, "choices": ["red", "green", "blue"]}] * 2
)


def test_overlap_and_serial_give_the_same_valid_outputs(compiler, tokenizer):
    serial = run(compiler, tokenizer, False, WORKLOAD)
    overlap = run(compiler, tokenizer, True, WORKLOAD, mask_threads=2)
    assert overlap[0] == serial[0]
    assert overlap[2] == serial[2]
    ids, finish, jumped, _ = overlap
    for i, spec in enumerate(WORKLOAD):
        rid, out = f"r{i}", text(tokenizer, ids[f"r{i}"])
        if "json_schema" in spec and finish[rid].kind is FinishKind.STOP:
            value = json.loads(out)
            assert set(value) == {"name", "age", "tags"} and isinstance(value["age"], int)
        elif "regex" in spec:
            assert finish[rid].kind is FinishKind.STOP and re.fullmatch(HEX, out), out
        elif "choices" in spec:
            assert out in ("red", "green", "blue")
    assert sum(jumped[f"r{i}"] for i in range(6)) > 0, "the fixed keys were never spliced"


def test_constrained_decode_steps_never_wait_on_an_empty_queue(compiler, tokenizer):
    specs = [{"max_new_tokens": 40, "regex": HEX}] * 8 + [
        {"max_new_tokens": 60, "json_schema": json.dumps(PERSON)}
    ] * 8
    *_, serial_runner = run(compiler, tokenizer, False, specs)
    *_, runner = run(compiler, tokenizer, True, specs)
    assert len(runner.modes) >= 20
    # serially every step is waited for at once; overlapped, only the steps with prefill rows
    # (the first ones here: jump-forward tokens ride along in decode steps) and the very last
    # step make the loop wait with nothing queued behind them
    assert len(serial_runner.dry_waits) == len(serial_runner.modes)
    assert runner.dry_waits.count(ForwardMode.DECODE) <= 1, runner.dry_waits
    assert len(runner.dry_waits) <= 4, runner.dry_waits


def test_masks_filled_in_parallel_match_one_thread(compiler, tokenizer):
    import torch

    grammar = GrammarState(compiler, tokenizer, mask_threads=4)
    schema = compiler.submit("json_schema", json.dumps(PERSON)).result()
    regex = compiler.submit("regex", HEX).result()
    matchers = [(schema if i % 2 else regex).matcher() for i in range(40)]
    prefix = tokenizer.encode('{"name": "Al', add_special_tokens=False)
    for i, m in enumerate(matchers):
        feed = (
            prefix[: i % len(prefix)]
            if i % 2
            else tokenizer.encode("0123abcd"[: i % 8], add_special_tokens=False)
        )
        assert m.accept_tokens(feed)
    words = -(-compiler.vocab_size // 32)
    parallel = torch.zeros((40, words), dtype=torch.int32)
    rows = [(i, m) for i, m in enumerate(matchers)]
    grammar.fill_bitmask(parallel, rows[:-1] + [(39, None)])
    single = torch.zeros((40, words), dtype=torch.int32)
    for i, m in enumerate(matchers[:-1]):
        m.fill_bitmask(single, i)
    single[39] = -1
    assert torch.equal(parallel, single)


def test_retraction_under_pressure_keeps_outputs_and_frees_every_slot(compiler, tokenizer):
    """A pool too small for every request at once: retracted requests (some with jump-forward
    tokens not computed yet) re-prefill and still produce the same tokens, serial or overlapped.
    """
    specs = WORKLOAD[:12]
    reference = run(compiler, tokenizer, False, specs)[0]
    for overlap in (False, True):
        ids = run(compiler, tokenizer, overlap, specs, capacity=90)[0]
        assert run.retractions > 0
        assert ids == reference, overlap


def test_a_mask_fill_failing_on_the_mask_thread_fails_its_batch_only(
    compiler, tokenizer, monkeypatch
):
    """Masks are filled on the loop's mask thread: an exception there aborts the constrained
    rows of that one step; the unconstrained requests finish normally, and every slot still
    returns to the pool (``run`` checks)."""
    calls = []
    real = GrammarState.fill_bitmask

    def flaky(self, bitmask, rows):
        calls.append(len(rows))
        if len(calls) == 5:
            raise RuntimeError("mask thread failure")
        return real(self, bitmask, rows)

    monkeypatch.setattr(GrammarState, "fill_bitmask", flaky)
    specs = [{"max_new_tokens": 40, "regex": HEX}] * 4 + [
        {"max_new_tokens": 40, "ignore_eos": True}] * 2  # fmt: skip
    ids, finish, _, _ = run(compiler, tokenizer, True, specs)
    aborted = {rid for rid, f in finish.items() if f.kind is FinishKind.ABORT}
    assert aborted and all("constrained decoding" in finish[rid].message for rid in aborted)
    assert aborted <= {"r0", "r1", "r2", "r3"}  # constrained requests only
    assert len(finish) == len(specs)
    for rid in ("r4", "r5"):
        assert finish[rid].kind is FinishKind.LENGTH and len(ids[rid]) == 40
