"""A runner without a model, for measuring the scheduler alone and testing it on CPU.

Its next token is a fixed function of the whole sequence, so a request's output depends only on
its own tokens: chunking, retraction, prefix reuse, batch composition and overlap scheduling
must not change it.

With ``device_ms`` it also emulates an asynchronous device: ``launch`` returns at once with a
step that the "device" runs for ``device_ms`` after the steps launched before it, and
``result()`` sleeps until then, so host work done between launch and result is hidden exactly
as it would be behind a GPU.
"""

from __future__ import annotations

import time

import torch

from radixlm.batch import ScheduledBatch, ScheduledSeq, future_row
from radixlm.outputs import SeqStepResult, StepResult

# The null model hashes this many trailing tokens of a sequence (and its length).
HASH_WINDOW = 64


class NullStep:
    """A launched null step: its results are known, the emulated device finishes at ``ready_at``.

    Args:
        result: the step's results.
        token_list: sampled id per row (0 where a row does not sample).
        ready_at: ``time.perf_counter()`` value at which the emulated device is done.
    """

    def __init__(self, result: StepResult, token_list: list[int], ready_at: float):
        self.token_list = token_list
        self.token_ids = torch.tensor(token_list, dtype=torch.int64)
        self.ready_at = ready_at
        self._result = result

    def result(self) -> StepResult:
        """Wait for the emulated device, then return the results.

        Returns:
            One SeqStepResult per row of the launched batch.
        """
        delay = self.ready_at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        return self._result


class NullRunner:
    """Stands in for ModelRunner.

    Args:
        vocab_size: tokens are drawn from [0, vocab_size).
        eos_token_id: emitted when the sequence hash hits it (so some requests stop early);
            None never emits it on purpose.
        device_ms: emulated device time per step (0: results are ready at launch).
    """

    def __init__(self, vocab_size: int = 1000, eos_token_id: int | None = None,
                 device_ms: float = 0.0):
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id
        self.device_seconds = device_ms / 1000.0
        self.device_free_at = 0.0
        self.device_busy_seconds = 0.0

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
        """Compute the step's tokens now; the emulated device finishes it later.

        Args:
            batch: the scheduled rows.
            futures: the step in flight that the batch's placeholders point into.

        Returns:
            The pending step.

        Raises:
            ValueError: the batch has placeholders and ``futures`` is None.
        """
        if batch.has_future_tokens and futures is None:
            raise ValueError("the batch has placeholder tokens but no step in flight")
        results, token_ids = [], []
        for seq in batch.seqs:
            res = SeqStepResult()
            if seq.sample:
                tail, length = self._sequence_tail(seq, futures)
                res.next_token_id = self._hash(tail, length)
                res.logprob = 0.0
            results.append(res)
            token_ids.append(res.next_token_id or 0)
        return NullStep(StepResult(results), token_ids, self._occupy_device())

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
