"""The model-facing batch: what the executor hands the model for one forward pass.

Sequences are ragged. Each sequence ``i`` brings ``extend_lens[i]`` new tokens (1 in decode) and
already has ``seq_lens[i] - extend_lens[i]`` tokens cached in the KV pool. ``kv_indices`` lists,
in CSR form over ``kv_indptr``, the pool slot of every token of every sequence (cached prefix and
new tokens); the new tokens' slots are also in ``out_cache_loc``, where their K/V get written
before attention runs.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from radixlm.slots import as_slot_array, concat_slots
from radixlm.transfer import to_device


class ForwardMode(enum.Enum):
    EXTEND = "extend"
    DECODE = "decode"


@dataclass
class ForwardBatch:
    """One forward pass over a ragged batch.

    Attributes:
        mode: EXTEND (any number of new tokens per sequence, causal over prefix + new) or
            DECODE (one attention row per new token). A sequence that brings k > 1 tokens to a
            DECODE batch (jump-forward) becomes k rows, row j seeing the sequence up to its own
            token, so the batch still runs the decode kernels (and a CUDA graph); the batch's
            per-row fields (``seq_lens``, ``extend_lens``, ``kv_indptr``, ``kv_indices``,
            ``qo_indptr`` and the host copies) then count those rows, not sequences.
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
        seq_slots: Sequence[np.ndarray | torch.Tensor | list[int]],
        logits_rows: list[list[int]] | None = None,
        mode: ForwardMode | None = None,
        device: torch.device | str = "cpu",
    ) -> ForwardBatch:
        """Build from per-sequence token lists and slot arrays.

        The slots are concatenated once (numpy) and every per-token index array is computed
        vectorized from the sequence lengths, so the cost per sequence is a few list
        operations; each tensor then reaches ``device`` in one copy (pinned, non-blocking on
        CUDA).

        Args:
            new_tokens: per sequence, the token ids to run now.
            seq_slots: per sequence, the pool slots of all its tokens (prefix, then new tokens),
                as an int64 numpy array (what the scheduler hands over), a list, or a tensor.
            logits_rows: per sequence, which of its new tokens (0-based within the sequence's
                new tokens) need logits; default: the last one.
            mode: forced mode; default DECODE when every sequence brings exactly one token.
                DECODE with multi-token sequences splits them into one row per token.
            device: where the tensors live.

        Returns:
            The batch, tensors on ``device``.
        """
        extend_lens = [len(t) for t in new_tokens]
        slot_arrays = [as_slot_array(s) for s in seq_slots]
        seq_lens = [len(s) for s in slot_arrays]
        if mode is None:
            mode = ForwardMode.DECODE if all(n == 1 for n in extend_lens) else ForwardMode.EXTEND
        device = torch.device(device)
        ext = np.array(extend_lens, dtype=np.int64)
        lens = np.array(seq_lens, dtype=np.int64)
        all_slots = concat_slots(slot_arrays)
        qo_indptr, kv_indptr = _offsets(ext), _offsets(lens)
        positions = _new_token_positions(ext, lens, qo_indptr)
        # A new token's slot sits at its position within its sequence's run of slots.
        out_loc = all_slots[kv_indptr[:-1].repeat(ext) + positions]
        input_ids = np.fromiter(itertools.chain.from_iterable(new_tokens), np.int64, len(positions))
        logits_indices = _logits_indices(logits_rows, qo_indptr)
        if mode is ForwardMode.DECODE and len(positions) != len(ext):
            # One row per token; the token order, and so every per-token array, is unchanged.
            all_slots, kv_indptr = _token_row_slots(all_slots, kv_indptr, ext, positions)
            lens = positions + 1
            ext = np.ones_like(lens)
            qo_indptr = _offsets(ext)
            seq_lens, extend_lens = lens.tolist(), [1] * len(lens)
        return cls(
            mode=mode,
            input_ids=_to_device(input_ids, device),
            positions=_to_device(positions, device),
            out_cache_loc=_to_device(out_loc, device),
            seq_lens=_to_device(lens.astype(np.int32), device),
            extend_lens=_to_device(ext.astype(np.int32), device),
            qo_indptr=_to_device(qo_indptr.astype(np.int32), device),
            kv_indptr=_to_device(kv_indptr.astype(np.int32), device),
            kv_indices=_to_device(all_slots, device),
            logits_indices=_to_device(logits_indices, device),
            seq_lens_cpu=seq_lens,
            extend_lens_cpu=extend_lens,
        )


def _token_row_slots(all_slots: np.ndarray, kv_indptr: np.ndarray, ext: np.ndarray,
                     positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """kv_indices and kv_indptr of one decode row per new token: the row of a token at position
    p lists its sequence's first p + 1 slots (so a sequence's prefix appears once per row)."""
    row_lens = positions + 1
    row_indptr = _offsets(row_lens)
    seq_start = kv_indptr[:-1].repeat(ext)  # where each row's sequence starts in all_slots
    within = np.arange(row_indptr[-1], dtype=np.int64) - row_indptr[:-1].repeat(row_lens)
    return all_slots[seq_start.repeat(row_lens) + within], row_indptr


def _offsets(lengths: np.ndarray) -> np.ndarray:
    """[len + 1] int64 exclusive prefix sums: where each run starts, then the total."""
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    lengths.cumsum(out=out[1:])
    return out


def _new_token_positions(extend_lens: np.ndarray, seq_lens: np.ndarray,
                         qo_indptr: np.ndarray) -> np.ndarray:
    """[T] int64 absolute positions of the new tokens: sequence ``i``'s run is
    ``seq_lens[i] - extend_lens[i] .. seq_lens[i] - 1``."""
    first = seq_lens - extend_lens
    # Row r of sequence i is its (r - qo_indptr[i])-th new token.
    within = np.arange(qo_indptr[-1], dtype=np.int64) - qo_indptr[:-1].repeat(extend_lens)
    return first.repeat(extend_lens) + within


def _logits_indices(logits_rows: list[list[int]] | None, qo_indptr: np.ndarray) -> np.ndarray:
    """Rows of the T new tokens whose logits are wanted (default: each sequence's last)."""
    if logits_rows is None:
        return qo_indptr[1:] - 1
    starts = qo_indptr[:-1].tolist()
    rows = [start + r for start, want in zip(starts, logits_rows) for r in want]
    return np.array(rows, dtype=np.int64)


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on ``device``; on the CPU it shares the array's memory (every array here
    is built for this batch alone)."""
    return to_device(torch.from_numpy(array), device)


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
        slots: pool slots of every token of the sequence up to and including ``new_tokens``
            (int64 numpy array, a view of the request's slots).
        sample: sample a next token from the last row.
        logits_from: first row (within ``new_tokens``) whose logits are wanted for input-token
            logprobs, or None.
        params: the request's sampling parameters.
        prompt_ids / output_ids: for penalties; ``len(output_ids)`` is the sampling step.
        return_logprob / top_logprobs_num: what logprobs to compute.
        bitmask_row: row of the step's bitmask constraining this sequence (of
            ``ScheduledBatch.num_mask_rows``), or None.
        future_tokens: tokens of the sequence that the in-flight step is still sampling: 1 when
            ``new_tokens`` is a :func:`future_token` placeholder (overlap scheduling), else 0.
            They come after ``output_ids``, so the token sampled now is number
            ``len(output_ids) + future_tokens`` (see :attr:`sample_step`).
        epoch: the request's epoch when this row was scheduled; the scheduler drops the row's
            result if the request has stopped running since (finished, aborted, retracted).
    """

    rid: str
    new_tokens: list[int]
    slots: np.ndarray
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
        num_mask_rows: rows of packed allowed-token masks the constrained rows use. The masks
            are filled after the batch is launched, while the device runs its forward pass (the
            grammars first take the tokens of the step before), and reach the runner through
            the launched step (:class:`radixlm.executor.pending.PendingStep`).
    """

    mode: ForwardMode
    seqs: list[ScheduledSeq]
    num_mask_rows: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(len(s.new_tokens) for s in self.seqs)

    @property
    def has_future_tokens(self) -> bool:
        """Some row's input is a placeholder for a token the in-flight step is sampling."""
        return any(s.future_tokens for s in self.seqs)
