"""Tensor parallelism on CPU (gloo, fp32): TP=2 and TP=4 engines against the TP=1 engine.

Each tiny model runs one workload through the scheduler (a cached prefix hit, prompts longer than
the prefill chunk, and a pool too small for every request at once, so requests are retracted)
with greedy sampling: the tokens must be identical to TP=1's and every logprob within 1e-5:
chosen tokens, top 3, every prompt token's, and for one request the whole vocabulary's at every
step (the log-softmax of the gathered logits: the logits up to a constant per row). The models
cover KV heads split, KV heads fewer than the ranks (replicated), one KV head, Qwen2's biases,
Qwen3's q/k norms and a tied head, and vocabularies that do not divide by the rank count. On CPU
worker processes come from one fork server, so after the first start an engine with 4 ranks
starts in about a second.
"""

from __future__ import annotations

import os
import random
import re
import sys
import threading
import time
from pathlib import Path

import pytest

from radixlm.bench.common import write_synthetic_tokenizer
from radixlm.config import EngineConfig
from radixlm.engine import ipc
from radixlm.engine.core import EngineCore
from radixlm.executor.errors import RunnerDeadError
from radixlm.model.random_model import make_random_model_dir
from radixlm.request import LogprobOptions
from radixlm.sampling_params import SamplingParams
from radixlm.tokenizer.tokenizer import load_tokenizer

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="gloo workers tested on Linux")

# name -> (arch, config overrides); heads 4, head_dim 16, hidden 64 unless overridden.
MODELS: dict[str, tuple[str, dict]] = {
    # 2 KV heads: split at TP=2, replicated (2 ranks per head) at TP=4; 509 rows pad per rank.
    "llama": ("llama", {"num_key_value_heads": 2, "vocab_size": 509}),
    # one KV head (replicated on every rank), q/k/v biases.
    "qwen2": ("qwen2", {"num_key_value_heads": 1, "vocab_size": 500}),
    # as many KV heads as query heads (split everywhere), q/k norms, tied embedding/LM head.
    "qwen3": ("qwen3", {"num_key_value_heads": 4, "vocab_size": 512, "tie_word_embeddings": True}),
}
# outlines: llguidance cannot read the synthetic word-level tokenizer (no constraint is used).
# A pool too small for the second wave, and no output reservation at admission: retractions.
ENGINE = dict(
    kv_cache_tokens=100,
    max_running_requests=8,
    init_new_token_ratio=0.0,
    chunked_prefill_size=8,
    random_seed=0,
    grammar_backend="outlines",
    device="cpu",  # gloo on CPU even where CUDA exists (TP=4 needs no 4 GPUs)
)
TOL = 1e-5


def make_model(root: Path, name: str) -> Path:
    arch, overrides = MODELS[name]
    path = make_random_model_dir(root / name, arch, seed=1, **overrides)
    write_synthetic_tokenizer(path, overrides["vocab_size"], 1, 2)
    return path


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tp-models")
    return {name: make_model(root, name) for name in MODELS}


def make_core(path: Path, tp: int, **kwargs) -> EngineCore:
    config = EngineConfig.from_kwargs(model=str(path), tp_size=tp, **{**ENGINE, **kwargs})
    return EngineCore(config, progress=False)


def workload(vocab: int) -> list[list[tuple[str, list[int], SamplingParams, LogprobOptions]]]:
    """Two waves: one request that fills the cache, then six that share its prompt's first
    14 tokens (prefix hits), each prompt longer than a prefill chunk, together needing more KV
    than the pool holds (retraction)."""
    rng = random.Random(7)
    shared = [rng.randrange(3, vocab) for _ in range(14)]
    greedy = dict(temperature=0.0, ignore_eos=True)
    lp = LogprobOptions(return_logprob=True, top_logprobs_num=3)
    # every token's logprob at every step: the whole log-softmax row, i.e. the logits up to
    # one constant per row
    whole_row = LogprobOptions(return_logprob=True, top_logprobs_num=vocab)
    first = [
        (
            "w0",
            shared + [rng.randrange(3, vocab) for _ in range(4)],
            SamplingParams(max_new_tokens=4, **greedy),
            LogprobOptions(return_logprob=True, logprob_start_len=0),
        )
    ]
    second = [
        (
            f"w{i}",
            shared + [rng.randrange(3, vocab) for _ in range(rng.randint(3, 9))],
            SamplingParams(max_new_tokens=rng.randint(14, 18), **greedy),
            whole_row if i == 1 else lp,
        )
        for i in range(1, 7)
    ]
    return [first, second]


def run_workload(core: EngineCore, waves) -> dict[str, dict]:
    results: dict[str, dict] = {}
    for wave in waves:
        for rid, ids, params, lp in wave:
            core.add_request(ipc.AddRequest(rid, ids, params, lp))
            results[rid] = {"ids": [], "logprobs": [], "top": [], "input": None, "cached": 0}
        while core.has_work():
            for out in core.step():
                r = results[out.rid]
                r["ids"] += out.new_token_ids
                r["logprobs"] += out.output_logprobs
                r["top"] += out.output_top_logprobs
                r["cached"] = max(r["cached"], out.cached_tokens)
                if out.input_logprobs is not None:
                    r["input"] = out.input_logprobs
            core.check_invariants()
    assert core.flush_cache()
    info = core.server_info()
    assert info["kv_free_tokens"] == info["kv_capacity_tokens"]
    results["_info"] = info
    return results


@pytest.fixture(scope="module")
def reference(model_dirs) -> dict[str, dict]:
    """TP=1 results per model (in this process, no worker)."""
    out = {}
    for name, path in model_dirs.items():
        core = make_core(path, 1)
        out[name] = run_workload(core, workload(MODELS[name][1]["vocab_size"]))
        core.close()
    return out


def _close(a: list, b: list) -> bool:
    """Element-wise equal ids and logprobs within TOL, through nested lists/tuples."""
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return abs(a - b) <= TOL
    return a == b


def _close_top(a: list, b: list) -> bool:
    """Top-k lists per position: values within TOL rank for rank, and each id's logprob within
    TOL of the other side's (ids may swap places only among values within TOL of each other, or
    leave the list at its last place)."""
    if len(a) != len(b):
        return False
    for row_a, row_b in zip(a, b):
        if len(row_a) != len(row_b):
            return False
        if any(abs(x[0] - y[0]) > TOL for x, y in zip(row_a, row_b)):
            return False
        other = {tok: v for v, tok in row_b}
        last = row_b[-1][0]
        for v, tok in row_a:
            if abs(v - other.get(tok, last)) > TOL:
                return False
    return True


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("name", list(MODELS))
def test_tp_matches_single_device(model_dirs, reference, name, tp):
    core = make_core(model_dirs[name], tp)
    try:
        got = run_workload(core, workload(MODELS[name][1]["vocab_size"]))
    finally:
        core.close()
    ref = reference[name]
    info = got.pop("_info")
    ref_info = ref["_info"]
    assert info["num_retractions"] > 0 and info["num_cached_tokens"] > 0
    assert (info["num_retractions"], info["num_cached_tokens"]) == (
        ref_info["num_retractions"],
        ref_info["num_cached_tokens"],
    )
    assert info["tp_size"] == tp and len(info["tp_ranks"]) == tp
    assert all(r["kv_capacity_tokens"] == info["kv_capacity_tokens"] for r in info["tp_ranks"])
    for rid, r in got.items():
        want = ref[rid]
        assert r["ids"] == want["ids"], rid
        assert _close(r["logprobs"], want["logprobs"]), rid
        assert _close_top(r["top"], want["top"]), rid
        assert _close(r["input"], want["input"]), rid
    assert got["w0"]["input"] is not None and len(got["w0"]["input"]) > 10
    assert {len(top) for top in got["w1"]["top"]} == {MODELS[name][1]["vocab_size"]}


def test_tp_serial_steps_match(model_dirs, reference):
    """Without overlap scheduling (no placeholder tokens) the same tokens come out."""
    core = make_core(model_dirs["llama"], 2, enable_overlap=False)
    pids = core.runner.workers.pids
    try:
        got = run_workload(core, workload(MODELS["llama"][1]["vocab_size"]))
    finally:
        core.close()
    assert wait_gone(pids) == []  # a clean close leaves no worker behind
    for rid, r in got.items():
        if rid != "_info":
            assert r["ids"] == reference["llama"][rid]["ids"], rid


def test_unshardable_model_is_refused_before_any_worker_starts(model_dirs):
    with pytest.raises(ValueError, match="num_attention_heads=4 is not divisible by tp_size=3"):
        make_core(model_dirs["llama"], 3)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_gone(pids: list[int], seconds: float = 5) -> list[int]:
    """The pids still alive after up to ``seconds``."""
    deadline = time.monotonic() + seconds
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


def test_killed_rank_fails_the_core_within_seconds_and_leaves_no_process(model_dirs):
    core = make_core(model_dirs["llama"], 2, kv_cache_tokens=2048)
    pids = core.runner.workers.pids
    try:
        params = SamplingParams(max_new_tokens=1000, temperature=0.0, ignore_eos=True)
        core.add_request(ipc.AddRequest("long", list(range(3, 40)), params))
        for _ in range(3):
            core.step()
        os.kill(pids[1], 9)
        started = time.monotonic()
        with pytest.raises(RunnerDeadError, match="rank 1 .* killed by signal 9"):
            for _ in range(10_000):
                core.step()
        assert time.monotonic() - started < 5
    finally:
        core.close()
    assert wait_gone(pids) == []


def test_two_nodes_on_one_host(model_dirs, reference):
    """--nnodes 2: node 0 runs the core and rank 0, node 1 (here a thread of this process) only
    rank 1; both meet at --dist-init-addr. Node 1 returns 0 once rank 0 stops it."""
    from radixlm.engine.tp_node import serve_worker_node
    from radixlm.executor.tp_worker import free_port

    addr = f"127.0.0.1:{free_port()}"
    nodes = dict(tp_size=2, nnodes=2, dist_init_addr=addr)
    node1 = EngineConfig.from_kwargs(
        model=str(model_dirs["qwen2"]), node_rank=1, **{**ENGINE, **nodes}
    )
    status: list[int] = []
    thread = threading.Thread(target=lambda: status.append(serve_worker_node(node1)))
    thread.start()
    core = make_core(model_dirs["qwen2"], 2, nnodes=2, dist_init_addr=addr)
    try:
        assert len(core.runner.workers.pids) == 1  # node 0 holds rank 0 only
        got = run_workload(core, workload(MODELS["qwen2"][1]["vocab_size"]))
    finally:
        core.close()
    thread.join(30)
    assert status == [0]
    for rid, r in got.items():
        if rid != "_info":
            assert r["ids"] == reference["qwen2"][rid]["ids"], rid


def test_constrained_rows_match(tmp_path_factory, llama2_tokenizer_dir):
    """Grammar masks are filled by the core after launch and sent to every rank (commit_mask);
    a regex-constrained row and a free row in one batch give TP=1's tokens."""
    path = make_random_model_dir(
        tmp_path_factory.mktemp("tp-regex") / "m",
        "llama",
        seed=2,
        tokenizer_dir=llama2_tokenizer_dir,
        num_key_value_heads=2,
    )
    work = [
        [
            (
                "re",
                [1, 450, 1234, 2000],
                SamplingParams(max_new_tokens=10, temperature=0.0, regex=r"[0-9]{3}-[a-z]{4}"),
                LogprobOptions(),
            ),
            (
                "free",
                [1, 300, 301],
                SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True),
                LogprobOptions(),
            ),
        ]
    ]
    outs = []
    for tp in (1, 2):
        core = EngineCore(
            EngineConfig.from_kwargs(
                model=str(path), tp_size=tp, kv_cache_tokens=512, device="cpu"
            ),
            progress=False,
        )
        try:
            outs.append(run_workload(core, work))
        finally:
            core.close()
    assert outs[0]["re"]["ids"] == outs[1]["re"]["ids"]
    assert outs[0]["free"]["ids"] == outs[1]["free"]["ids"]
    text = load_tokenizer(str(path)).decode(outs[1]["re"]["ids"], skip_special_tokens=True)
    assert re.fullmatch(r"[0-9]{3}-[a-z]{4}", text), text


def test_compact_batch_keeps_what_the_ranks_read():
    """Rows travel with their token lists only where penalties or prompt logprobs read them;
    elsewhere a range of the same length keeps the sampling step."""
    import numpy as np

    from radixlm.batch import ForwardMode, ScheduledBatch, ScheduledSeq
    from radixlm.executor.tp_worker import compact_batch

    def row(rid, **kw):
        return ScheduledSeq(
            rid=rid,
            new_tokens=[7],
            slots=np.arange(1, 9),
            sample=True,
            prompt_ids=[3, 4, 5, 6],
            output_ids=[8, 9, 10],
            **kw,
        )

    plain = row("plain", params=SamplingParams(temperature=0.0))
    penalised = row("pen", params=SamplingParams(presence_penalty=0.5))
    logprobs = row("lp", params=SamplingParams(), logits_from=0)
    batch = ScheduledBatch(mode=ForwardMode.DECODE, seqs=[plain, penalised, logprobs])
    light = compact_batch(batch)
    a, b, c = light.seqs
    assert a.prompt_ids == range(4) and a.output_ids == range(3) and a.sample_step == 3
    assert b is penalised
    assert c.prompt_ids == [3, 4, 5, 6] and c.output_ids == range(3)
    assert batch.seqs[0].output_ids == [8, 9, 10]  # the scheduler's rows are untouched
