"""Per-step sampling state of a batch: the requests' parameters as device tensors.

Built once per step on the host from plain lists. Everything a step does not need is None, so an
all-greedy batch costs a single argmax; per-row scalars travel in one packed host-to-device copy.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

from radixlm.sampling.penalties import LogitBias, Penalties, TokenBan
from radixlm.sampling.penalty_cache import PenaltyCache
from radixlm.sampling_params import SamplingParams, SamplingParamsError
from radixlm.transfer import int_tensor, to_device

_MASK64 = (1 << 64) - 1


@dataclass
class SamplingBatch:
    """What :func:`radixlm.sampling.sampler.sample` needs for one step of B rows."""

    size: int
    vocab_size: int
    device: torch.device
    all_greedy: bool
    greedy: torch.Tensor | None  # [B] bool, set when greedy and sampled rows are mixed
    temperature: torch.Tensor | None  # [B, 1]; 1.0 in greedy rows; None when all greedy
    top_k: torch.Tensor | None  # [B] int64, vocab_size where disabled; None if no row filters
    top_k_max: int
    top_p_tail: torch.Tensor | None  # [B] 1 - top_p; -1.0 where disabled; None if no row filters
    min_p: torch.Tensor | None  # [B]; 0.0 where disabled; None if no row filters
    logit_bias: LogitBias | None
    penalties: Penalties | None
    ban: TokenBan | None
    row_seeds: list[tuple[int, int]]  # (row, seed of this step) for seeded sampled rows
    generator: torch.Generator | None  # noise of unseeded rows

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        output_token_ids: Sequence[Sequence[int]],
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
        steps: Sequence[int] | None = None,
        *,
        vocab_size: int,
        device: torch.device | str,
        eos_token_ids: Collection[int] = (),
        generator: torch.Generator | None = None,
        request_ids: Sequence[str] | None = None,
        penalty_cache: PenaltyCache | None = None,
    ) -> SamplingBatch:
        """Gather one step's sampling parameters.

        Args:
            params: each row's request parameters.
            output_token_ids: tokens each row generated so far (penalties, min_new_tokens).
            prompt_token_ids: each row's prompt; only read for rows with a repetition penalty.
            steps: index of the token each row samples now (seeds and min_new_tokens);
                defaults to ``len(output_token_ids[i])``.
            vocab_size: logits width; out-of-range ids in logit_bias / stop_token_ids are ignored.
            device: where the logits live.
            eos_token_ids: the model's EOS ids, banned (with stop_token_ids) before min_new_tokens.
            generator: the engine's generator, drawn from by unseeded rows; None uses torch's
                default generator of that device.
            request_ids: each row's request id; with ``penalty_cache``, penalised rows keep
                their token counts on the device between steps instead of re-sending them.
            penalty_cache: the executor's :class:`PenaltyCache` (one per engine).

        Returns:
            The batch, ready for ``sample``.
        """
        device = torch.device(device)
        steps = [len(out) for out in output_token_ids] if steps is None else list(steps)
        greedy = [p.is_greedy for p in params]
        fields = dict(
            size=len(params),
            vocab_size=vocab_size,
            device=device,
            all_greedy=all(greedy),
            logit_bias=LogitBias.build(params, vocab_size, device),
            penalties=Penalties.build(
                params,
                output_token_ids,
                prompt_token_ids,
                vocab_size,
                device,
                request_ids,
                penalty_cache,
            ),
            ban=TokenBan.build(params, steps, eos_token_ids, vocab_size, device),
            generator=generator,
        )
        fields.update(_sampling_fields(params, greedy, steps, vocab_size, device))
        return cls(**fields)

    @property
    def adjusts_logits(self) -> bool:
        """Whether bias, penalties or bans change the logits before temperature."""
        return any(x is not None for x in (self.logit_bias, self.penalties, self.ban))


def _sampling_fields(params, greedy, steps, vocab_size, device) -> dict:
    """Device tensors for temperature and the filters; empty when every row is greedy."""
    if all(greedy):
        return dict(
            greedy=None,
            temperature=None,
            top_k=None,
            top_k_max=0,
            top_p_tail=None,
            min_p=None,
            row_seeds=[],
        )
    sampled = [p for p, g in zip(params, greedy, strict=True) if not g]
    top_ks = [_effective_top_k(p, g, vocab_size) for p, g in zip(params, greedy, strict=True)]
    packed = torch.tensor(
        [
            [1.0 if g else p.temperature, _top_p_tail(p, g), 0.0 if g else p.min_p, float(g)]
            for p, g in zip(params, greedy, strict=True)
        ],
        dtype=torch.float32,
    )
    packed = to_device(packed, device)
    filters_k = any(k < vocab_size for k in top_ks)
    return dict(
        greedy=packed[:, 3] > 0.5 if any(greedy) else None,
        temperature=packed[:, 0:1],
        top_k=int_tensor(top_ks, device) if filters_k else None,
        top_k_max=max((k for k in top_ks if k < vocab_size), default=0),
        top_p_tail=packed[:, 1] if any(p.top_p < 1.0 for p in sampled) else None,
        min_p=packed[:, 2] if any(p.min_p > 0.0 for p in sampled) else None,
        row_seeds=[
            (row, step_seed(p.seed, step))
            for row, (p, g, step) in enumerate(zip(params, greedy, steps, strict=True))
            if p.seed is not None and not g
        ],
    )


def _top_p_tail(params: SamplingParams, greedy: bool) -> float:
    """1 - top_p in float64, the exact threshold HF's TopPLogitsWarper compares against."""
    return -1.0 if greedy or params.top_p >= 1.0 else 1.0 - params.top_p


def _effective_top_k(params: SamplingParams, greedy: bool, vocab_size: int) -> int:
    if greedy or params.top_k < 1:
        return vocab_size
    return min(params.top_k, vocab_size)


def step_seed(seed: int, step: int) -> int:
    """Seed of one request's noise at one step (SplitMix64 of seed and step).

    Each (seed, step) pair gets an unrelated stream, so a seeded request samples the same tokens
    whatever batch it lands in and at whatever row.
    """
    z = (seed * 0x9E3779B97F4A7C15 + step + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def check_vocab(params: SamplingParams, vocab_size: int) -> None:
    """Reject token ids the model does not have (call when a request arrives).

    Raises:
        SamplingParamsError: naming ``logit_bias`` or ``stop_token_ids``.
    """
    bad_bias = [t for t in params.logit_bias if not 0 <= t < vocab_size]
    if bad_bias:
        raise SamplingParamsError("logit_bias", f"token ids {bad_bias} outside [0, {vocab_size})")
    bad_stop = [t for t in params.stop_token_ids if t >= vocab_size]
    if bad_stop:
        raise SamplingParamsError("stop_token_ids", f"ids {bad_stop} outside [0, {vocab_size})")
