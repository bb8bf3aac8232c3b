"""Batched sampling: temperature, top-k/top-p/min-p, penalties, logit bias, seeds, logprobs."""

from radixlm.sampling.logprobs import input_token_logprobs, token_logprobs, top_logprobs
from radixlm.sampling.penalty_cache import PenaltyCache
from radixlm.sampling.sampler import (
    SampleOutput,
    adjusted_logits,
    sample,
    sampling_logits,
)
from radixlm.sampling.sampling_batch import SamplingBatch, check_vocab, step_seed

__all__ = [
    "PenaltyCache",
    "SampleOutput",
    "SamplingBatch",
    "adjusted_logits",
    "check_vocab",
    "input_token_logprobs",
    "sample",
    "sampling_logits",
    "step_seed",
    "token_logprobs",
    "top_logprobs",
]
