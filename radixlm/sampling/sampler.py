"""Batched next-token sampling that stays on the device until the caller reads the tokens.

Per row, in order: logit_bias → repetition penalty → frequency/presence penalties →
min_new_tokens ban → (greedy rows: argmax) → temperature → top-k → top-p → min-p → draw.
The draw is the exponential race (Gumbel-max): ``argmax(logits - log(E))`` with E ~ Exp(1)
samples exactly from ``softmax(logits)`` and needs no host synchronisation (unlike a
CDF search). A seeded row takes its noise from a generator seeded with (seed, step), drawn over
the whole vocabulary, so it picks the same token in any batch and at any row. Logprobs are
those of the logits passed in, before any of the above.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from radixlm.sampling.filters import NEG_INF, min_p_mask, top_k_mask, top_p_mask
from radixlm.sampling.logprobs import input_token_logprobs, top_logprobs
from radixlm.sampling.sampling_batch import SamplingBatch, check_vocab, step_seed
from radixlm.sampling.seeded_noise import fill_seeded_noise

__all__ = [
    "SampleOutput",
    "SamplingBatch",
    "adjusted_logits",
    "check_vocab",
    "input_token_logprobs",
    "sample",
    "sampling_logits",
    "step_seed",
    "top_logprobs",
]

# Exp(1) draws of exactly 0 would make log(E) = -inf and let a removed token win.
_MIN_NOISE = 1e-30


@dataclass
class SampleOutput:
    """One step's samples, still on the device."""

    next_token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None  # [B] float32, log_softmax(raw logits) of the chosen token
    top_logprob_ids: torch.Tensor | None  # [B, k] int64, most likely first
    top_logprob_values: torch.Tensor | None  # [B, k] float32


def sample(
    logits: torch.Tensor,
    batch: SamplingBatch,
    top_logprobs_num: int = 0,
    return_logprob: bool = True,
) -> SampleOutput:
    """Pick the next token of every row.

    Args:
        logits: [B, V] next-token logits (float32 preferred; other dtypes are upcast). Not
            modified.
        batch: the rows' parameters, from :meth:`SamplingBatch.build`.
        top_logprobs_num: return the k most likely tokens of every row with their logprobs.
        return_logprob: compute the chosen tokens' logprobs (False leaves ``logprobs`` None).

    Returns:
        Token ids and logprobs on the logits' device.
    """
    raw = logits.float()
    adjusted = adjusted_logits(raw, batch)
    if batch.all_greedy:
        next_ids = adjusted.argmax(dim=-1)
    else:
        next_ids = _draw(sampling_logits(adjusted, batch, adjusted=True), batch)
        if batch.greedy is not None:
            next_ids = torch.where(batch.greedy, adjusted.argmax(dim=-1), next_ids)
    logprobs = top_values = top_ids = None
    if return_logprob or top_logprobs_num > 0:
        all_logprobs = torch.log_softmax(raw, dim=-1)
        if return_logprob:
            logprobs = all_logprobs.gather(1, next_ids[:, None])[:, 0]
        if top_logprobs_num > 0:
            k = min(top_logprobs_num, raw.shape[-1])
            top_values, top_ids = all_logprobs.topk(k, dim=-1)
    return SampleOutput(next_ids, logprobs, top_ids, top_values)


def adjusted_logits(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Logits after logit_bias, penalties and the min_new_tokens ban (a copy when changed).

    Args:
        logits: [B, V] float32.
        batch: the rows' parameters.

    Returns:
        [B, V] float32; greedy rows take the argmax of this.
    """
    if not batch.adjusts_logits:
        return logits
    adjusted = logits.clone()
    for step in (batch.logit_bias, batch.penalties, batch.ban):
        if step is not None:
            step.apply(adjusted)
    return adjusted


def sampling_logits(
    logits: torch.Tensor, batch: SamplingBatch, adjusted: bool = False
) -> torch.Tensor:
    """The logits a sampled row draws from: softmax of the result is its distribution.

    Args:
        logits: [B, V] float32 raw logits, or the output of :func:`adjusted_logits`.
        batch: the rows' parameters (must not be all greedy).
        adjusted: ``logits`` already went through :func:`adjusted_logits`.

    Returns:
        [B, V] temperature-scaled logits with tokens removed by top-k/top-p/min-p at -inf.
    """
    if not adjusted:
        logits = adjusted_logits(logits, batch)
    scaled = logits / batch.temperature
    if batch.top_k is not None:
        scaled = scaled.masked_fill(top_k_mask(scaled, batch.top_k, batch.top_k_max), NEG_INF)
    if batch.top_p_tail is not None:
        scaled = scaled.masked_fill(top_p_mask(scaled, batch.top_p_tail), NEG_INF)
    if batch.min_p is not None:
        scaled = scaled.masked_fill(min_p_mask(scaled, batch.min_p), NEG_INF)
    return scaled


def _draw(scaled: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """One categorical draw per row from softmax(scaled), by the exponential race."""
    noise = _exponential_noise(scaled.shape, batch)
    return (scaled - noise.clamp_min_(_MIN_NOISE).log_()).argmax(dim=-1)


def _exponential_noise(shape: torch.Size, batch: SamplingBatch) -> torch.Tensor:
    """Exp(1) noise [B, V]: seeded rows from their own (seed, step) stream, the rest from the
    engine's generator."""
    noise = torch.empty(shape, dtype=torch.float32, device=batch.device)
    if len(batch.row_seeds) < batch.size:
        noise.exponential_(generator=batch.generator)
    fill_seeded_noise(noise, batch.row_seeds)
    return noise
