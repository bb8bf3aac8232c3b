"""Seeds, logprobs, min_new_tokens and logit_bias of the batched sampler."""

from __future__ import annotations

import pytest
import torch

from radixlm.sampling import (
    SamplingBatch,
    check_vocab,
    input_token_logprobs,
    sample,
    step_seed,
    top_logprobs,
)
from radixlm.sampling_params import SamplingParams, SamplingParamsError

VOCAB = 100
FLOAT32 = dict(rtol=1e-5, atol=1e-5)  # float32 results against a float64 reference


def build(params, outputs=None, steps=None, eos=(), generator=None, device="cpu"):
    outputs = outputs if outputs is not None else [[] for _ in params]
    return SamplingBatch.build(
        params,
        outputs,
        None,
        steps,
        vocab_size=VOCAB,
        device=device,
        eos_token_ids=eos,
        generator=generator,
    )


def seeded_run(row_logits, seeded, others, position, engine_seed, device="cpu"):
    """Tokens of a seeded request over len(row_logits) steps, placed at ``position`` among
    ``others`` unseeded rows, with the engine generator seeded ``engine_seed``."""
    generator = torch.Generator(device=device).manual_seed(engine_seed)
    tokens = []
    for step, row in enumerate(row_logits):
        params = [SamplingParams(temperature=1.3, top_p=0.9)] * others
        params.insert(position, seeded)
        logits = torch.randn(others + 1, VOCAB, device=device, generator=generator)
        logits[position] = row
        batch = build(params, steps=[step] * len(params), generator=generator, device=device)
        tokens.append(int(sample(logits, batch).next_token_ids[position]))
    return tokens


def test_seeded_request_reproduces_in_any_batch_and_row():
    row_logits = torch.randn(12, VOCAB, generator=torch.Generator().manual_seed(0))
    seeded = SamplingParams(temperature=1.0, top_k=50, seed=1234)
    alone = seeded_run(row_logits, seeded, others=0, position=0, engine_seed=0)
    assert seeded_run(row_logits, seeded, others=7, position=3, engine_seed=5) == alone
    assert seeded_run(row_logits, seeded, others=2, position=2, engine_seed=9) == alone
    other_seed = SamplingParams(temperature=1.0, top_k=50, seed=4321)
    assert seeded_run(row_logits, other_seed, others=0, position=0, engine_seed=0) != alone


def test_unseeded_rows_follow_the_engine_generator():
    logits = torch.zeros(1, VOCAB)
    params = [SamplingParams(temperature=1.0)]

    def draws(seed):
        gen = torch.Generator().manual_seed(seed)
        return [int(sample(logits, build(params, generator=gen)).next_token_ids) for _ in range(8)]

    assert draws(3) == draws(3)
    assert draws(3) != draws(4)


def test_step_seed_separates_steps_and_seeds():
    values = {step_seed(seed, step) for seed in range(20) for step in range(50)}
    assert len(values) == 1000
    assert all(0 <= v < 2**63 for v in values)


@pytest.mark.parametrize("top_k", [0, 3])
def test_logprobs_are_log_softmax_of_raw_logits(top_k):
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(2)) * 4
    params = [
        SamplingParams(temperature=0.0, repetition_penalty=2.0),
        SamplingParams(temperature=0.5, logit_bias={5: 30.0}),
        SamplingParams(temperature=1.7, top_p=0.5, frequency_penalty=1.0),
        SamplingParams(min_p=0.2, seed=3),
    ]
    out = sample(logits, build(params, [[5, 6]] * 4), top_logprobs_num=top_k)
    reference = torch.log_softmax(logits.double(), dim=-1)
    chosen = reference.gather(1, out.next_token_ids[:, None])[:, 0]
    torch.testing.assert_close(out.logprobs.double(), chosen, **FLOAT32)
    assert int(out.next_token_ids[1]) == 5  # the bias decides the token, not the logprob
    if top_k:
        values, ids = reference.sort(dim=-1, descending=True)
        assert torch.equal(out.top_logprob_ids, ids[:, :top_k])
        torch.testing.assert_close(out.top_logprob_values.double(), values[:, :top_k], **FLOAT32)
    else:
        assert out.top_logprob_ids is None and out.top_logprob_values is None


def test_logprobs_can_be_skipped_and_top_logprobs_have_k_columns():
    logits = torch.randn(2, VOCAB)
    batch = build([SamplingParams(temperature=0.0)] * 2)
    assert sample(logits, batch, return_logprob=False).logprobs is None
    out = sample(logits, batch, top_logprobs_num=2)
    assert out.next_token_ids.tolist() == logits.argmax(-1).tolist()
    assert len(out.logprobs.tolist()) == 2 and len(out.top_logprob_ids.tolist()[0]) == 2


def test_input_token_logprobs_and_top_logprobs_helpers():
    logits = torch.randn(6, VOCAB, dtype=torch.bfloat16)
    next_ids = torch.randint(0, VOCAB, (6,))
    reference = torch.log_softmax(logits.double(), dim=-1)
    torch.testing.assert_close(
        input_token_logprobs(logits, next_ids).double(),
        reference[torch.arange(6), next_ids],
        **FLOAT32,
    )
    values, ids = top_logprobs(logits, 4)
    torch.testing.assert_close(values.double(), reference.gather(1, ids), **FLOAT32)
    assert torch.equal(values, values.sort(dim=-1, descending=True).values)
    assert top_logprobs(logits, VOCAB + 5)[0].shape == (6, VOCAB)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_min_new_tokens_blocks_eos_and_stop_ids(temperature):
    eos, stop_id = 2, 7
    logits = torch.full((3, VOCAB), -5.0)
    logits[:, eos] = 50.0
    logits[:, stop_id] = 30.0
    params = SamplingParams(temperature=temperature, min_new_tokens=3, stop_token_ids=[stop_id])
    gen = torch.Generator().manual_seed(0)
    batch = build([params] * 3, steps=[0, 2, 3], eos={eos}, generator=gen)
    tokens = sample(logits, batch).next_token_ids.tolist()
    assert tokens[0] not in (eos, stop_id) and tokens[1] not in (eos, stop_id)
    assert tokens[2] == eos  # min_new_tokens reached


def test_ignore_eos_does_not_ban_eos_and_a_lone_eos_stays_possible():
    logits = torch.full((2, VOCAB), float("-inf"))
    logits[0, 2] = 1.0  # a grammar that only allows EOS: banning it would leave nothing
    logits[1, 2], logits[1, 3] = 5.0, 1.0
    params = [
        SamplingParams(temperature=0.0, min_new_tokens=4),
        SamplingParams(temperature=0.0, min_new_tokens=4, ignore_eos=True),
    ]
    assert sample(logits, build(params, eos={2})).next_token_ids.tolist() == [2, 2]


def test_logit_bias_adds_before_sampling():
    logits = torch.zeros(3, VOCAB)
    logits[:, 10] = 5.0
    params = [
        SamplingParams(temperature=0.0, logit_bias={42: 6.0}),
        SamplingParams(temperature=1.0, logit_bias={10: -1e9}, top_k=1),
        SamplingParams(temperature=0.8, logit_bias={7: 100.0, 10**9: 5.0}),
    ]
    tokens = sample(logits, build(params, generator=torch.Generator())).next_token_ids.tolist()
    assert tokens[0] == 42 and tokens[1] != 10 and tokens[2] == 7


def test_check_vocab_names_the_field():
    with pytest.raises(SamplingParamsError) as info:
        check_vocab(SamplingParams(logit_bias={VOCAB: 1.0}), VOCAB)
    assert info.value.field == "logit_bias"
    with pytest.raises(SamplingParamsError) as info:
        check_vocab(SamplingParams(stop_token_ids=[VOCAB + 1]), VOCAB)
    assert info.value.field == "stop_token_ids"
    check_vocab(SamplingParams(logit_bias={VOCAB - 1: 1.0}, stop_token_ids=[0]), VOCAB)


@pytest.mark.gpu
def test_cuda_sampling_needs_no_host_sync_and_seeds_reproduce():
    device = torch.device("cuda")
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.9, top_k=20, top_p=0.8, min_p=0.05, seed=7),
        SamplingParams(
            temperature=1.1,
            repetition_penalty=1.2,
            frequency_penalty=0.3,
            presence_penalty=0.2,
            logit_bias={3: 2.0},
            min_new_tokens=4,
        ),
    ]
    logits = torch.randn(3, VOCAB, device=device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        batch = SamplingBatch.build(
            params,
            [[1, 2], [3], [4, 4]],
            [[5], [6], [7]],
            vocab_size=VOCAB,
            device=device,
            eos_token_ids={2},
            generator=torch.Generator(device=device).manual_seed(0),
        )
        out = sample(logits, batch, top_logprobs_num=2)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(out.next_token_ids[0]) == int(logits[0].argmax())
    row_logits = torch.randn(10, VOCAB, device=device)
    alone = seeded_run(row_logits, params[1], 0, 0, 0, device="cuda")
    assert seeded_run(row_logits, params[1], 5, 2, 3, device="cuda") == alone
