"""Cascade attention end to end: the engine core with the Triton backend (interpreted on CPU)
gives the same greedy tokens and close logprobs with ``cascade_attention`` on as off."""

from __future__ import annotations

import random
import sys

import pytest

from radixlm.config import EngineConfig
from radixlm.engine import ipc
from radixlm.engine.core import EngineCore
from radixlm.model.attention import triton_backend
from radixlm.request import LogprobOptions
from radixlm.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="CPU torch path tested on Linux")


def generate(model_dir, page_size: int, **options) -> dict[str, list[tuple[int, float]]]:
    """Six prompts sharing a 48-token prefix, five greedy tokens each, with their logprobs."""
    core = EngineCore(EngineConfig.from_kwargs(
        model=str(model_dir), kv_cache_tokens=4096, attention_backend="triton",
        page_size=page_size, **options), progress=False)  # fmt: skip
    rng = random.Random(0)
    shared = [rng.randrange(128000) for _ in range(48)]
    params = SamplingParams(max_new_tokens=5, temperature=0.0, ignore_eos=True)
    out: dict[str, list[tuple[int, float]]] = {}
    for i in range(6):
        ids = shared + [rng.randrange(128000) for _ in range(rng.randint(1, 6))]
        core.add_request(ipc.AddRequest(f"r{i}", ids, params, LogprobOptions(return_logprob=True)))
        out[f"r{i}"] = []
    while core.has_work():
        for o in core.step():
            out[o.rid].extend((tok, lp) for tok, (lp, _) in zip(o.new_token_ids, o.output_logprobs))
        core.check_invariants()
    return out


@pytest.mark.parametrize("page_size", [1, 4])
def test_cascade_on_gives_the_same_tokens_as_off(tiny_llama3_dir, monkeypatch, page_size):
    calls = []
    real = triton_backend.cascade_decode_attention

    def counting(*args, **kwargs):
        calls.append(args[5].group_sizes_cpu)  # the PrefixGroups argument
        return real(*args, **kwargs)

    monkeypatch.setattr(triton_backend, "cascade_decode_attention", counting)
    on = generate(tiny_llama3_dir, page_size, cascade_attention=True, cascade_min_shared=16)
    # Per layer of each grouped decode step: one group, all six at first (a request admitted a
    # step later decodes its last token alone, in no group).
    assert calls[0] == [6] and all(len(sizes) == 1 and sizes[0] >= 2 for sizes in calls)
    calls.clear()
    off = generate(tiny_llama3_dir, page_size)
    assert not calls
    assert [[t for t, _ in on[r]] for r in on] == [[t for t, _ in off[r]] for r in off]
    for rid in on:
        for (_, a), (_, b) in zip(on[rid], off[rid]):
            assert a == pytest.approx(b, abs=1e-4)
