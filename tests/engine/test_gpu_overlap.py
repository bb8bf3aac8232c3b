"""Overlap scheduling on the GPU: overlapped launches never wait for the device, same tokens.

CPU tests cover the overlapped scheduler logic; what only a GPU can show is that a launch
with placeholder tokens queues its work without a host synchronisation (pinned copies, the
event, CUDA-graph replay of resolved placeholders), and that the tokens still match serial runs.
"""

from __future__ import annotations

import random

import pytest
import torch

from radixlm.config import EngineConfig
from radixlm.engine import ipc
from radixlm.engine.core import EngineCore
from radixlm.request import LogprobOptions
from radixlm.sampling_params import SamplingParams

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    from radixlm.bench.common import random_model_dir

    return random_model_dir("llama3-1b", cache_dir=tmp_path_factory.mktemp("m"), device="cuda")


def make_core(path, overlap: bool, dtype: str = "bfloat16", graphs: int = 16) -> EngineCore:
    return EngineCore(EngineConfig.from_kwargs(
        model=str(path), dtype=dtype, device="cuda", kv_cache_tokens=32768,
        enable_overlap=overlap, cuda_graph_max_batch_size=graphs), progress=False)


def run_greedy(core: EngineCore, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    outs: dict[str, list[int]] = {f"p{i}": [] for i in range(len(prompts))}
    for i, ids in enumerate(prompts):
        core.add_request(ipc.AddRequest(f"p{i}", ids, params, LogprobOptions()))
    while core.has_work():
        for out in core.step():
            outs[out.rid].extend(out.new_token_ids)
    return [outs[f"p{i}"] for i in range(len(prompts))]


def prompts_for(core: EngineCore, lengths: tuple[int, ...]) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(core.runner.vocab_size) for _ in range(n)] for n in lengths]


def test_overlapped_decode_launches_without_host_sync(model_path):
    core = make_core(model_path, overlap=True)
    launch = core.runner.launch
    checked = []

    def strict_launch(batch, futures=None):
        if not batch.has_future_tokens:
            return launch(batch, futures)
        torch.cuda.set_sync_debug_mode("error")  # any synchronising CUDA call raises
        try:
            return launch(batch, futures)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            checked.append(len(batch.seqs))

    core.runner.launch = strict_launch
    tokens = run_greedy(core, prompts_for(core, (17, 64, 200, 5)), new_tokens=24)
    assert all(len(t) == 24 for t in tokens)
    assert len(checked) >= 20, "steady-state decode steps were launched with placeholders"
    core.check_invariants()


def test_overlap_on_and_off_give_the_same_greedy_tokens(model_path):
    # float32: equal batches give bit-equal logits, so any difference is the loop's fault
    serial = make_core(model_path, overlap=False, dtype="float32")
    prompts = prompts_for(serial, (9, 33, 120, 250, 7, 64))
    expected = run_greedy(serial, prompts, new_tokens=32)
    del serial
    torch.cuda.empty_cache()
    overlapped = make_core(model_path, overlap=True, dtype="float32")
    assert run_greedy(overlapped, prompts, new_tokens=32) == expected


CONSTRAINTS = [
    {"regex": "[0-9a-f]{40}"},
    {"json_schema": '{"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},'
                    ' "age": {"type": "integer"}, "tags": {"type": "array", "maxItems": 5,'
                    ' "items": {"type": "string", "maxLength": 8}}},'
                    ' "required": ["name", "age", "tags"], "additionalProperties": false}'},
    {"choices": ["red", "green", "blue"]},
    None,
]


def run_constrained(core: EngineCore, prompts: list[list[int]]) -> list[list[int]]:
    outs: dict[str, list[int]] = {f"p{i}": [] for i in range(len(prompts))}
    for i, ids in enumerate(prompts):
        extra = CONSTRAINTS[i % len(CONSTRAINTS)] or {"ignore_eos": True}
        params = SamplingParams(max_new_tokens=48, temperature=0.0, **extra)
        core.add_request(ipc.AddRequest(f"p{i}", ids, params, LogprobOptions()))
    while core.has_work():
        for out in core.step():
            outs[out.rid].extend(out.new_token_ids)
    return [outs[f"p{i}"] for i in range(len(prompts))]


@pytest.fixture(scope="module")
def real_tokenizer(model_path):
    from radixlm.model.random_model import preset_tokenizer_dir

    if preset_tokenizer_dir("llama3-1b") is None:
        pytest.skip("the Llama 3 tokenizer is not on this machine (RADIXLM_LLAMA3_TOKENIZER)")


def test_constrained_steps_launch_and_mask_without_host_sync(model_path, real_tokenizer):
    """Masks are filled while the forward pass runs; neither the launch nor the mask upload,
    masking and sampling queued behind it synchronise with the device."""
    core = make_core(model_path, overlap=True)
    launch = core.runner.launch
    checked = []

    def strict(call, *args):
        torch.cuda.set_sync_debug_mode("error")  # any synchronising CUDA call raises
        try:
            return call(*args)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    def strict_launch(batch, futures=None):
        if not batch.has_future_tokens:
            return launch(batch, futures)
        step = strict(launch, batch, futures)
        if step.bitmask is not None:
            commit = step.commit_mask
            step.commit_mask = lambda: (strict(commit), checked.append(len(batch.seqs)))
        return step

    core.runner.launch = strict_launch
    prompts = prompts_for(core, (17, 64, 200, 5, 33, 90, 12, 40))
    run_constrained(core, prompts)
    assert len(checked) >= 10, "constrained decode steps were launched with placeholders"
    core.check_invariants()


def test_constrained_overlap_on_and_off_give_the_same_greedy_tokens(model_path, real_tokenizer):
    serial = make_core(model_path, overlap=False, dtype="float32")
    prompts = prompts_for(serial, (9, 33, 120, 250, 7, 64, 15, 80))
    expected = run_constrained(serial, prompts)
    del serial
    torch.cuda.empty_cache()
    overlapped = make_core(model_path, overlap=True, dtype="float32")
    assert run_constrained(overlapped, prompts) == expected


def test_spliced_decode_rows_replay_in_cuda_graphs_with_eager_tokens(model_path, real_tokenizer):
    """Jump-forward splices ride in decode batches as one row per spliced token, so those steps
    replay the decode graphs (and gather the sampling rows' logits): float32 greedy tokens
    equal a run without graphs, and the graphs did replay splice-carrying steps."""
    eager = make_core(model_path, overlap=True, dtype="float32", graphs=0)
    prompts = prompts_for(eager, (9, 33, 120, 250, 7, 64, 15, 80))
    expected = run_constrained(eager, prompts)
    del eager
    torch.cuda.empty_cache()
    graphed = make_core(model_path, overlap=True, dtype="float32", graphs=32)
    run = graphed.runner.graphs.run
    spliced = []

    def counting_run(batch):
        if batch.logits_indices.shape[0] != batch.batch_size:
            spliced.append(batch.batch_size)
        return run(batch)

    graphed.runner.graphs.run = counting_run
    assert run_constrained(graphed, prompts) == expected
    assert spliced, "no splice-carrying decode step replayed a graph"
    graphed.check_invariants()
