"""Data handed between stages after a forward pass: executor -> scheduler -> caller."""

from __future__ import annotations

from dataclasses import dataclass, field

from radixlm.request import FinishReason

# (logprob, token_id) pairs; the caller's process adds token text.
TokenLogprob = tuple[float | None, int]


@dataclass
class SeqStepResult:
    """What one forward pass produced for one sequence.

    Attributes:
        next_token_id: the sampled token, or None when the sequence did not sample (a
            non-final prefill chunk, or max_new_tokens == 0).
        logprob: log_softmax of the raw logits at the sampled token.
        top_logprobs: top-k (logprob, token_id) at the sampling position.
        input_logprobs: logprobs of prompt tokens computed in this pass, in order.
        input_top_logprobs: top-k alternatives at those prompt positions.
    """

    next_token_id: int | None = None
    logprob: float | None = None
    top_logprobs: list[TokenLogprob] | None = None
    input_logprobs: list[float] = field(default_factory=list)
    input_top_logprobs: list[list[TokenLogprob]] = field(default_factory=list)


@dataclass
class StepResult:
    """The executor's answer to one ScheduledBatch, row for row."""

    seqs: list[SeqStepResult]
    forward_seconds: float = 0.0


@dataclass
class TokenOutput:
    """New output of one request after one scheduler step (sent to the caller's process).

    Attributes:
        rid: request id.
        new_token_ids: tokens appended this step (several when jump-forward spliced text).
        output_logprobs: one (logprob, id) per new sampled token, when asked for.
        output_top_logprobs: top-k per new sampled token, when asked for.
        input_logprobs: prompt-token logprobs, sent once when the prefill finishes; the first
            entry is None when it is the first prompt token.
        input_top_logprobs: top-k for those prompt positions.
        finish: set on the request's last output.
        prompt_tokens / cached_tokens: sent with every output for simplicity.
        jump_forward_tokens: tokens appended without model steps so far.
    """

    rid: str
    new_token_ids: list[int]
    output_logprobs: list[TokenLogprob] = field(default_factory=list)
    output_top_logprobs: list[list[TokenLogprob]] = field(default_factory=list)
    input_logprobs: list[TokenLogprob] | None = None
    input_top_logprobs: list[list[TokenLogprob] | None] | None = None
    finish: FinishReason | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    jump_forward_tokens: int = 0
