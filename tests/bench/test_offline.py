"""`radixlm bench offline`: datasets, the roofline's view of them, and runs on a tiny CPU model."""

from __future__ import annotations

import json
import random

import pytest

from radixlm.bench import offline
from radixlm.bench.offline import (
    BenchRequest,
    random_dataset,
    roofline_concurrency,
    shared_prefix_dataset,
    work_items,
)


def test_random_dataset_lengths():
    fixed = random_dataset(random.Random(0), 20, 30, 7, 1.0, vocab=100)
    assert all(len(r.input_ids) == 30 and r.output_len == 7 for r in fixed)
    assert all(0 <= t < 100 for r in fixed for t in r.input_ids)
    ranged = random_dataset(random.Random(0), 200, 40, 10, 0.5, vocab=100)
    assert {len(r.input_ids) for r in ranged} <= set(range(20, 41))
    assert {r.output_len for r in ranged} <= set(range(5, 11))
    assert len({len(r.input_ids) for r in ranged}) > 5


def test_shared_prefix_dataset_groups_share_exactly_the_system_prompt():
    reqs = shared_prefix_dataset(
        random.Random(0),
        groups=3,
        per_group=4,
        system_len=10,
        question_len=5,
        output_len=2,
        vocab=1000,
    )
    assert len(reqs) == 12
    assert [r.group for r in reqs[:6]] == [0, 1, 2, 0, 1, 2]  # arrivals interleave groups
    for g in range(3):
        members = [r.input_ids for r in reqs if r.group == g]
        assert len({tuple(m[:10]) for m in members}) == 1
        assert len({tuple(m[10:]) for m in members}) == 4
        assert all(len(m) == 15 for m in members)
    assert len({tuple(r.input_ids[:10]) for r in reqs}) == 3


def test_work_items_count_each_shared_prefix_once_with_radix():
    reqs = [BenchRequest([0] * 12, 3, group=g, shared_len=10) for g in (0, 1, 0, 0, 1)]
    on = work_items(reqs, radix=True)
    assert [i.cached_len for i in on] == [0, 0, 10, 10, 10]
    assert all(i.cached_len == 0 for i in work_items(reqs, radix=False))
    # unique KV per request: (2 x 12 + 3 x 2 + 5 x 3) / 5 = 9 tokens
    assert roofline_concurrency(on, kv_capacity=45, max_running=100) == 5
    assert roofline_concurrency(on, kv_capacity=27, max_running=100) == 3
    assert roofline_concurrency(on, kv_capacity=10**6, max_running=2) == 2


def _run(args: list[str], out, ceilings: list[str]) -> dict:
    assert offline.main([*args, "--out", str(out), *ceilings]) == 0
    return json.loads(out.read_text())["results"]


def test_offline_random_counts_every_token_and_runs_hf(bench_model_dir, tmp_path, ceilings):
    rows = _run(
        [
            "--model",
            str(bench_model_dir),
            "--num-requests",
            "6",
            "--input-len",
            "12",
            "--output-len",
            "5",
            "--range-ratio",
            "0.5",
            "--warmup-requests",
            "1",
            "--baseline",
            "hf",
            "--hf-batch-size",
            "4",
        ],
        tmp_path / "r.json",
        ceilings,
    )
    reqs = random_dataset(random.Random(0), 6, 12, 5, 0.5, vocab=512)
    ours, hf = rows
    assert ours["output_tokens"] == sum(r.output_len for r in reqs)
    assert ours["prompt_tokens"] == sum(len(r.input_ids) for r in reqs)
    assert ours["output_tok_s"] == pytest.approx(ours["output_tokens"] / ours["wall_s"])
    assert 0 < ours["roof_s"] < ours["wall_s"]
    assert hf["requests"] == 6
    assert hf["radixlm_speedup"] == pytest.approx(ours["output_tok_s"] / hf["output_tok_s"])


@pytest.mark.parametrize("radix", [True, False])
def test_offline_shared_prefix_hits_the_cache_only_with_radix(
    bench_model_dir, tmp_path, radix, ceilings
):
    args = [
        "--model",
        str(bench_model_dir),
        "--dataset",
        "shared-prefix",
        "--groups",
        "2",
        "--prompts-per-group",
        "3",
        "--system-len",
        "40",
        "--question-len",
        "6",
        "--output-len",
        "3",
        "--warmup-requests",
        "1",
    ]
    extra = [] if radix else ["--disable-radix-cache"]
    row = _run(args + extra, tmp_path / "s.json", ceilings)[0]
    assert row["output_tokens"] == 6 * 3
    if radix:  # every prompt but the first of its group reuses the 40 shared tokens
        assert 2 * 2 * 40 <= row["cached_tokens"] < 2 * 2 * 46
    else:
        assert row["cached_tokens"] == 0


@pytest.mark.slow
def test_offline_through_the_engine_process(bench_model_dir, tmp_path, ceilings):
    rows = _run(
        [
            "--model",
            str(bench_model_dir),
            "--num-requests",
            "4",
            "--input-len",
            "10",
            "--output-len",
            "4",
            "--warmup-requests",
            "1",
            "--engine-process",
        ],
        tmp_path / "e.json",
        ceilings,
    )
    assert rows[0]["output_tokens"] == 16 and rows[0]["backend"].endswith("[Engine]")


class _AbortingCore:
    """Stands in for EngineCore: the second request is aborted as a failed forward pass is."""

    def __init__(self):
        self.rids: list[str] = []
        self.done = False

    def add_request(self, msg) -> None:
        self.rids.append(msg.rid)

    def has_work(self) -> bool:
        return not self.done

    def step(self):
        from radixlm.outputs import TokenOutput
        from radixlm.request import FinishKind, FinishReason

        self.done = True
        ok = TokenOutput(self.rids[0], [7], finish=FinishReason(FinishKind.LENGTH))
        bad = TokenOutput(
            self.rids[1], [], finish=FinishReason(FinishKind.ABORT, message="forward failed")
        )
        return [ok, bad]


def test_aborted_requests_are_reported():
    import torch

    reqs = [BenchRequest([1, 2], 1), BenchRequest([3, 4], 1)]
    run = offline._drive(_AbortingCore(), reqs, "t", torch.device("cpu"))
    assert run.output_tokens == 1
    assert run.aborted == ["t-1: forward failed"]


def test_offline_constrained_with_a_real_tokenizer(tiny_llama3_dir, tmp_path, ceilings):
    """--choices (like --regex/--json-schema) compiles against the model's real tokenizer and
    every request ends with one of the choices (EOS ignored, the grammar completes)."""
    rows = _run(
        [
            "--model",
            str(tiny_llama3_dir),
            "--num-requests",
            "4",
            "--input-len",
            "8",
            "--output-len",
            "8",
            "--warmup-requests",
            "1",
            "--choices",
            "red",
            "green",
            "blue",
        ],
        tmp_path / "c.json",
        ceilings,
    )
    ours = rows[0]
    assert not ours.get("aborted")
    assert 4 <= ours["output_tokens"] < 4 * 8  # each choice is a token or two, then EOS


def test_matched_control_requests_carry_the_produced_lengths_unconstrained():
    reqs = [
        BenchRequest([5, 6, 7], 32, constraint={"regex": "[0-9a-f]{64}"}),
        BenchRequest([8, 9], 32, group=1, shared_len=1, constraint={"regex": "[0-9a-f]{64}"}),
    ]
    control = offline.matched_control(reqs, [11, 0])
    assert [c.input_ids for c in control] == [[5, 6, 7], [8, 9]]
    assert [(c.group, c.shared_len) for c in control] == [(-1, 0), (1, 1)]
    params = [c.sampling_params() for c in control]
    assert params == [
        {"max_new_tokens": 11, "temperature": 0.0, "ignore_eos": True},
        {"max_new_tokens": 0, "temperature": 0.0, "ignore_eos": True},
    ]
    with pytest.raises(ValueError):  # one count per request, no silent truncation
        offline.matched_control(reqs, [11])


def test_work_items_use_the_tokens_each_request_produced():
    reqs = [BenchRequest([0] * 12, 128), BenchRequest([0] * 9, 128)]
    assert [i.output_len for i in work_items(reqs, radix=True)] == [128, 128]
    items = work_items(reqs, radix=True, output_lens=[40, 3])
    assert [(i.prompt_len, i.output_len) for i in items] == [(12, 40), (9, 3)]


def test_matched_control_needs_a_constraint(bench_model_dir):
    with pytest.raises(SystemExit):
        offline.parse_args(["--model", str(bench_model_dir), "--matched-control"])


def _check_matched_control(out, num_requests: int, cap: int, max_tokens: int) -> None:
    payload = json.loads(out.read_text())
    constrained, control = payload["results"]
    assert "matched control" in control["backend"]
    produced = constrained["output_tokens_per_request"]
    assert len(produced) == num_requests
    assert all(1 <= n <= max_tokens < cap for n in produced)  # the grammar ended them early
    assert constrained["output_tokens"] == sum(produced)
    assert constrained["output_tokens_mean"] == pytest.approx(sum(produced) / num_requests)
    # the control moved exactly the same tokens, request by request, over the same prompts
    assert control["output_tokens_per_request"] == produced
    assert control["output_tokens"] == constrained["output_tokens"]
    assert control["prompt_tokens"] == constrained["prompt_tokens"] == num_requests * 8
    # unique random prompts, cache flushed between the runs: neither reuses the other's KV
    assert constrained["cached_tokens"] == control["cached_tokens"] == 0
    assert constrained["aborted"] == control["aborted"] == 0
    assert constrained["roof_s"] == pytest.approx(control["roof_s"])  # same work, same floor
    ratios = payload["matched_control"]
    assert ratios["same_tokens"] is True
    assert ratios["output_tok_s_ratio"] == pytest.approx(
        constrained["output_tok_s"] / control["output_tok_s"]
    )
    assert ratios["ttft_p50_ratio"] == pytest.approx(
        constrained["ttft_p50_s"] / control["ttft_p50_s"]
    )
    assert constrained["vs_control_output_tok_s"] == ratios["output_tok_s_ratio"]


def test_offline_regex_with_matched_control(tiny_llama3_dir, tmp_path, ceilings, capsys):
    """16 hex digits take at most 16 tokens and EOS, far below the 32-token cap; the control
    replays each request's count unconstrained."""
    out = tmp_path / "m.json"
    assert (
        offline.main(
            [
                "--model",
                str(tiny_llama3_dir),
                "--num-requests",
                "6",
                "--input-len",
                "8",
                "--output-len",
                "32",
                "--warmup-requests",
                "1",
                "--regex",
                "[0-9a-f]{16}",
                "--matched-control",
                "--out",
                str(out),
                *ceilings,
            ]
        )
        == 0
    )
    _check_matched_control(out, 6, cap=32, max_tokens=17)
    printed = capsys.readouterr().out
    assert "radixlm regex" in printed and "radixlm matched control" in printed
    assert "constrained / matched control: output tok/s" in printed


@pytest.mark.slow
def test_offline_matched_control_through_the_engine_process(tiny_llama3_dir, tmp_path, ceilings):
    out = tmp_path / "me.json"
    assert (
        offline.main(
            [
                "--model",
                str(tiny_llama3_dir),
                "--num-requests",
                "4",
                "--input-len",
                "8",
                "--output-len",
                "12",
                "--warmup-requests",
                "1",
                "--choices",
                "red",
                "green",
                "blue",
                "--matched-control",
                "--engine-process",
                "--out",
                str(out),
                *ceilings,
            ]
        )
        == 0
    )
    _check_matched_control(out, 4, cap=12, max_tokens=3)  # a colour is 1-2 tokens, then EOS
