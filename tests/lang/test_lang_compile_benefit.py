"""compile() hoists the batch's shared prefix: cached tokens per request with and without it.

A batch of programs sharing a long few-shot prefix is run twice from an empty cache: plainly
(every request is sent at once) and compiled (the shared prefix is sent once first). The counts
come from each gen's meta_info["cached_tokens"]. Run with ``-s`` to see the numbers.
"""

from __future__ import annotations

import pytest

import radixlm_lang as rl

SHOTS = 12
BATCH = 8


@rl.function
def long_prefix_qa(s, question):
    s += "You are a meticulous assistant. Study the solved examples, then answer.\n\n"
    for i in range(SHOTS):
        s += f"Question {i}: what is {i} plus {i + 1}?\nAnswer {i}: {2 * i + 1}.\n\n"
    s += f"Question: {question}\nAnswer:" + rl.gen("answer", max_tokens=4)


def cached_per_request(program, backend, flush) -> list[int]:
    flush()
    batch = [{"question": f"what is {i} times {i}?"} for i in range(BATCH)]
    states = program.run_batch(batch, backend=backend, progress_bar=False, temperature=0)
    assert all(s.error() is None for s in states)
    return [s.get_meta_info("answer")["cached_tokens"] for s in states]


def measure(backend, flush, tokenizer_encode):
    plain = cached_per_request(long_prefix_qa, backend, flush)
    compiled = cached_per_request(long_prefix_qa.compile(), backend, flush)
    graph = long_prefix_qa.trace(question="what is 0 times 0?", backend=backend)
    shared = rl.CompiledFunction.shared_prefix(
        [long_prefix_qa.trace(question=f"what is {i} times {i}?") for i in range(2)]
    )
    shared_tokens = len(tokenizer_encode(shared))
    prompt_tokens = len(tokenizer_encode(graph.constant_prefix()))
    print(
        f"\nshared prefix: {shared_tokens} of {prompt_tokens} prompt tokens; cached tokens "
        f"per request:\n  plain    {plain}\n  compiled {compiled}"
    )
    # Every compiled request finds the whole hoisted prefix (up to the boundary token) cached.
    assert min(compiled) >= shared_tokens - 1
    assert sum(compiled) >= sum(plain)
    return plain, compiled


def test_compile_hoists_the_shared_prefix_in_process(engine_backend, engine):
    measure(engine_backend, engine.flush_cache, engine.tokenizer.encode)


@pytest.mark.slow
def test_compile_hoists_the_shared_prefix_on_a_server(server_runtime, engine):
    measure(server_runtime, server_runtime.endpoint.flush_cache, engine.tokenizer.encode)
