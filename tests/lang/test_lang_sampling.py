"""The frontend's SamplingParams: one definition whose names are radixlm's."""

from __future__ import annotations

import dataclasses
import json

import pytest

import radixlm_lang as rl
from radixlm.sampling_params import SamplingParams as EngineSamplingParams
from radixlm_lang.sampling import CLIENT_FIELDS, FIELD_NAMES, REQUEST_FIELDS, SamplingParams


def test_every_field_is_an_engine_sampling_field_or_a_native_request_field():
    engine_fields = {f.name for f in dataclasses.fields(EngineSamplingParams)}
    for name in FIELD_NAMES:
        assert name in engine_fields or name in REQUEST_FIELDS or name in CLIENT_FIELDS, name


def test_client_fields_are_never_sent():
    params = SamplingParams.from_kwargs(stop_regex=r"\d", return_text_in_logprobs=True, n=2)
    assert params.stop_regex == (r"\d",)
    assert params.sampling_dict() == {"n": 2} and params.request_dict() == {}


def test_aliases_map_to_radixlm_names():
    params = SamplingParams.from_kwargs(max_tokens=7, min_tokens=2, stop="\n")
    assert params.max_new_tokens == 7 and params.min_new_tokens == 2
    assert params.stop == ("\n",)


def test_unknown_and_duplicated_keywords_raise():
    with pytest.raises(TypeError, match="unknown sampling parameter 'temprature'"):
        SamplingParams.from_kwargs(temprature=0.5)
    with pytest.raises(TypeError, match="given twice"):
        SamplingParams.from_kwargs(max_tokens=3, max_new_tokens=4)


def test_gen_overrides_run_defaults_field_by_field():
    defaults = SamplingParams.from_kwargs(temperature=0.0, max_new_tokens=64, top_p=0.9)
    gen_params = SamplingParams.from_kwargs(max_tokens=5)
    merged = defaults.merged(gen_params)
    assert merged.max_new_tokens == 5
    assert merged.temperature == 0.0 and merged.top_p == 0.9


def test_native_dicts_split_sampling_from_logprob_flags():
    params = SamplingParams.from_kwargs(
        max_tokens=3,
        stop=["a", "b"],
        json_schema={"type": "object"},
        return_logprob=True,
        top_logprobs_num=2,
    )
    sampling = params.sampling_dict()
    schema = '{"type": "object"}'
    assert sampling == {"max_new_tokens": 3, "stop": ["a", "b"], "json_schema": schema}
    assert params.request_dict() == {"return_logprob": True, "top_logprobs_num": 2}
    # What the native API receives is accepted by the engine's own validation.
    EngineSamplingParams.from_dict(json.loads(json.dumps(sampling)))


def test_gen_keywords_build_the_shared_dataclass():
    expr = rl.gen("x", max_tokens=4, temperature=0, seed=3, repetition_penalty=1.1)
    assert isinstance(expr.params, SamplingParams)
    assert expr.params.set_fields() == {
        "max_new_tokens": 4,
        "temperature": 0,
        "seed": 3,
        "repetition_penalty": 1.1,
    }


def test_gen_with_choices_is_a_select():
    expr = rl.gen("c", choices=["a", "b"], choices_method=rl.greedy_token_selection)
    assert expr.choices == ("a", "b") and expr.method is rl.greedy_token_selection


def test_gen_rejects_bad_dtypes_and_conflicts():
    with pytest.raises(TypeError, match="supports int, float, str and bool"):
        rl.gen("x", dtype=list)
    with pytest.raises(TypeError, match="cannot be combined"):
        rl.gen("x", dtype=int, regex="[0-9]+")
    with pytest.raises(ValueError, match="non-empty"):
        rl.select("x", [])
