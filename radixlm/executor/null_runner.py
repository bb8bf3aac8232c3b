"""A runner without a model, for measuring the scheduler alone and testing it on CPU.

Its next token is a fixed function of the whole sequence, so a request's output depends only on
its own tokens: chunking, retraction, prefix reuse and batch composition must not change it.
"""

from __future__ import annotations

from radixlm.batch import ScheduledBatch
from radixlm.outputs import SeqStepResult, StepResult


class NullRunner:
    """Stands in for ModelRunner.

    Args:
        vocab_size: tokens are drawn from [0, vocab_size).
        eos_token_id: emitted when the sequence hash hits it (so some requests stop early);
            None never emits it on purpose.
    """

    def __init__(self, vocab_size: int = 1000, eos_token_id: int | None = None):
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id

    def next_token(self, seq: list[int]) -> int:
        """The deterministic 'model': a rolling hash of the sequence."""
        acc = 17
        for token in seq[-64:]:
            acc = (acc * 1_000_003 + token) & 0xFFFFFFFF
        return (acc + len(seq)) % self.vocab_size

    def forward(self, batch: ScheduledBatch) -> StepResult:
        results = []
        for seq in batch.seqs:
            res = SeqStepResult()
            if seq.sample:
                res.next_token_id = self.next_token(list(seq.prompt_ids) + list(seq.output_ids))
                res.logprob = 0.0
            results.append(res)
        return StepResult(results)
