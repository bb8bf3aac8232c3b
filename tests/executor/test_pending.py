"""Placeholders for in-flight tokens and the launch/result split, on CPU."""

from __future__ import annotations

import torch

from radixlm.batch import ForwardMode, ScheduledBatch, ScheduledSeq, future_row, future_token
from radixlm.executor.model_runner import resolve_future_tokens
from radixlm.executor.null_runner import NullRunner
from radixlm.executor.pending import HostTransfer
from radixlm.sampling_params import SamplingParams


def test_placeholders_round_trip_and_never_collide_with_token_ids():
    assert [future_token(r) for r in range(3)] == [-1, -2, -3]
    assert [future_row(future_token(r)) for r in range(3)] == [0, 1, 2]
    assert future_row(0) is None and future_row(128000) is None


def test_resolve_future_tokens_gathers_the_in_flight_rows():
    sampled = torch.tensor([70, 71, 72, 73])
    ids = torch.tensor([future_token(2), 5, future_token(0), 127999, future_token(3)])
    assert resolve_future_tokens(ids, sampled).tolist() == [72, 5, 70, 127999, 73]


def test_host_transfer_on_cpu_returns_lists():
    transfer = HostTransfer([torch.tensor([1, 2]), None, torch.tensor([[0.5], [0.25]])])
    assert transfer.wait() == [[1, 2], None, [[0.5], [0.25]]]


def _row(rid: str, tokens: list[int], prompt: list[int], output: list[int],
         future: int = 0) -> ScheduledSeq:
    slots = torch.arange(len(prompt) + len(output) + future)
    return ScheduledSeq(rid=rid, new_tokens=tokens, slots=slots, sample=True,
                        params=SamplingParams(max_new_tokens=10), prompt_ids=prompt,
                        output_ids=output, future_tokens=future)


def test_null_runner_reads_a_placeholder_from_the_step_in_flight():
    runner = NullRunner(vocab_size=1000)
    first = runner.launch(ScheduledBatch(ForwardMode.DECODE, [_row("a", [9], [1, 2], [9])]))
    token = first.result().seqs[0].next_token_id
    assert first.token_ids.tolist() == [token]
    second = runner.launch(ScheduledBatch(ForwardMode.DECODE,
                                          [_row("a", [future_token(0)], [1, 2], [9], 1)]),
                           futures=first)
    assert second.result().seqs[0].next_token_id == runner.next_token([1, 2, 9, token])


def test_sample_step_counts_the_token_in_flight():
    assert _row("a", [future_token(0)], [1], [4, 5], future=1).sample_step == 3
    assert _row("a", [5], [1], [4, 5]).sample_step == 2
