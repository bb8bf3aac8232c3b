"""Which logits rows a batch asks for, and the prompt-token logprobs read from them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from radixlm.batch import ScheduledSeq
from radixlm.outputs import SeqStepResult
from radixlm.transfer import int_tensor


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


@dataclass
class InputLogprobs:
    """Prompt-token logprobs of one sequence, still on the device.

    Attributes:
        seq_index: the sequence's row in the batch.
        values: [R] float32 logprob of each following prompt token.
        top_values / top_ids: [R, k] top-k alternatives, or None when not asked for.
    """

    seq_index: int
    values: torch.Tensor
    top_values: torch.Tensor | None
    top_ids: torch.Tensor | None


def input_logprobs_on_device(
    seqs: list[ScheduledSeq], logits: torch.Tensor, layout: LogitsLayout
) -> list[InputLogprobs]:
    """Prompt-token logprobs for the sequences that asked for them, without a host sync.

    Row ``r`` of a sequence predicts the token at absolute position ``start + r + 1``; only
    rows whose target is still a prompt token count.
    """
    out = []
    for i, seq in enumerate(seqs):
        if seq.logits_from is None:
            continue
        start = len(seq.slots) - len(seq.new_tokens)
        rows = [r for r in layout.rows_per_seq[i] if start + r + 1 < len(seq.prompt_ids)]
        if not rows:
            continue
        offset = layout.first_row[i] - layout.rows_per_seq[i][0]
        index = int_tensor([offset + r for r in rows], logits.device)
        logprobs = torch.log_softmax(logits[index].float(), dim=-1)
        targets = int_tensor([seq.prompt_ids[start + r + 1] for r in rows], logits.device)
        values = logprobs.gather(1, targets[:, None])[:, 0]
        top_values = top_ids = None
        if seq.top_logprobs_num:
            top_values, top_ids = logprobs.topk(seq.top_logprobs_num, dim=-1)
        out.append(InputLogprobs(i, values, top_values, top_ids))
    return out


def store_input_logprobs(
    found: list[InputLogprobs], host: list[list | None], results: list[SeqStepResult]
) -> None:
    """Fill ``input_logprobs`` (and top-k) from the host copies of ``found``.

    Args:
        found: what :func:`input_logprobs_on_device` returned.
        host: ``values, top_values, top_ids`` of each entry of ``found``, as lists, in order.
        results: the batch's per-row results.
    """
    for k, item in enumerate(found):
        values, top_values, top_ids = host[3 * k : 3 * k + 3]
        res = results[item.seq_index]
        res.input_logprobs = values
        if top_values is not None:
            res.input_top_logprobs = [list(zip(v, t)) for v, t in zip(top_values, top_ids)]
