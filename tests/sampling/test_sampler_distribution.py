"""Sampler filters and penalties against per-row references (HF logits processors, loops)."""

from __future__ import annotations

import dataclasses
import random
from collections import Counter

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from radixlm.sampling import SamplingBatch, adjusted_logits, sample, sampling_logits
from radixlm.sampling_params import SamplingParams

VOCAB = 64
TOP_PS = [1.0, 0.5, 0.75, 0.9, 0.95, 0.3]
MIN_PS = [0.0, 0.125, 0.05, 0.1, 0.25]


def build(params, outputs=None, prompts=None, steps=None, eos=(), generator=None, vocab=VOCAB):
    outputs = outputs if outputs is not None else [[] for _ in params]
    return SamplingBatch.build(
        params,
        outputs,
        prompts,
        steps,
        vocab_size=vocab,
        device="cpu",
        eos_token_ids=eos,
        generator=generator,
    )


def random_params(rng: random.Random) -> SamplingParams:
    return SamplingParams(
        temperature=rng.choice([0.5, 0.7, 1.0, 1.3, 2.0]),
        top_k=rng.choice([-1, -1, 1, 2, 5, 17, VOCAB, VOCAB + 10]),
        top_p=rng.choice(TOP_PS),
        min_p=rng.choice(MIN_PS),
    )


def reference_filtered(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """HF's warpers in generate()'s order: temperature, top-k, top-p, min-p."""
    scores = TemperatureLogitsWarper(p.temperature)(None, row[None].clone())
    if p.top_k >= 1:
        scores = TopKLogitsWarper(p.top_k)(None, scores)
    if p.top_p < 1.0:
        scores = TopPLogitsWarper(p.top_p)(None, scores)
    if p.min_p > 0.0:
        scores = MinPLogitsWarper(p.min_p)(None, scores)
    return scores[0]


@pytest.mark.parametrize("seed", range(6))
def test_filtered_distribution_matches_hf_warpers(seed):
    rng = random.Random(seed)
    params = [random_params(rng) for _ in range(12)]
    params = [p for p in params if not p.is_greedy] or [SamplingParams(top_p=0.5)]
    logits = torch.randn(len(params), VOCAB, generator=torch.Generator().manual_seed(seed)) * 3
    ours = sampling_logits(logits, build(params))
    for row, p in enumerate(params):
        expected = reference_filtered(logits[row], p)
        assert torch.equal(torch.isinf(ours[row]), torch.isinf(expected)), p
        kept = ~torch.isinf(expected)
        torch.testing.assert_close(ours[row][kept], expected[kept])


def test_each_filter_alone_on_a_known_distribution():
    probs = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])
    logits = probs.log()[None].repeat(4, 1)
    params = [
        SamplingParams(top_k=2),  # keeps 0, 1
        SamplingParams(top_p=0.7),  # 0.4 + 0.3 reaches 0.7: keeps 0, 1
        SamplingParams(top_p=0.71),  # needs the third token
        SamplingParams(min_p=0.3),  # threshold 0.12: keeps 0, 1, 2
    ]
    kept = ~torch.isinf(sampling_logits(logits, build(params, vocab=5)))
    assert kept.tolist() == [
        [True, True, False, False, False],
        [True, True, False, False, False],
        [True, True, True, False, False],
        [True, True, True, False, False],
    ]


def reference_adjusted(row, p, prompt, output, step, eos):
    """Explicit per-row reference of bias, penalties and the min_new_tokens ban."""
    row = row.clone()
    for token, bias in p.logit_bias.items():
        if 0 <= token < row.numel():
            row[token] += bias
    if p.repetition_penalty != 1.0:
        context = torch.tensor([[*prompt, *output]], dtype=torch.long)
        row = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(context, row[None])[0]
    for token, count in Counter(output).items():
        row[token] -= p.frequency_penalty * count + p.presence_penalty
    if step < p.min_new_tokens:
        for token in set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos)):
            row[token] = float("-inf")
    return row


def random_penalised(rng: random.Random) -> SamplingParams:
    return SamplingParams(
        temperature=rng.choice([0.0, 1.0]),
        repetition_penalty=rng.choice([1.0, 0.8, 1.3, 2.0]),
        frequency_penalty=rng.choice([0.0, 0.5, -0.7, 2.0]),
        presence_penalty=rng.choice([0.0, 0.4, -1.0]),
        logit_bias=rng.choice([{}, {3: 2.5, 9: -4.0, VOCAB + 5: 1.0}]),
        min_new_tokens=rng.choice([0, 2, 5]),
        stop_token_ids=rng.choice([[], [7], [7, 8]]),
        ignore_eos=rng.choice([False, True]),
    )


@pytest.mark.parametrize("seed", range(6))
def test_penalties_bias_and_bans_match_reference(seed):
    rng = random.Random(seed)
    params = [random_penalised(rng) for _ in range(10)]
    prompts = [[rng.randrange(VOCAB) for _ in range(rng.randrange(6))] for _ in params]
    outputs = [[rng.randrange(VOCAB) for _ in range(rng.randrange(8))] for _ in params]
    logits = torch.randn(len(params), VOCAB, generator=torch.Generator().manual_seed(seed)) * 3
    eos = {0, 1}
    ours = adjusted_logits(logits, build(params, outputs, prompts, eos=eos))
    for row, p in enumerate(params):
        expected = reference_adjusted(
            logits[row], p, prompts[row], outputs[row], len(outputs[row]), eos
        )
        torch.testing.assert_close(ours[row], expected)


def test_greedy_is_argmax_after_penalties():
    rng = random.Random(7)
    params = [random_penalised(rng) for _ in range(16)]
    for p in params:
        p.temperature = 0.0
    outputs = [[rng.randrange(VOCAB) for _ in range(3)] for _ in params]
    logits = torch.randn(len(params), VOCAB, generator=torch.Generator().manual_seed(3))
    batch = build(params, outputs, outputs, eos={0})
    expected = [
        int(reference_adjusted(logits[r], p, outputs[r], outputs[r], 3, {0}).argmax())
        for r, p in enumerate(params)
    ]
    assert batch.all_greedy
    assert sample(logits, batch).next_token_ids.tolist() == expected


def test_plain_greedy_batch_is_argmax_and_skips_everything():
    logits = torch.randn(5, VOCAB)
    batch = build([SamplingParams(temperature=0.0)] * 4 + [SamplingParams(top_k=1)])
    assert batch.all_greedy and batch.temperature is None and not batch.adjusts_logits
    assert torch.equal(sample(logits, batch).next_token_ids, logits.argmax(dim=-1))


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


DRAW_CASES = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.6, top_k=4),
    SamplingParams(temperature=1.4, top_p=0.75),
    SamplingParams(min_p=0.125, frequency_penalty=0.5),
]


def assert_draws_fit(params: SamplingParams, seeded: bool, device: str = "cpu") -> None:
    """20,000 rows with the same logits (each with its own seed if ``seeded``): token counts
    fit softmax(sampling_logits), and filtered tokens are never drawn."""
    rows, vocab = 20_000, 8
    base = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0], device=device)
    all_params = [dataclasses.replace(params, seed=i) if seeded else params for i in range(rows)]
    batch = SamplingBatch.build(
        all_params, [[1, 1]] * rows, vocab_size=vocab, device=device,
        generator=torch.Generator(device=device).manual_seed(0),
    )  # fmt: skip
    one = SamplingBatch.build([params], [[1, 1]], vocab_size=vocab, device=device)
    probs = sampling_logits(base[None], one).softmax(-1)[0].cpu()
    tokens = sample(base[None].expand(rows, vocab).contiguous(), batch).next_token_ids
    counts = torch.bincount(tokens.cpu(), minlength=vocab).float()
    assert counts[probs == 0].sum() == 0
    # 99.99th percentile of chi-square with <= 7 degrees of freedom is about 29.9.
    assert chi_square(counts, probs) < 29.9


@pytest.mark.parametrize("params", DRAW_CASES)
def test_draws_follow_the_filtered_distribution(params):
    assert_draws_fit(params, seeded=False)


def test_seeded_draws_follow_the_filtered_distribution():
    assert_draws_fit(DRAW_CASES[2], seeded=True)


@pytest.mark.gpu
@pytest.mark.parametrize("seeded", [False, True])
@pytest.mark.parametrize("params", DRAW_CASES)
def test_cuda_draws_follow_the_filtered_distribution(params, seeded):
    assert_draws_fit(params, seeded=seeded, device="cuda")


def test_mixed_greedy_and_sampled_rows():
    logits = torch.randn(6, VOCAB, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.5)] * 3
    batch = build(params, generator=torch.Generator().manual_seed(2))
    tokens = sample(logits, batch).next_token_ids
    assert tokens[0::2].tolist() == logits[0::2].argmax(-1).tolist()
    assert batch.greedy is not None and batch.greedy.tolist() == [True, False] * 3


def test_input_logits_are_not_modified():
    logits = torch.randn(2, VOCAB)
    before = logits.clone()
    params = [
        SamplingParams(logit_bias={1: 3.0}, repetition_penalty=1.5, top_p=0.5),
        SamplingParams(min_new_tokens=3, frequency_penalty=1.0),
    ]
    sample(logits, build(params, [[1, 2], [3]], [[4], [5]], eos={0}))
    assert torch.equal(logits, before)
