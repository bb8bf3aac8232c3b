"""A runner without a model, for measuring the scheduler alone and testing it on CPU.

Its next token is a fixed function of the whole sequence, so a request's output depends only on
its own tokens: chunking, retraction, prefix reuse, batch composition and overlap scheduling
must not change it.

With ``device_ms`` it also emulates an asynchronous device: ``launch`` returns at once with a
step that the "device" runs for ``device_ms`` after the steps launched before it, and
``result()`` sleeps until then, so host work done between launch and result is hidden exactly
as it would be behind a GPU. A batch with constrained rows samples only once its bitmask is
committed: the emulated device finishes such a step no earlier than the commit, so a mask that
comes late shows as device idle time. A row samples the first token its mask allows at or
after the hash (cyclically).

``syncs_on_empty_queue`` counts the ``result()`` calls made while nothing was launched behind
the step waited for: each is a point where a real device would run dry.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from radixlm.batch import ScheduledBatch, ScheduledSeq, future_row
from radixlm.executor.pending import HostMaskBuffers
from radixlm.outputs import SeqStepResult, StepResult

# The null model hashes this many trailing tokens of a sequence (and its length).
HASH_WINDOW = 64


class NullStep:
    """A launched null step: the emulated device finishes it at :attr:`ready_at`.

    Args:
        runner: the runner that launched it.
        index: its launch number.
        tails: per row, (sequence tail, length) to hash, or None where the row does not sample.
        bitmask: host buffer for the step's masks (None: sample at once).
        mask_rows: per row, its mask row or None.
        forward_done: when the emulated forward pass ends.
    """

    def __init__(
        self,
        runner: NullRunner,
        index: int,
        tails: list,
        bitmask: torch.Tensor | None,
        mask_rows: list[int | None],
        forward_done: float,
    ):
        self.runner = runner
        self.index = index
        self.bitmask = bitmask
        self.ready_at = forward_done
        self.token_list: list[int] | None = None
        self._tails = tails
        self._mask_rows = mask_rows
        self._result: StepResult | None = None
        if bitmask is None:
            self.commit_mask()

    @property
    def token_ids(self) -> torch.Tensor:
        if self.token_list is None:
            raise RuntimeError("the step's bitmask was not committed: nothing is sampled yet")
        return torch.tensor(self.token_list, dtype=torch.int64)

    def commit_mask(self) -> None:
        """Sample every row (masked rows within their masks); the device waits for this."""
        if self._result is not None:
            return
        words = None if self.bitmask is None else self.bitmask.numpy().view(np.uint32)
        results, tokens = [], []
        for tail, mask_row in zip(self._tails, self._mask_rows):
            res = SeqStepResult()
            if tail is not None:
                token = self.runner._hash(*tail)
                if mask_row is not None and words is not None:
                    token = _first_allowed(words[mask_row], token, self.runner.vocab_size)
                res.next_token_id, res.logprob = token, 0.0
            results.append(res)
            tokens.append(res.next_token_id or 0)
        self.token_list = tokens
        self._result = StepResult(results)
        if self.bitmask is not None:
            self.ready_at = self.runner._sample_after(self.ready_at)

    def result(self) -> StepResult:
        """Wait for the emulated device, then return the results.

        Returns:
            One SeqStepResult per row of the launched batch.
        """
        if self._result is None:
            raise RuntimeError("result() before commit_mask(): the step never sampled")
        if self.runner.launched == self.index + 1:
            self.runner.syncs_on_empty_queue += 1
        delay = self.ready_at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        return self._result


def _first_allowed(words: np.ndarray, token: int, vocab: int) -> int:
    """The first id allowed by the packed mask row ``words`` (uint32) at or after ``token``,
    wrapping around (``token`` if none is); a scan of words, as cheap as a device would make it.
    """
    w, bit = divmod(token, 32)
    here = int(words[w]) >> bit << bit
    if here:
        return _lowest_id(w, here, token, vocab)
    later = np.flatnonzero(words[w + 1 :])
    if len(later):
        w = w + 1 + int(later[0])
        return _lowest_id(w, int(words[w]), token, vocab)
    earlier = np.flatnonzero(words[: w + 1])
    if len(earlier):
        w = int(earlier[0])
        return _lowest_id(w, int(words[w]), token, vocab)
    return token


def _lowest_id(word_index: int, word: int, fallback: int, vocab: int) -> int:
    found = 32 * word_index + (word & -word).bit_length() - 1
    return found if found < vocab else fallback


class NullRunner:
    """Stands in for ModelRunner.

    Args:
        vocab_size: tokens are drawn from [0, vocab_size).
        eos_token_id: emitted when the sequence hash hits it (so some requests stop early);
            None never emits it on purpose.
        device_ms: emulated device time per step (0: results are ready at launch).
    """

    def __init__(
        self, vocab_size: int = 1000, eos_token_id: int | None = None, device_ms: float = 0.0
    ):
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id
        self.device_seconds = device_ms / 1000.0
        self.device_free_at = 0.0
        self.device_busy_seconds = 0.0
        self.launched = 0
        self.syncs_on_empty_queue = 0
        self._mask_buffers = HostMaskBuffers(pinned=False)

    def next_token(self, seq: list[int]) -> int:
        """The deterministic 'model': a rolling hash of the sequence's last 64 tokens and its
        length."""
        return self._hash(seq[-HASH_WINDOW:], len(seq))

    def _hash(self, tail: list[int], length: int) -> int:
        acc = 17
        for token in tail:
            acc = (acc * 1_000_003 + token) & 0xFFFFFFFF
        return (acc + length) % self.vocab_size

    def forward(self, batch: ScheduledBatch) -> StepResult:
        """Run one step and wait for it (``launch(batch).result()``).

        Returns:
            One SeqStepResult per row of ``batch``.
        """
        return self.launch(batch).result()

    def launch(self, batch: ScheduledBatch, futures: NullStep | None = None) -> NullStep:
        """Read the rows' sequences now; the emulated device runs the step later.

        Args:
            batch: the scheduled rows.
            futures: the step in flight that the batch's placeholders point into.

        Returns:
            The pending step (awaiting its bitmask if the batch has mask rows).

        Raises:
            ValueError: the batch has placeholders and ``futures`` is None.
        """
        if batch.has_future_tokens and futures is None:
            raise ValueError("the batch has placeholder tokens but no step in flight")
        tails = [self._sequence_tail(seq, futures) if seq.sample else None for seq in batch.seqs]
        bitmask = None
        if batch.num_mask_rows and any(t is not None for t in tails):
            bitmask = self._mask_buffers.take(batch.num_mask_rows, -(-self.vocab_size // 32))
        step = NullStep(
            self,
            self.launched,
            tails,
            bitmask,
            [seq.bitmask_row for seq in batch.seqs],
            self._occupy_device(),
        )
        self.launched += 1
        return step

    @staticmethod
    def _sequence_tail(seq: ScheduledSeq, futures: NullStep | None) -> tuple[list[int], int]:
        """The last tokens of the row's sequence and its length, placeholders resolved.

        ``output_ids`` is read now, at launch, as the real runner does: the scheduler appends
        the in-flight token to it only after this step has been launched.
        """
        tail = list(seq.prompt_ids[-HASH_WINDOW:]) + list(seq.output_ids[-HASH_WINDOW:])
        for token in seq.new_tokens[: seq.future_tokens]:
            tail.append(futures.token_list[future_row(token)])
        length = len(seq.prompt_ids) + len(seq.output_ids) + seq.future_tokens
        return tail[-HASH_WINDOW:], length

    def _occupy_device(self) -> float:
        """Queue ``device_seconds`` of work behind the steps launched before; its end time."""
        now = time.perf_counter()
        if not self.device_seconds:
            return now
        start = max(now, self.device_free_at)
        self.device_free_at = start + self.device_seconds
        self.device_busy_seconds += self.device_seconds
        return self.device_free_at

    def _sample_after(self, forward_done: float) -> float:
        """A step's sampling starts when both its forward pass and its mask are there; the
        steps queued behind it shift by the wait."""
        now = time.perf_counter()
        if not self.device_seconds or now <= forward_done:
            return forward_done
        self.device_free_at += now - forward_done
        return now
