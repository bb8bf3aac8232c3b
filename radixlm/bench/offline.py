"""Offline throughput: N requests through the engine at once, as fast as it can go.

Requests are token ids (no tokenizer cost) with ``ignore_eos``, so each produces exactly its
output length. Datasets:
- ``random``: prompts of ``--input-len`` random ids and ``--output-len`` outputs; with
  ``--range-ratio r < 1`` each length is drawn uniformly from [r x len, len].
- ``shared-prefix``: ``--groups`` G x ``--prompts-per-group`` P prompts; the prompts of a group
  share a ``--system-len`` token prefix, followed by a ``--question-len`` token question of
  their own. ``--disable-radix-cache`` gives the baseline that recomputes every prefix.

By default the engine core runs in this process (``EngineCore``: no IPC in the timings); with
``--engine-process`` the requests go through ``Engine`` (core in its own process, results over a
pipe), as a user of the Python API would see it. A few warm-up requests run first (then the
cache is flushed), so Triton compilation is not timed.

The roofline printed beside the result is that workload's floor (radixlm.bench.common): the
uncached prompt tokens' FLOPs at the measured matmul rate, plus decode steps at the measured HBM
bandwidth with as many requests decoding at once as the KV pool and the engine's cap allow. With
the radix cache on, each group's shared prefix counts as computed once.

``--baseline hf`` runs (a subset of, with ``--hf-requests``) the same requests through HF
``generate`` in batches of ``--hf-batch-size`` and prints radixlm's speed-up in output tok/s.

Constraints. ``--json-schema``, ``--regex`` or ``--choices`` constrain every request (and the
warm-up requests, so the masked sampling path is compiled before timing; the grammar is then in
the compiler's cache, and first-compile cost is ``radixlm bench grammar``'s to measure). A
constrained request stops when its grammar completes, often well before ``--output-len``, so
its output token counts are recorded per request and the roofline uses them. A plain run
without the constraint moves more output tokens over the same prefill and is not a fair
baseline; ``--matched-control`` adds one that is: after the constrained run, in the same engine
with its radix cache flushed, the identical prompts run again unconstrained with
``ignore_eos`` and each request's ``max_new_tokens`` set to the tokens it produced constrained.
Both runs then pay the same prefill and move the same tokens; the table gives both rows and
the ratios constrained / control of output tok/s and TTFT p50.

Usage: radixlm bench offline --random-model llama3-8b --dataset random --num-requests 1000
       --input-len 1024 --output-len 256 [--out offline.json]
       radixlm bench offline --random-model llama3-8b --num-requests 256 --input-len 512
       --output-len 128 --regex '[0-9a-f]{128}' --matched-control
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from radixlm.bench import hf_baseline
from radixlm.bench.common import (
    Ceilings,
    ModelCost,
    WorkItem,
    add_model_args,
    engine_options,
    format_table,
    percentile,
    resolve_setup,
    run_header,
    synchronize,
    workload_roofline,
    write_json,
)

WARMUP_OUTPUT_LEN = 8
COLUMNS = [
    ("backend", "backend"),
    ("requests", "requests"),
    ("aborted", "aborted"),
    ("wall_s", "wall s"),
    ("request_per_s", "req/s"),
    ("input_tok_s", "in tok/s"),
    ("output_tok_s", "out tok/s"),
    ("cache_hit_rate", "cache hit"),
    ("roof_output_tok_s", "roof out tok/s"),
    ("roof_pct", "% roof"),
    ("output_tokens_mean", "out/req"),
    ("ttft_p50_s", "TTFT p50 s"),
    ("ttft_p99_s", "TTFT p99 s"),
    ("e2e_p50_s", "e2e p50 s"),
    ("peak_running", "peak running"),
]
CONTROL_COLUMNS = [
    ("vs_control_output_tok_s", "tok/s vs ctl"),
    ("vs_control_ttft_p50", "TTFT p50 vs ctl"),
]


@dataclass(frozen=True)
class BenchRequest:
    """One request of a workload; ``group`` is its shared-prefix group (-1: none)."""

    input_ids: list[int]
    output_len: int
    group: int = -1
    shared_len: int = 0
    constraint: dict[str, Any] | None = None  # {"json_schema": ...} or {"regex": ...}

    def sampling_params(self) -> dict[str, Any]:
        """Greedy, ``output_len`` tokens (EOS ignored unless a constraint completes)."""
        params = {"max_new_tokens": self.output_len, "temperature": 0.0, "ignore_eos": True}
        params.update(self.constraint or {})
        return params


def random_dataset(
    rng: random.Random, num: int, input_len: int, output_len: int, range_ratio: float, vocab: int
) -> list[BenchRequest]:
    """``num`` prompts of random ids; lengths uniform in [range_ratio x len, len]."""

    def length(full: int) -> int:
        return max(1, rng.randint(int(full * range_ratio), full)) if range_ratio < 1 else full

    return [
        BenchRequest(
            [rng.randrange(vocab) for _ in range(length(input_len))], max(1, length(output_len))
        )
        for _ in range(num)
    ]


def shared_prefix_dataset(
    rng: random.Random,
    groups: int,
    per_group: int,
    system_len: int,
    question_len: int,
    output_len: int,
    vocab: int,
) -> list[BenchRequest]:
    """``groups`` x ``per_group`` prompts: a group's shared prefix, then a question of its own.
    Returned group-interleaved (as they would arrive), not group after group."""
    systems = [[rng.randrange(vocab) for _ in range(system_len)] for _ in range(groups)]
    out = []
    for _ in range(per_group):
        for g, system in enumerate(systems):
            question = [rng.randrange(vocab) for _ in range(question_len)]
            out.append(BenchRequest(system + question, output_len, g, system_len))
    return out


def make_dataset(args: argparse.Namespace, vocab: int, seed_offset: int = 0) -> list[BenchRequest]:
    rng = random.Random(args.seed + seed_offset)
    if args.dataset == "random":
        requests = random_dataset(
            rng, args.num_requests, args.input_len, args.output_len, args.range_ratio, vocab
        )
    else:
        requests = shared_prefix_dataset(
            rng,
            args.groups,
            args.prompts_per_group,
            args.system_len,
            args.question_len,
            args.output_len,
            vocab,
        )
    constraint = _constraint(args)
    return [dataclasses.replace(r, constraint=constraint) for r in requests]


def _constraint(args: argparse.Namespace) -> dict[str, Any] | None:
    if args.json_schema:
        path = Path(args.json_schema)
        return {"json_schema": path.read_text() if path.is_file() else args.json_schema}
    if args.regex:
        return {"regex": args.regex}
    if args.choices:
        return {"choices": list(args.choices)}
    return None


def work_items(
    requests: list[BenchRequest], radix: bool, output_lens: list[int] | None = None
) -> list[WorkItem]:
    """The roofline's view: with the radix cache each group's prefix is computed once.

    Args:
        requests: the workload.
        radix: whether the radix cache is on.
        output_lens: tokens each request actually produced (a constrained request stops when
            its grammar completes); default: each request's ``output_len``.

    Returns:
        One item per request.
    """
    lens = output_lens if output_lens is not None else [r.output_len for r in requests]
    seen: set[int] = set()
    items = []
    for r, out_len in zip(requests, lens, strict=True):
        cached = r.shared_len if radix and r.group >= 0 and r.group in seen else 0
        seen.add(r.group)
        items.append(WorkItem(len(r.input_ids), cached, out_len))
    return items


def matched_control(requests: list[BenchRequest], produced: list[int]) -> list[BenchRequest]:
    """The same prompts without their constraint, each capped at the tokens it produced.

    ``BenchRequest.sampling_params`` sets ``ignore_eos``, so each control request produces
    exactly ``produced[i]`` tokens: the two runs move the same tokens over the same prefill.
    """
    return [
        dataclasses.replace(r, output_len=n, constraint=None)
        for r, n in zip(requests, produced, strict=True)
    ]


def roofline_concurrency(items: list[WorkItem], kv_capacity: int, max_running: int) -> int:
    """Requests that fit in the KV pool at once (shared prefixes held once), engine cap too."""
    unique = sum(i.prompt_len - i.cached_len + i.output_len for i in items)
    per_request = max(unique / len(items), 1.0)
    return max(1, min(len(items), max_running, int(kv_capacity // per_request)))


# ---------------------------------------------------------------------------- radixlm runs


@dataclass
class RunResult:
    """Wall time and per-request latencies of one engine run."""

    wall_s: float
    ttft_s: list[float]
    e2e_s: list[float]
    output_tokens: int
    cached_tokens: int
    prompt_tokens: int
    info: dict[str, Any]
    aborted: list[str] = field(default_factory=list)
    # Output tokens of each request, in request order.
    output_per_request: list[int] = field(default_factory=list)
    # Most requests decoding or prefilling at once (in-process runs only): what the KV pool's
    # capacity (e.g. an FP8 cache) and the running cap allow.
    peak_running: int | None = None


def engine_config(model_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    opts = {
        "model": str(model_dir),
        **engine_options(args),
        "enable_radix_cache": not args.disable_radix_cache,
    }
    if args.disable_jump_forward:
        opts["enable_jump_forward"] = False
    for name in (
        "kv_cache_tokens",
        "max_running_requests",
        "chunked_prefill_size",
        "max_prefill_tokens",
        "schedule_policy",
        "mem_fraction",
        "grammar_backend",
    ):
        if getattr(args, name) is not None:
            opts[name] = getattr(args, name)
    return opts


def run_in_process(
    opts: dict[str, Any],
    requests: list[BenchRequest],
    warmup: list[BenchRequest],
    device: torch.device,
    control: bool = False,
) -> tuple[RunResult, RunResult | None]:
    """Drive an in-process EngineCore: warm up, flush, then every request at once.

    Args:
        opts: engine options.
        requests: the timed workload.
        warmup: requests run (and their cache flushed) before timing.
        device: for synchronisation around the timings.
        control: also run :func:`matched_control` of the workload afterwards, in the same
            core with its radix cache flushed.

    Returns:
        The run, and the control run (None without ``control``).
    """
    from radixlm.config import EngineConfig
    from radixlm.engine.core import EngineCore

    core = EngineCore(EngineConfig.from_kwargs(**opts), progress=False)
    if warmup:
        _drive(core, warmup, "warm", device)
        _flush(core.flush_cache())
    result = _drive(core, requests, "req", device)
    result.info = core.server_info()
    ctl = None
    if control:
        _flush(core.flush_cache())
        ctl = _drive(core, matched_control(requests, result.output_per_request), "ctl", device)
        ctl.info = core.server_info()
    core.close()
    del core
    return result, ctl


def _flush(done: bool) -> None:
    # A cache left full would let the next run hit prompts the previous one computed.
    if not done:
        raise RuntimeError("flush_cache refused: requests still in flight after a run")


def _drive(core, requests: list[BenchRequest], tag: str, device: torch.device) -> RunResult:
    from radixlm.engine import ipc
    from radixlm.request import LogprobOptions
    from radixlm.sampling_params import SamplingParams

    synchronize(device)
    start = time.perf_counter()
    rids = [f"{tag}-{i}" for i in range(len(requests))]
    first: dict[str, float] = {}
    done: dict[str, float] = {}
    aborted: list[str] = []
    produced = dict.fromkeys(rids, 0)
    cached = peak = 0

    def record(out, now: float) -> None:
        nonlocal cached
        produced[out.rid] += len(out.new_token_ids)
        if out.new_token_ids:
            first.setdefault(out.rid, now)
        if out.finish is not None:
            done[out.rid] = now
            cached += out.cached_tokens
            if out.finish.kind.value == "abort":
                aborted.append(f"{out.rid}: {out.finish.message}")

    for rid, r in zip(rids, requests):
        params = SamplingParams.from_dict(r.sampling_params())
        refused = core.add_request(ipc.AddRequest(rid, r.input_ids, params, LogprobOptions()))
        if refused is not None:  # e.g. a constraint the compiler cannot take
            record(refused, time.perf_counter() - start)
    while core.has_work():
        outputs = core.step()
        peak = max(peak, _in_flight(core))
        now = time.perf_counter() - start
        for out in outputs:
            record(out, now)
    synchronize(device)
    wall = time.perf_counter() - start
    prompt = sum(len(r.input_ids) for r in requests)
    per_request = [produced[rid] for rid in rids]
    return RunResult(
        wall,
        list(first.values()),
        list(done.values()),
        sum(per_request),
        cached,
        prompt,
        {},
        aborted,
        per_request,
        peak,
    )


def _in_flight(core) -> int:
    """Requests the core is prefilling or decoding (0 for a stand-in core without a scheduler)."""
    scheduler = getattr(core, "scheduler", None)
    return 0 if scheduler is None else len(scheduler.running) + len(scheduler.prefilling)


def run_engine_process(
    opts: dict[str, Any],
    requests: list[BenchRequest],
    warmup: list[BenchRequest],
    control: bool = False,
) -> tuple[RunResult, RunResult | None]:
    """The same through ``Engine`` (core process + IPC), one batched ``generate`` call per run
    (arguments and results as :func:`run_in_process`)."""
    from radixlm.engine.engine import Engine

    with Engine(**opts) as engine:
        if warmup:
            _engine_generate(engine, warmup)
            _flush(engine.flush_cache())
        result = _engine_run(engine, requests)
        ctl = None
        if control:
            _flush(engine.flush_cache())
            ctl = _engine_run(engine, matched_control(requests, result.output_per_request))
    return result, ctl


def _engine_run(engine, requests: list[BenchRequest]) -> RunResult:
    start = time.perf_counter()
    results = _engine_generate(engine, requests)
    wall = time.perf_counter() - start
    metas = [r["meta_info"] for r in results]
    aborted = [
        f"{m['id']}: {m['finish_reason'].get('message')}"
        for m in metas
        if m["finish_reason"]["type"] == "abort"
    ]
    per_request = [m["completion_tokens"] for m in metas]
    return RunResult(
        wall,
        [m["ttft"] for m in metas],
        [m["e2e_latency"] for m in metas],
        sum(per_request),
        sum(m["cached_tokens"] for m in metas),
        sum(m["prompt_tokens"] for m in metas),
        engine.server_info(),
        aborted,
        per_request,
    )


def _engine_generate(engine, requests: list[BenchRequest]) -> list[dict[str, Any]]:
    params = [r.sampling_params() for r in requests]
    return engine.generate(input_ids=[r.input_ids for r in requests], sampling_params=params)


def result_row(name: str, run: RunResult, roof_s: float, items: list[WorkItem]) -> dict[str, Any]:
    wanted_out = sum(i.output_len for i in items)
    return {
        "backend": name,
        "requests": len(items),
        "aborted": len(run.aborted),
        "wall_s": run.wall_s,
        "request_per_s": len(items) / run.wall_s,
        "input_tok_s": run.prompt_tokens / run.wall_s,
        "output_tok_s": run.output_tokens / run.wall_s,
        "total_tok_s": (run.prompt_tokens + run.output_tokens) / run.wall_s,
        "output_tokens": run.output_tokens,
        "prompt_tokens": run.prompt_tokens,
        "cached_tokens": run.cached_tokens,
        "cache_hit_rate": run.cached_tokens / max(run.prompt_tokens, 1),
        "roof_s": roof_s,
        "roof_output_tok_s": wanted_out / roof_s,
        "roof_pct": 100 * roof_s / run.wall_s,
        "ttft_p50_s": percentile(run.ttft_s, 50),
        "ttft_p99_s": percentile(run.ttft_s, 99),
        "e2e_p50_s": percentile(run.e2e_s, 50),
        "e2e_p99_s": percentile(run.e2e_s, 99),
        "output_tokens_mean": run.output_tokens / max(len(items), 1),
        "output_tokens_per_request": list(run.output_per_request),
    }


# ---------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="radixlm bench offline",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(parser)
    data = parser.add_argument_group("workload")
    data.add_argument("--dataset", choices=["random", "shared-prefix"], default="random")
    data.add_argument("--num-requests", type=int, default=1000)
    data.add_argument("--input-len", type=int, default=1024)
    data.add_argument("--output-len", type=int, default=256)
    data.add_argument("--range-ratio", type=float, default=1.0)
    data.add_argument("--groups", type=int, default=64)
    data.add_argument("--prompts-per-group", type=int, default=16)
    data.add_argument("--system-len", type=int, default=2048)
    data.add_argument("--question-len", type=int, default=128)
    data.add_argument("--warmup-requests", type=int, default=4)
    data.add_argument(
        "--json-schema",
        default=None,
        help="constrain every request to this JSON schema (a file or JSON text)",
    )
    data.add_argument("--regex", default=None, help="constrain every request to this regex")
    data.add_argument(
        "--choices", nargs="+", default=None, help="constrain every request to one of these strings"
    )
    data.add_argument(
        "--grammar-backend",
        default=None,
        choices=["llguidance", "outlines"],
        help="constrained-decoding backend (default: the engine's)",
    )
    data.add_argument(
        "--disable-jump-forward",
        action="store_true",
        help="sample forced grammar text token by token instead of splicing it",
    )
    data.add_argument(
        "--matched-control",
        action="store_true",
        help="with a constraint: then run the same prompts unconstrained in the "
        "same engine (cache flushed), each request capped at the tokens it "
        "produced constrained, and print constrained / control ratios",
    )
    eng = parser.add_argument_group("engine")
    eng.add_argument("--disable-radix-cache", action="store_true")
    eng.add_argument(
        "--engine-process",
        action="store_true",
        help="go through Engine (core in its own process) instead of EngineCore",
    )
    eng.add_argument("--kv-cache-tokens", type=int, default=None)
    eng.add_argument("--mem-fraction", type=float, default=None)
    eng.add_argument("--max-running-requests", type=int, default=None)
    eng.add_argument("--chunked-prefill-size", type=int, default=None)
    eng.add_argument("--max-prefill-tokens", type=int, default=None)
    eng.add_argument(
        "--schedule-policy", default=None, choices=["lpm", "fcfs", "dfs-weight", "random"]
    )
    hf = parser.add_argument_group("HF baseline")
    hf.add_argument("--baseline", choices=["hf"], default=None)
    hf.add_argument(
        "--hf-variants", nargs="+", default=["default"], choices=hf_baseline.HF_VARIANTS
    )
    hf.add_argument("--hf-batch-size", type=int, default=64)
    hf.add_argument(
        "--hf-requests",
        type=int,
        default=None,
        help="run only the first N requests through HF (its tok/s is a rate)",
    )
    args = parser.parse_args(argv)
    if args.matched_control and _constraint(args) is None:
        parser.error("--matched-control needs --json-schema, --regex or --choices")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the table; write JSON with --out."""
    args = parse_args(argv)
    setup = resolve_setup(args)
    device, model_dir, arch, ceil = setup.device, setup.model_dir, setup.arch, setup.ceil
    requests = make_dataset(args, arch.vocab_size)
    warmup = _warmup_requests(args, arch.vocab_size)
    run, ctl = run_radixlm(engine_config(model_dir, args), requests, warmup, args, device)
    rows = [_radixlm_row(args, run, requests, setup.cost, ceil)]
    comparison = None
    if ctl is not None:
        control_requests = matched_control(requests, run.output_per_request)
        rows.append(
            _radixlm_row(args, ctl, control_requests, setup.cost, ceil, label="matched control")
        )
        if rows[1]["num_retractions"] is not None and rows[0]["num_retractions"] is not None:
            # the engine's count is cumulative: the control's own are those after the run's
            rows[1]["num_retractions"] -= rows[0]["num_retractions"]
        comparison = control_comparison(rows[0], rows[1])
    if args.baseline == "hf":
        rows += _hf_rows(model_dir, requests, rows[0], args, device, setup.dtype)
    report(args, device, ceil, model_dir, rows, comparison)
    failed = [
        (name, r)
        for name, r in (("run", run), ("matched control", ctl))
        if r is not None and r.aborted
    ]
    for name, r in failed:  # the figures above then describe a broken run, not the speed
        print(
            f"INVALID RUN: {len(r.aborted)} request(s) of the {name} aborted, e.g. {r.aborted[0]}"
        )
    if comparison is not None and not comparison["same_tokens"]:
        print(
            "INVALID COMPARISON: the matched control did not produce the constrained run's "
            "per-request output token counts"
        )
        return 1
    return 1 if failed else 0


def run_radixlm(
    opts: dict[str, Any],
    requests: list[BenchRequest],
    warmup: list[BenchRequest],
    args: argparse.Namespace,
    device: torch.device,
) -> tuple[RunResult, RunResult | None]:
    """One engine (in-process or through Engine): the run, and its matched control with
    ``--matched-control``; GPU memory released afterwards."""
    if args.engine_process:
        runs = run_engine_process(opts, requests, warmup, args.matched_control)
    else:
        runs = run_in_process(opts, requests, warmup, device, args.matched_control)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return runs


def control_comparison(constrained: dict[str, Any], control: dict[str, Any]) -> dict[str, Any]:
    """Ratios constrained / matched control (below 1 for tok/s and above 1 for TTFT means the
    constraint costs), and whether both runs moved the same tokens."""

    def ratio(key: str) -> float:
        return constrained[key] / control[key] if control[key] else float("nan")

    return {
        "output_tok_s_ratio": ratio("output_tok_s"),
        "ttft_p50_ratio": ratio("ttft_p50_s"),
        "ttft_p99_ratio": ratio("ttft_p99_s"),
        "wall_ratio": ratio("wall_s"),
        "same_tokens": (
            constrained["output_tokens_per_request"] == control["output_tokens_per_request"]
            and constrained["prompt_tokens"] == control["prompt_tokens"]
        ),
        "cache_hit_rate": [constrained["cache_hit_rate"], control["cache_hit_rate"]],
    }


def _warmup_requests(args: argparse.Namespace, vocab: int) -> list[BenchRequest]:
    """Unique random prompts of the workload's length, with its constraint if any (so the
    masked sampling path is compiled before the timed run)."""
    rng = random.Random(args.seed + 1)
    length = args.input_len if args.dataset == "random" else args.system_len + args.question_len
    constraint = _constraint(args)
    return [
        BenchRequest(
            [rng.randrange(vocab) for _ in range(length)], WARMUP_OUTPUT_LEN, constraint=constraint
        )
        for _ in range(args.warmup_requests)
    ]


def _radixlm_row(
    args: argparse.Namespace,
    run: RunResult,
    requests: list[BenchRequest],
    cost: ModelCost,
    ceil: Ceilings,
    label: str | None = None,
) -> dict[str, Any]:
    """The table row of one run; its roofline counts the tokens each request produced."""
    radix = not args.disable_radix_cache
    items = work_items(requests, radix, run.output_per_request)
    concurrency = roofline_concurrency(
        items, run.info["kv_capacity_tokens"], run.info["max_running_requests"]
    )
    roof_s = workload_roofline(cost, ceil, items, concurrency)
    label = label or _constraint_label(requests)
    name = (
        "radixlm"
        + (f" {label}" if label else "")
        + ("" if radix else " (no radix)")
        + (" [Engine]" if args.engine_process else "")
    )
    row = result_row(name, run, roof_s, items)
    row.update(
        {
            "roof_concurrency": concurrency,
            "peak_running": run.peak_running,
            "kv_capacity_tokens": run.info["kv_capacity_tokens"],
            "max_running_requests": run.info["max_running_requests"],
            "num_retractions": run.info.get("num_retractions"),
        }
    )
    return row


def _constraint_label(requests: list[BenchRequest]) -> str:
    constraint = requests[0].constraint if requests else None
    return "" if not constraint else next(iter(constraint)).replace("_", "-")


def _hf_rows(
    model_dir: Path,
    requests: list[BenchRequest],
    ours: dict[str, Any],
    args: argparse.Namespace,
    device: torch.device,
    dtype: torch.dtype,
) -> list[dict[str, Any]]:
    subset = requests[: args.hf_requests] if args.hf_requests else requests
    model = hf_baseline.load_hf_model(model_dir, dtype, device)
    rows = []
    for variant in args.hf_variants:
        timing = hf_baseline.time_workload(
            model, [(r.input_ids, r.output_len) for r in subset], args.hf_batch_size, variant
        )
        prompt = sum(len(r.input_ids) for r in subset)
        rows.append(
            {
                "backend": f"HF {variant} (batch {args.hf_batch_size})",
                "requests": len(subset),
                "wall_s": timing.total_s,
                "request_per_s": len(subset) / timing.total_s,
                "input_tok_s": prompt / timing.total_s,
                "output_tok_s": timing.output_tok_s,
                "radixlm_speedup": ours["output_tok_s"] / timing.output_tok_s,
            }
        )
    hf_baseline.release(model)
    return rows


def report(
    args: argparse.Namespace,
    device: torch.device,
    ceil: Ceilings,
    model_dir: Path,
    rows: list[dict[str, Any]],
    comparison: dict[str, Any] | None = None,
) -> None:
    """Print the table (and the constrained / control ratios); write JSON with ``--out``."""
    header = run_header(device, ceil, model_dir)
    print(
        f"offline {args.dataset} on {header['device']}: HBM {ceil.hbm_gbps:.4g} GB/s, "
        f"matmul {ceil.matmul_tflops:.3g} TFLOP/s; roofline concurrency "
        f"{rows[0]['roof_concurrency']} (KV {rows[0]['kv_capacity_tokens']} tokens)"
    )
    columns = list(COLUMNS)
    if comparison is not None:
        rows[0]["vs_control_output_tok_s"] = comparison["output_tok_s_ratio"]
        rows[0]["vs_control_ttft_p50"] = comparison["ttft_p50_ratio"]
        columns += CONTROL_COLUMNS
    if any("radixlm_speedup" in r for r in rows):
        columns.append(("radixlm_speedup", "radixlm x"))
    print(format_table(rows, columns))
    if comparison is not None:
        print(
            f"constrained / matched control: output tok/s "
            f"{comparison['output_tok_s_ratio']:.3f}x, TTFT p50 "
            f"{comparison['ttft_p50_ratio']:.3f}x, TTFT p99 "
            f"{comparison['ttft_p99_ratio']:.3f}x, wall {comparison['wall_ratio']:.3f}x "
            f"(same prompts and per-request output tokens: {comparison['same_tokens']})"
        )
    payload = {**header, "bench": "offline", "args": vars(args), "results": rows}
    if comparison is not None:
        payload["matched_control"] = comparison
    write_json(args.out, payload)


if __name__ == "__main__":
    raise SystemExit(main())
