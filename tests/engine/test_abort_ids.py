"""Engine.abort names requests exactly: never by id prefix; a request with n > 1 aborts its own
samples (which it tracks itself), and nothing else."""

from __future__ import annotations

import asyncio

import pytest

from radixlm import Engine, RequestError

LONG = {"max_new_tokens": 2000, "temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def engine(tiny_llama3_dir):
    with Engine(model=str(tiny_llama3_dir), kv_cache_tokens=16384) as eng:
        yield eng


async def _started(stream) -> dict:
    return await anext(stream)


async def _finish(stream) -> dict:
    last = None
    async for last in stream:  # noqa: B007 (the last chunk carries the finish reason)
        pass
    return last["meta_info"]["finish_reason"]


def test_abort_is_exact_and_covers_a_requests_own_samples(engine):
    async def scenario() -> None:
        streams = {
            rid: await engine.async_generate(
                prompt=f"p {rid}", sampling_params=LONG, rid=rid, stream=True
            )
            for rid in ("a", "a-1", "ab")
        }
        for stream in streams.values():
            await _started(stream)
        samples = asyncio.ensure_future(
            engine.async_generate(prompt="q", sampling_params={**LONG, "n": 2}, rid="b")
        )
        await asyncio.sleep(0.3)
        engine.abort("")  # neither an empty id ...
        engine.abort("b-")  # ... nor a prefix of a sample's id aborts anything
        engine.abort("a")
        assert (await _finish(streams["a"]))["type"] == "abort"
        engine.abort("b")  # the request with n=2: both of its samples
        results = await asyncio.wait_for(samples, 60)
        assert [r["meta_info"]["finish_reason"]["type"] for r in results] == ["abort"] * 2
        assert [r["meta_info"]["id"] for r in results] == ["b-0", "b-1"]
        # "a-1" and "ab" kept running through all of it
        for rid in ("a-1", "ab"):
            chunk = await asyncio.wait_for(anext(streams[rid]), 30)
            assert chunk["meta_info"]["finish_reason"] is None, rid
            engine.abort(rid)
            assert (await _finish(streams[rid]))["type"] == "abort"

    asyncio.run(scenario())
    assert engine.server_info()["running_requests"] == 0


def test_sample_ids_cannot_collide_with_other_requests(engine):
    async def scenario() -> None:
        stream = await engine.async_generate(
            prompt="c", sampling_params=LONG, rid="c-0", stream=True
        )
        await _started(stream)
        with pytest.raises(RequestError, match="already in flight"):
            await engine.async_generate(prompt="d", sampling_params={**LONG, "n": 2}, rid="c")
        with pytest.raises(RequestError, match="already in flight"):
            await engine.async_generate(
                prompt=["e", "f"], sampling_params={**LONG, "n": 2}, rid=["g", "g-0"]
            )
        engine.abort("c-0")
        assert (await _finish(stream))["type"] == "abort"

    asyncio.run(scenario())
    assert engine.server_info()["running_requests"] == 0
