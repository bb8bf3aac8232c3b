"""Logit adjustments that come before temperature: logit bias, penalties, min_new_tokens bans.

Each is built on the host as a small sparse structure (only the rows that ask for it) and
applied on the device in place on a scratch copy of the logits, without host synchronisation.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from radixlm.sampling.penalty_cache import PenaltyCache
from radixlm.sampling_params import SamplingParams
from radixlm.transfer import float_tensor, int_tensor, to_device


@dataclass
class LogitBias:
    """``logits[rows[i], cols[i]] += values[i]`` for the requests' logit_bias entries."""

    rows: torch.Tensor  # [N] int64
    cols: torch.Tensor  # [N] int64
    values: torch.Tensor  # [N] float32

    @classmethod
    def build(
        cls, params: Sequence[SamplingParams], vocab_size: int, device: torch.device
    ) -> LogitBias | None:
        """Pack every in-vocabulary entry; None when no row has one."""
        entries = [
            (row, token, bias)
            for row, p in enumerate(params)
            for token, bias in p.logit_bias.items()
            if 0 <= token < vocab_size
        ]
        if not entries:
            return None
        rows, cols, values = zip(*entries, strict=True)
        return cls(int_tensor(rows, device), int_tensor(cols, device), float_tensor(values, device))

    def apply(self, logits: torch.Tensor) -> None:
        """Add the biases to ``logits`` [B, V] in place."""
        logits.index_put_((self.rows, self.cols), self.values, accumulate=True)


@dataclass
class TokenBan:
    """Tokens some rows may not sample yet: EOS and stop_token_ids before min_new_tokens."""

    rows: torch.Tensor  # [N] int64
    cols: torch.Tensor  # [N] int64
    banned_rows: torch.Tensor  # [R] int64, the distinct rows

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        steps: Sequence[int],
        eos_token_ids: Collection[int],
        vocab_size: int,
        device: torch.device,
    ) -> TokenBan | None:
        """Ban EOS (unless ignore_eos) and stop_token_ids in rows below min_new_tokens."""
        entries = []
        for row, (p, step) in enumerate(zip(params, steps, strict=True)):
            if step >= p.min_new_tokens:
                continue
            enders = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_token_ids))
            entries.extend((row, t) for t in sorted(enders) if 0 <= t < vocab_size)
        if not entries:
            return None
        rows, cols = zip(*entries, strict=True)
        return cls(
            int_tensor(rows, device),
            int_tensor(cols, device),
            int_tensor(sorted(set(rows)), device),
        )

    def apply(self, logits: torch.Tensor) -> None:
        """Set banned logits to -inf in place, except in a row where that would leave nothing
        (a grammar that allows only EOS must still be able to end)."""
        before = logits[self.banned_rows]
        logits.index_put_((self.rows, self.cols), logits.new_full((), float("-inf")))
        after = logits[self.banned_rows]
        nothing_left = torch.isneginf(after.amax(dim=-1, keepdim=True))
        logits.index_copy_(0, self.banned_rows, torch.where(nothing_left, before, after))


@dataclass
class Penalties:
    """Repetition (HF), frequency and presence (OpenAI) penalties for the rows that use them."""

    rows: torch.Tensor  # [P] int64, rows of the batch
    repetition: torch.Tensor  # [P, 1]; 1.0 in rows without it
    frequency: torch.Tensor  # [P, 1]
    presence: torch.Tensor  # [P, 1]
    seen: torch.Tensor | None  # [P, V] bool: in prompt or output; None if no repetition penalty
    counts: torch.Tensor  # [P, V] float32: occurrences in the output

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        output_token_ids: Sequence[Sequence[int]],
        prompt_token_ids: Sequence[Sequence[int]] | None,
        vocab_size: int,
        device: torch.device,
        request_ids: Sequence[str] | None = None,
        cache: PenaltyCache | None = None,
    ) -> Penalties | None:
        """Gather the penalised rows; None when no row has a penalty.

        Without a cache this copies the penalised rows' prompt and output ids to the device
        every step; with ``cache`` and ``request_ids`` only the new tokens travel.
        """
        rows = [i for i, p in enumerate(params) if p.has_penalties]
        if not rows:
            return None
        chosen = [params[i] for i in rows]
        outputs = [output_token_ids[i] for i in rows]
        prompts = [prompt_token_ids[i] if prompt_token_ids else () for i in rows]
        with_prompt = any(p.repetition_penalty != 1.0 for p in chosen)
        if cache is not None and request_ids is not None:
            rids = [request_ids[i] for i in rows]
            counts, seen = cache.gather(rids, prompts, outputs, with_prompt)
        else:
            counts = _occurrences(outputs, vocab_size, device)
            seen = _seen(counts, prompts) if with_prompt else None
        return cls(int_tensor(rows, device), *_penalty_columns(chosen, device), seen, counts)

    def apply(self, logits: torch.Tensor) -> None:
        """Penalise ``logits`` [B, V] in place."""
        sub = logits[self.rows]
        if self.seen is not None:
            # HF: a seen token's logit is divided by the penalty if positive, else multiplied.
            penalised = torch.where(sub > 0, sub / self.repetition, sub * self.repetition)
            sub = torch.where(self.seen, penalised, sub)
        sub = sub - self.frequency * self.counts - self.presence * (self.counts > 0)
        logits.index_copy_(0, self.rows, sub)


def _penalty_columns(chosen: list[SamplingParams], device: torch.device):
    """(repetition, frequency, presence) as [P, 1] columns in one copy."""
    values = [[p.repetition_penalty, p.frequency_penalty, p.presence_penalty] for p in chosen]
    packed = to_device(torch.tensor(values, dtype=torch.float32), device)
    return packed[:, 0:1], packed[:, 1:2], packed[:, 2:3]


def _seen(counts: torch.Tensor, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
    """[P, V] bool: the token occurs in the row's prompt or output."""
    in_prompt = torch.zeros_like(counts)
    _count_into(in_prompt, prompts)
    return (in_prompt + counts) > 0


def _occurrences(
    token_lists: Sequence[Sequence[int]], vocab_size: int, device: torch.device
) -> torch.Tensor:
    """[len(token_lists), V] float32 counts of each row's tokens."""
    counts = torch.zeros(len(token_lists), vocab_size, dtype=torch.float32, device=device)
    _count_into(counts, token_lists)
    return counts


def _count_into(counts: torch.Tensor, token_lists: Sequence[Sequence[int]]) -> None:
    """Add each row's token occurrences to ``counts`` [R, V]; ids outside [0, V) are ignored.

    The per-step cost is one pass over the ids in numpy and one copy to the device.
    """
    lengths = np.fromiter((len(tokens) for tokens in token_lists), dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return
    cols = np.fromiter(itertools.chain.from_iterable(token_lists), dtype=np.int64, count=total)
    rows = np.repeat(np.arange(len(token_lists), dtype=np.int64), lengths)
    keep = (cols >= 0) & (cols < counts.shape[1])
    index = torch.from_numpy(np.stack([rows[keep], cols[keep]]))
    rows_t, cols_t = to_device(index, counts.device)
    ones = torch.ones(rows_t.shape[0], dtype=torch.float32, device=counts.device)
    counts.index_put_((rows_t, cols_t), ones, accumulate=True)


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    return float_tensor(values, device)[:, None]
