"""The public Engine API: the core in its own process, text in and out, errors, streaming."""

from __future__ import annotations

import asyncio

import pytest

from radixlm import Engine, EngineDeadError, RequestError


@pytest.fixture(scope="module")
def engine(tiny_llama3_dir):
    with Engine(model=str(tiny_llama3_dir), kv_cache_tokens=8192) as eng:
        yield eng


GREEDY = {"max_new_tokens": 8, "temperature": 0.0, "ignore_eos": True}


def test_generate_text_matches_input_ids_path(engine):
    out = engine.generate(prompt="Hello world", sampling_params=GREEDY)
    ids = engine.tokenizer.encode("Hello world")
    again = engine.generate(input_ids=ids, sampling_params=GREEDY)
    assert out["output_ids"] == again["output_ids"]
    assert out["text"] == engine.tokenizer.decode(out["output_ids"], skip_special_tokens=True)
    meta = again["meta_info"]
    assert meta["prompt_tokens"] == len(ids)
    assert meta["completion_tokens"] == 8
    assert meta["cached_tokens"] == len(ids) - 1
    assert meta["finish_reason"] == {"type": "length", "matched": None}


def test_batch_and_n_fan_out(engine):
    outs = engine.generate(prompt=["a b c", "d e f"], sampling_params=GREEDY)
    assert len(outs) == 2
    assert outs[0]["output_ids"] == engine.generate(prompt="a b c", sampling_params=GREEDY)[
        "output_ids"]
    samples = engine.generate(prompt="x y", sampling_params={"max_new_tokens": 6, "n": 3,
                                                              "temperature": 1.0, "seed": 5})
    assert len(samples) == 3
    assert len({tuple(s["output_ids"]) for s in samples}) > 1


def test_stream_chunks_concatenate_to_the_final_text(engine):
    chunks = list(engine.generate(prompt="stream me", sampling_params=GREEDY, stream=True))
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"
    assert "".join(c["delta"] for c in chunks) == chunks[-1]["text"]
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])


def test_async_generate_and_async_stream(engine):
    async def go():
        single = await engine.async_generate(prompt="async", sampling_params=GREEDY)
        stream = await engine.async_generate(prompt="async", sampling_params=GREEDY, stream=True)
        deltas = [c["delta"] async for c in stream]
        return single, deltas

    single, deltas = asyncio.run(go())
    assert "".join(deltas) == single["text"]


def test_invalid_requests_raise_and_queue_nothing(engine):
    with pytest.raises(RequestError) as err:
        engine.generate(prompt="x", sampling_params={"temperature": -1})
    assert err.value.param == "temperature"
    with pytest.raises(RequestError) as err:
        engine.generate(input_ids=[1] * (engine.context_length + 1))
    assert f"maximum context length is {engine.context_length} tokens" in str(err.value)
    with pytest.raises(RequestError):
        engine.generate(input_ids=[engine.vocab_size + 5])
    with pytest.raises(RequestError):
        engine.generate(prompt="x", sampling_params={"bogus": 1})
    with pytest.raises(RequestError) as err:
        engine.generate(input_ids=[])
    assert err.value.param == "input_ids"
    with pytest.raises(RequestError) as err:
        engine.generate(prompt="half a surrogate \ud800 pair")
    assert err.value.param == "prompt"
    assert engine.server_info()["waiting_requests"] == 0


def test_abort_mid_stream_frees_every_slot(engine):
    params = {"max_new_tokens": 500, "temperature": 0.0, "ignore_eos": True}
    stream = engine.generate(prompt="never ending", sampling_params=params, stream=True,
                             rid="to-abort")
    next(stream)
    engine.abort("to-abort")
    rest = list(stream)
    assert rest[-1]["meta_info"]["finish_reason"]["type"] == "abort"
    assert engine.flush_cache()
    info = engine.server_info()
    assert info["kv_free_tokens"] == info["kv_capacity_tokens"]
    assert engine.check_invariants()


def test_logprobs_shape(engine):
    out = engine.generate(prompt="logprobs please", sampling_params=GREEDY, return_logprob=True,
                          top_logprobs_num=2, logprob_start_len=0)
    meta = out["meta_info"]
    assert len(meta["output_token_logprobs"]) == 8
    assert [t for _, t, _ in meta["output_token_logprobs"]] == out["output_ids"]
    assert all(len(top) == 2 for top in meta["output_top_logprobs"])
    assert meta["input_token_logprobs"][0][0] is None
    assert len(meta["input_token_logprobs"]) == meta["prompt_tokens"]


def test_requests_after_the_core_died_fail_fast_and_leave_nothing_queued(tiny_llama3_dir):
    dying = Engine(model=str(tiny_llama3_dir), kv_cache_tokens=4096)
    try:
        dying._proc.kill()
        dying._proc.join(10)
        for _ in range(3):
            with pytest.raises(EngineDeadError):
                dying.generate(prompt="anyone there?", sampling_params=GREEDY)
        assert not dying._states, "refused requests must not stay counted as queued"
    finally:
        dying.shutdown()
