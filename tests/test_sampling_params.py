"""SamplingParams validation: wrong types and NaN name the field, tiny temperatures are greedy."""

from __future__ import annotations

import math

import pytest
import torch

from radixlm.sampling.sampler import sample
from radixlm.sampling.sampling_batch import SamplingBatch
from radixlm.sampling_params import SamplingParams, SamplingParamsError


@pytest.mark.parametrize("field,value", [
    ("temperature", math.nan), ("top_p", math.nan), ("min_p", math.nan),
    ("frequency_penalty", math.nan), ("presence_penalty", math.nan),
    ("repetition_penalty", math.nan), ("temperature", math.inf), ("top_p", -math.inf),
    ("stop", {"a": 1}), ("stop", [1]), ("stop_token_ids", [True]), ("stop_token_ids", "12"),
    ("logit_bias", [1, 2]), ("logit_bias", {"5": math.nan}), ("logit_bias", {"5": "high"}),
    ("ignore_eos", [1]), ("ignore_eos", "no"), ("skip_special_tokens", 0),
    ("regex", ["a"]), ("json_schema", 5), ("choices", {"a": 1}), ("choices", "ab"),
])
def test_bad_values_name_their_field(field, value):
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams.from_dict({field: value})
    assert info.value.field == field


def test_valid_values_still_pass():
    params = SamplingParams.from_dict({
        "temperature": 0.7, "top_p": 1, "stop": "END", "stop_token_ids": [2], "ignore_eos": True,
        "logit_bias": {"17": -100, "3": 2.5}, "choices": ["a", "b"], "skip_special_tokens": False})
    assert params.stop == ["END"] and params.logit_bias == {17: -100.0, 3: 2.5}


@pytest.mark.parametrize("temperature", [1e-300, 1e-7, 0.0])
def test_a_vanishing_temperature_samples_greedily(temperature):
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=temperature)] * 2
    batch = SamplingBatch.build(params=params, output_token_ids=[[], []],
                                prompt_token_ids=[[1], [1]], vocab_size=50, device="cpu")
    out = sample(logits, batch)
    assert out.next_token_ids.tolist() == logits.argmax(-1).tolist()
