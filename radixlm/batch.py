"""The model-facing batch: what the executor hands the model for one forward pass.

Sequences are ragged. Each sequence ``i`` brings ``extend_lens[i]`` new tokens (1 in decode) and
already has ``seq_lens[i] - extend_lens[i]`` tokens cached in the KV pool. ``kv_indices`` lists,
in CSR form over ``kv_indptr``, the pool slot of every token of every sequence (cached prefix and
new tokens); the new tokens' slots are also in ``out_cache_loc``, where their K/V get written
before attention runs.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from radixlm.prefix_groups import PrefixGroups, find_prefix_groups_flat


class ForwardMode(enum.Enum):
    EXTEND = "extend"
    DECODE = "decode"


@dataclass
class ForwardBatch:
    """One forward pass over a ragged batch.

    Attributes:
        mode: EXTEND (any number of new tokens per sequence, causal over prefix + new) or
            DECODE (exactly one new token per sequence).
        input_ids: [T] int64 new tokens, sequences concatenated.
        positions: [T] int64 absolute position of each new token in its sequence.
        out_cache_loc: [T] int64 pool slot where each new token's K/V is stored.
        seq_lens: [B] int32 total length of each sequence including its new tokens.
        extend_lens: [B] int32 new tokens per sequence.
        qo_indptr: [B+1] int32 offsets of each sequence's new tokens in the T rows.
        kv_indptr: [B+1] int32 offsets of each sequence's slots in ``kv_indices``.
        kv_indices: [sum(seq_lens)] int64 pool slots of every token of every sequence.
        logits_indices: [L] int64 rows of T whose logits the model returns.
        seq_lens_cpu / extend_lens_cpu: host copies, so no backend needs a device sync.
        prefix_groups: DECODE only, when asked for: sequences sharing a long leading run of
            slots, for cascade attention (None: no groups looked for, or none found).
    """

    mode: ForwardMode
    input_ids: torch.Tensor
    positions: torch.Tensor
    out_cache_loc: torch.Tensor
    seq_lens: torch.Tensor
    extend_lens: torch.Tensor
    qo_indptr: torch.Tensor
    kv_indptr: torch.Tensor
    kv_indices: torch.Tensor
    logits_indices: torch.Tensor
    seq_lens_cpu: list[int]
    extend_lens_cpu: list[int]
    prefix_groups: PrefixGroups | None = None

    @property
    def batch_size(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens_cpu, default=0)

    @property
    def max_extend_len(self) -> int:
        return max(self.extend_lens_cpu, default=0)

    @classmethod
    def build(
        cls,
        new_tokens: list[list[int]],
        seq_slots: list[list[int] | torch.Tensor],
        logits_rows: list[list[int]] | None = None,
        mode: ForwardMode | None = None,
        device: torch.device | str = "cpu",
        prefix_min_shared: int | None = None,
    ) -> ForwardBatch:
        """Build from Python lists.

        Args:
            new_tokens: per sequence, the token ids to run now.
            seq_slots: per sequence, the pool slots of all its tokens (prefix, then new tokens),
                as a list or an int64 tensor.
            logits_rows: per sequence, which of its new tokens (0-based within the sequence's
                new tokens) need logits; default: the last one.
            mode: forced mode; default DECODE when every sequence brings exactly one token.
            device: where the tensors live.
            prefix_min_shared: if set and the batch is DECODE, group the sequences that share
                at least this many leading slots (``prefix_groups``, for cascade attention).

        Returns:
            The batch, tensors on ``device``.
        """
        extend_lens = [len(t) for t in new_tokens]
        seq_lens = [len(s) for s in seq_slots]
        if mode is None:
            mode = ForwardMode.DECODE if all(n == 1 for n in extend_lens) else ForwardMode.EXTEND
        if logits_rows is None:
            logits_rows = [[n - 1] for n in extend_lens]
        slot_tensors = [torch.as_tensor(s, dtype=torch.int64) for s in seq_slots]
        positions, rows, offset = [], [], 0
        for want, n, total in zip(logits_rows, extend_lens, seq_lens):
            positions.extend(range(total - n, total))
            rows.extend(offset + r for r in want)
            offset += n
        all_slots = torch.cat(slot_tensors) if slot_tensors else torch.zeros(0, dtype=torch.int64)
        new_slots = [s[len(s) - n :] for s, n in zip(slot_tensors, extend_lens)]
        out_loc = torch.cat(new_slots) if new_slots else torch.zeros(0, dtype=torch.int64)
        groups = None
        if prefix_min_shared is not None and mode is ForwardMode.DECODE:
            groups = find_prefix_groups_flat(all_slots, seq_lens, prefix_min_shared, device)
        return cls(
            mode=mode,
            input_ids=_long([t for toks in new_tokens for t in toks], device),
            positions=_long(positions, device),
            out_cache_loc=_to_device(out_loc, device),
            seq_lens=_int(seq_lens, device),
            extend_lens=_int(extend_lens, device),
            qo_indptr=_int(_cumsum(extend_lens), device),
            kv_indptr=_int(_cumsum(seq_lens), device),
            kv_indices=_to_device(all_slots, device),
            logits_indices=_long(rows, device),
            seq_lens_cpu=seq_lens,
            extend_lens_cpu=extend_lens,
            prefix_groups=groups,
        )


def _cumsum(values: list[int]) -> list[int]:
    out = [0]
    for v in values:
        out.append(out[-1] + v)
    return out


def _to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Host-to-device copy that never makes the host wait for the device's queue.

    A copy from pageable memory may synchronise with the stream; from pinned memory it is truly
    asynchronous, which overlap scheduling relies on (the previous step may still be running).
    """
    if torch.device(device).type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _long(values: list[int], device: torch.device | str) -> torch.Tensor:
    return _to_device(torch.tensor(values, dtype=torch.int64), device)


def _int(values: list[int], device: torch.device | str) -> torch.Tensor:
    return _to_device(torch.tensor(values, dtype=torch.int32), device)


def future_token(row: int) -> int:
    """Placeholder input id for the token that row ``row`` of the in-flight step will sample.

    Token ids are never negative, so ``-(row + 1)`` cannot be mistaken for one; the executor
    replaces it on the device with that row's sampled id (:func:`future_row` inverts it).
    """
    return -(row + 1)


def future_row(token: int) -> int | None:
    """The in-flight row a placeholder from :func:`future_token` points at; None for a real id."""
    return -token - 1 if token < 0 else None


@dataclass
class ScheduledSeq:
    """One row of a scheduled batch: everything the executor needs, and no Request.

    Attributes:
        rid: request id (for logs and results only).
        new_tokens: tokens to run now.
        slots: pool slots of every token of the sequence up to and including ``new_tokens``.
        sample: sample a next token from the last row.
        logits_from: first row (within ``new_tokens``) whose logits are wanted for input-token
            logprobs, or None.
        params: the request's sampling parameters.
        prompt_ids / output_ids: for penalties; ``len(output_ids)`` is the sampling step.
        return_logprob / top_logprobs_num: what logprobs to compute.
        bitmask_row: row of ``ScheduledBatch.bitmask`` constraining this sequence, or None.
        future_tokens: tokens of the sequence that the in-flight step is still sampling: 1 when
            ``new_tokens`` is a :func:`future_token` placeholder (overlap scheduling), else 0.
            They come after ``output_ids``, so the token sampled now is number
            ``len(output_ids) + future_tokens`` (see :attr:`sample_step`).
        epoch: the request's epoch when this row was scheduled; the scheduler drops the row's
            result if the request has stopped running since (finished, aborted, retracted).
    """

    rid: str
    new_tokens: list[int]
    slots: torch.Tensor
    sample: bool
    params: object
    prompt_ids: list[int]
    output_ids: list[int]
    logits_from: int | None = None
    return_logprob: bool = False
    top_logprobs_num: int = 0
    bitmask_row: int | None = None
    future_tokens: int = 0
    epoch: int = 0

    @property
    def sample_step(self) -> int:
        """Index of the output token this row samples (seeds and min_new_tokens key on it)."""
        return len(self.output_ids) + self.future_tokens


@dataclass
class ScheduledBatch:
    """The scheduler's output for one step.

    Attributes:
        mode: EXTEND or DECODE.
        seqs: the rows.
        bitmask: packed int32 [rows, ceil(vocab/32)] allowed-token masks for constrained rows.
    """

    mode: ForwardMode
    seqs: list[ScheduledSeq]
    bitmask: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return sum(len(s.new_tokens) for s in self.seqs)

    @property
    def has_future_tokens(self) -> bool:
        """Some row's input is a placeholder for a token the in-flight step is sampling."""
        return any(s.future_tokens for s in self.seqs)
