"""Which logits rows a batch asks for, and the prompt-token logprobs read from them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from radixlm.batch import ScheduledSeq
from radixlm.outputs import SeqStepResult


@dataclass
class LogitsLayout:
    """Rows of the model's logits output, per sequence.

    Attributes:
        rows_per_seq: for each sequence, its new-token rows whose logits are computed.
        first_row: index in the logits tensor of each sequence's first row.
        last_row: index in the logits tensor of each sequence's last row (the sampling row).
    """

    rows_per_seq: list[list[int]]
    first_row: list[int]
    last_row: list[int]

    @classmethod
    def of(cls, seqs: list[ScheduledSeq]) -> LogitsLayout:
        rows_per_seq, first, last, offset = [], [], [], 0
        for seq in seqs:
            n = len(seq.new_tokens)
            start = n - 1 if seq.logits_from is None else seq.logits_from
            rows_per_seq.append(list(range(start, n)))
            first.append(offset)
            offset += n - start
            last.append(offset - 1)
        return cls(rows_per_seq, first, last)


def gather_input_logprobs(
    seqs: list[ScheduledSeq],
    logits: torch.Tensor,
    layout: LogitsLayout,
    results: list[SeqStepResult],
) -> None:
    """Fill ``input_logprobs`` (and top-k) for sequences that asked for prompt logprobs.

    Row ``r`` of a sequence predicts the token at absolute position ``start + r + 1``; only
    rows whose target is still a prompt token count.
    """
    for i, seq in enumerate(seqs):
        if seq.logits_from is None:
            continue
        start = len(seq.slots) - len(seq.new_tokens)
        rows = [r for r in layout.rows_per_seq[i] if start + r + 1 < len(seq.prompt_ids)]
        if not rows:
            continue
        offset = layout.first_row[i] - layout.rows_per_seq[i][0]
        index = torch.tensor([offset + r for r in rows], device=logits.device)
        logprobs = torch.log_softmax(logits[index].float(), dim=-1)
        targets = torch.tensor([seq.prompt_ids[start + r + 1] for r in rows], device=logits.device)
        results[i].input_logprobs = logprobs.gather(1, targets[:, None])[:, 0].tolist()
        if seq.top_logprobs_num:
            values, ids = logprobs.topk(seq.top_logprobs_num, dim=-1)
            results[i].input_top_logprobs = [
                list(zip(v, t)) for v, t in zip(values.tolist(), ids.tolist())
            ]
