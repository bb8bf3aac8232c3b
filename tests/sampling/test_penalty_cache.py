"""PenaltyCache: cached penalty state gives the same logits as rebuilding it every step."""

from __future__ import annotations

import random

import torch

from radixlm.sampling import PenaltyCache, SamplingBatch, adjusted_logits
from radixlm.sampling_params import SamplingParams

VOCAB = 40


def penalised(rng: random.Random) -> SamplingParams:
    return SamplingParams(
        repetition_penalty=rng.choice([1.0, 1.4, 0.7]),
        frequency_penalty=rng.choice([0.0, 0.6]),
        presence_penalty=rng.choice([0.0, -0.5, 1.0]),
        temperature=rng.choice([0.0, 1.0]),
    )


def adjusted(params, prompts, outputs, rids=None, cache=None):
    batch = SamplingBatch.build(
        params, outputs, prompts, vocab_size=VOCAB, device="cpu", request_ids=rids,
        penalty_cache=cache,
    )  # fmt: skip
    logits = torch.randn(len(params), VOCAB, generator=torch.Generator().manual_seed(len(params)))
    return adjusted_logits(logits, batch)


def test_cached_penalties_match_rebuilt_ones_as_batches_change():
    rng = random.Random(0)
    requests = {
        f"r{i}": (penalised(rng), [rng.randrange(VOCAB + 3) for _ in range(rng.randrange(9))], [])
        for i in range(30)
    }
    cache = PenaltyCache(VOCAB, "cpu", max_idle_steps=3)
    for _ in range(40):
        rids = rng.sample(sorted(requests), rng.randrange(1, 12))
        for rid in rids:  # each scheduled request generated tokens since it last ran
            requests[rid][2].extend(rng.randrange(VOCAB) for _ in range(rng.randrange(3)))
        if rng.random() < 0.1:  # a request restarts with a shorter output
            requests[rids[0]][2][:] = requests[rids[0]][2][:1]
        params, prompts, outputs = zip(*(requests[rid] for rid in rids), strict=True)
        expected = adjusted(params, prompts, outputs)
        torch.testing.assert_close(adjusted(params, prompts, outputs, rids, cache), expected)
    assert len(cache) <= 30


def test_idle_requests_are_recycled():
    cache = PenaltyCache(VOCAB, "cpu", max_idle_steps=2)
    params = [SamplingParams(frequency_penalty=1.0)]
    for step in range(10):
        adjusted(params, [[1]], [[2, 3]], [f"req{step}"], cache)
    assert len(cache) <= 3
