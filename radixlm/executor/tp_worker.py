"""Tensor-parallel execution: one worker process per device, supervised by the engine core.

::

    engine core (scheduler, radix tree) --pipe--> rank 0 --gloo broadcast--> ranks 1..N-1
                                        <-pipe--- rank 0: step results
                                        <-pipes-- every local rank: ready / failed

The core keeps the one scheduler and the one radix tree; :class:`TPRunner` stands in for a
``ModelRunner`` there and sends each scheduled batch, as plain data, to rank 0, which broadcasts
it to every rank over a gloo group (the same path reaches ranks on other hosts). Every rank runs a
:class:`~radixlm.executor.model_runner.ModelRunner` over its shard of the model and its shard of
the KV pool (same slot numbers everywhere); the collectives inside the model keep the ranks in
step. The LM head gathers the whole logits on every rank, and every rank samples with the same
seeded generator, so every rank draws the same tokens without another collective: each needs
them for the next step's placeholders. Only rank 0 sends results back.

A worker dies with its parent (``PR_SET_PDEATHSIG``), and the core watches every worker: a rank
that fails or exits turns into :class:`~radixlm.executor.errors.RunnerDeadError` within a
fraction of a second, the other ranks are stopped (killed if stuck in a collective), and the
engine reports the error instead of running on.
"""

from __future__ import annotations

import copy
import ctypes
import dataclasses
import itertools
import json
import logging
import multiprocessing as mp
import os
import signal
import socket
import sys
import time
import traceback
import weakref
from dataclasses import dataclass
from multiprocessing.connection import wait as wait_any
from typing import Any

import torch
import torch.distributed as dist

from radixlm.batch import ScheduledBatch
from radixlm.config import CacheConfig, ModelConfig, ParallelConfig
from radixlm.executor.errors import RunnerDeadError
from radixlm.executor.model_runner import ModelRunner, RunnerInfo
from radixlm.model.arch import ModelArch
from radixlm.model.loader import model_metadata_dir, resolve_device
from radixlm.model.parallel import check_shardable, init_tensor_parallel
from radixlm.model.quantization import resolve_quantization
from radixlm.outputs import StepResult

logger = logging.getLogger(__name__)

START_TIMEOUT_SECONDS = 900
# How long stopped workers get to exit by themselves before they are killed.
STOP_GRACE_SECONDS = 5.0

# ---- messages (core -> rank 0; all but _Fetch are broadcast to every rank) ------------------


@dataclass
class _Launch:
    step: int
    batch: ScheduledBatch
    futures: int | None


@dataclass
class _CommitMask:
    step: int
    bitmask: torch.Tensor


@dataclass
class _Capture:
    max_batch_size: int


@dataclass
class _Stop:
    pass


@dataclass
class _Fetch:
    step: int


# ---- messages (worker -> its supervisor) ------------------------------------------------------


@dataclass
class _Ready:
    rank: int
    info: RunnerInfo
    num_pages: int
    first_usable_slot: int


@dataclass
class _StepDone:
    step: int
    result: StepResult | None
    error: str | None


@dataclass
class _Captured:
    batch_sizes: list[int]  # the decode batch sizes captured (empty: no CUDA graphs)


@dataclass
class _Failed:
    rank: int
    message: str


@dataclass(frozen=True)
class WorkerSpec:
    """Everything one worker process needs to start (picklable).

    Attributes:
        rank / size: global rank and tensor-parallel size.
        local_rank / local_size: index and count of the ranks on this host (device cuda:local).
        init_addr: "HOST:PORT" where the ranks meet.
        model_path / model_config / cache_config: as for a ModelRunner.
        eos_token_ids: the engine's EOS ids (sampling's min_new_tokens must agree on every rank).
        progress: show the weight-loading bar (rank 0 only).
        parent_pid: the supervising process; the worker dies with it.
    """

    rank: int
    size: int
    local_rank: int
    local_size: int
    init_addr: str
    model_path: str
    model_config: ModelConfig
    cache_config: CacheConfig
    eos_token_ids: frozenset[int]
    progress: bool
    parent_pid: int


# ---- the worker process ---------------------------------------------------------------------


def worker_main(spec: WorkerSpec, conn) -> None:
    """A worker process's main function: load the shard, then serve steps until told to stop.

    Args:
        spec: the worker's rank and model.
        conn: pipe to the supervisor (the engine core, or a follower node's supervisor).
    """
    _die_with_parent(spec.parent_pid)
    logging.basicConfig(level=logging.INFO)
    try:
        runner = _start_runner(spec)
        pool = runner.pool
        conn.send(_Ready(spec.rank, runner.info, pool.num_pages, pool.first_usable_slot))
        _serve(spec.rank, runner, conn)
    except Exception:
        message = f"tensor-parallel rank {spec.rank} failed:\n{traceback.format_exc()}"
        logger.error(message)
        try:
            conn.send(_Failed(spec.rank, message))
        except OSError:
            pass
        # Peers may hold this rank in a collective; the supervisor kills them. Exit at once
        # rather than run interpreter teardown that could wait on a communicator.
        os._exit(1)
    if dist.is_initialized():
        dist.destroy_process_group()


def _die_with_parent(supervisor_pid: int) -> None:
    """Ask the kernel to kill this process when its parent dies (Linux), and leave at once if the
    supervisor is already gone.

    The parent is the supervisor (spawned workers) or the fork server, which exits when the
    supervisor does (its pipe closes), so the worker goes with them either way; rank 0 also
    stops everyone when the supervisor's pipe closes.
    """
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    try:
        os.kill(supervisor_pid, 0)
    except ProcessLookupError:
        os._exit(1)


def _start_runner(spec: WorkerSpec) -> ModelRunner:
    device = resolve_device(spec.model_config.device)
    if device.type == "cuda":
        device = torch.device("cuda", spec.local_rank)
        torch.cuda.set_device(device)
    else:
        # Ranks share the host's cores: oversubscribed OpenMP threads stall each other. A lower
        # limit already set (OMP_NUM_THREADS) stands.
        share = max(1, (os.cpu_count() or 1) // spec.local_size)
        torch.set_num_threads(min(torch.get_num_threads(), share))
    started = time.perf_counter()
    tp = init_tensor_parallel(spec.rank, spec.size, spec.init_addr, device)
    joined = time.perf_counter()
    model_config = dataclasses.replace(spec.model_config, device=str(device))
    runner = ModelRunner(
        spec.model_path,
        model_config,
        spec.cache_config,
        spec.eos_token_ids,
        progress=spec.progress and spec.rank == 0,
        tp=tp,
    )
    logger.info(
        "tensor-parallel rank %d/%d on %s: joined in %.1f s, loaded in %.1f s",
        spec.rank,
        spec.size,
        device,
        joined - started,
        time.perf_counter() - joined,
    )
    return runner


def _serve(rank: int, runner: ModelRunner, conn) -> None:
    """Run every broadcast command; rank 0 reads them from the core and answers fetches."""
    group = runner.tp.cpu_group
    steps: dict[int, Any] = {}  # step id -> its PendingStep, or the exception its launch raised
    profiler = CollectiveProfiler.from_env(rank)
    while True:
        box: list[Any] = [None]
        if rank == 0:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                msg = _Stop()  # the core went away: take the other ranks down with us
            if isinstance(msg, _Fetch):
                conn.send(_fetch(steps.pop(msg.step, None), msg.step))
                continue
            box[0] = msg
        dist.broadcast_object_list(box, src=0, group=group)
        msg = box[0]
        if isinstance(msg, _Stop):
            return
        if isinstance(msg, _Launch):
            if profiler is not None:
                profiler.before_launch(msg.batch)
            steps[msg.step] = _launch(runner, msg, steps)
            for old in [s for s in steps if s < msg.step - 2]:
                del steps[old]
        elif isinstance(msg, _CommitMask):
            pending = steps.get(msg.step)
            if pending is not None and not isinstance(pending, Exception):
                try:
                    pending.bitmask.copy_(msg.bitmask)
                    pending.commit_mask()
                except Exception as exc:
                    steps[msg.step] = exc
        elif isinstance(msg, _Capture):
            runner.capture_cuda_graphs(msg.max_batch_size)
            if rank == 0:
                conn.send(_Captured(list(runner.graphs.buckets) if runner.graphs else []))


class CollectiveProfiler:
    """Torch-profiles decode steps on a worker and reports the collectives' share of them.

    Set ``RADIXLM_TP_PROFILE_STEPS=N`` (and optionally ``RADIXLM_TP_PROFILE_OUT=DIR``): for every
    decode batch size, after ``warmup`` steps of it, the next N steps of that size are recorded;
    the worker logs (and writes ``DIR/rank<R>.json``) the device time of NCCL kernels per step
    next to all kernels' time per step and the wall time per step.

    Args:
        rank: this worker's rank.
        steps: decode steps recorded per batch size.
        out_dir: where to write the JSON summaries, or None.
        warmup: decode steps of a batch size skipped before recording it.
    """

    ENV_STEPS = "RADIXLM_TP_PROFILE_STEPS"
    ENV_OUT = "RADIXLM_TP_PROFILE_OUT"

    def __init__(self, rank: int, steps: int, out_dir: str | None, warmup: int = 8):
        self.rank, self.steps, self.out_dir, self.warmup = rank, steps, out_dir, warmup
        self.seen: dict[int, int] = {}
        self.results: dict[int, dict[str, float]] = {}
        self._active: Any = None
        self._size = 0
        self._count = 0
        self._started = 0.0

    @classmethod
    def from_env(cls, rank: int) -> CollectiveProfiler | None:
        steps = int(os.environ.get(cls.ENV_STEPS, "0") or 0)
        return cls(rank, steps, os.environ.get(cls.ENV_OUT)) if steps > 0 else None

    def before_launch(self, batch: ScheduledBatch) -> None:
        decode = batch.mode.value == "decode"
        size = len(batch.seqs)
        if self._active is not None and (not decode or size != self._size):
            self._finish(record=self._count >= self.steps)
        if not decode or size in self.results:
            return
        self.seen[size] = self.seen.get(size, 0) + 1
        if self._active is None and self.seen[size] > self.warmup:
            self._start(size)
        elif self._active is not None:
            self._count += 1
            if self._count >= self.steps:
                self._finish(record=True)

    def _start(self, size: int) -> None:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(ProfilerActivity.CUDA)
        self._active = profile(activities=activities)
        self._active.__enter__()
        self._size, self._count, self._started = size, 0, time.perf_counter()

    def _finish(self, record: bool) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - self._started
        prof, self._active = self._active, None
        prof.__exit__(None, None, None)
        if not record or self._count == 0:
            return
        nccl = kernels = 0.0
        from torch.autograd import DeviceType

        for event in prof.key_averages():
            if event.device_type != DeviceType.CUDA:  # kernels only: ops would count them twice
                continue
            device_us = getattr(event, "self_device_time_total", None)
            if device_us is None:
                device_us = getattr(event, "self_cuda_time_total", 0.0)
            kernels += device_us
            if "nccl" in event.key.lower():
                nccl += device_us
        steps = self._count
        summary = {
            "batch_size": self._size,
            "steps": steps,
            "nccl_us_per_step": nccl / steps,
            "kernel_us_per_step": kernels / steps,
            "wall_us_per_step": wall * 1e6 / steps,
        }
        self.results[self._size] = summary
        logger.info("rank %d profile: %s", self.rank, summary)
        if self.out_dir:
            path = os.path.join(self.out_dir, f"rank{self.rank}.json")
            os.makedirs(self.out_dir, exist_ok=True)
            with open(path, "w") as f:
                json.dump(list(self.results.values()), f, indent=1)


def _launch(runner: ModelRunner, msg: _Launch, steps: dict[int, Any]) -> Any:
    futures = steps.get(msg.futures) if msg.futures is not None else None
    try:
        if isinstance(futures, Exception):
            raise RuntimeError(f"the step this batch continues failed: {futures!r}")
        return runner.launch(msg.batch, futures)
    except Exception as exc:  # the same batch fails on every rank (lengths, bad input)
        logger.error("step %d failed to launch:\n%s", msg.step, traceback.format_exc())
        return exc


def _fetch(pending: Any, step: int) -> _StepDone:
    if pending is None:
        return _StepDone(step, None, f"step {step} is unknown to rank 0")
    if isinstance(pending, Exception):
        return _StepDone(step, None, repr(pending))
    try:
        return _StepDone(step, pending.result(), None)
    except Exception as exc:
        logger.error("step %d failed:\n%s", step, traceback.format_exc())
        return _StepDone(step, None, repr(exc))


# ---- supervision ----------------------------------------------------------------------------


class WorkerGroup:
    """This host's worker processes, their pipes and their exit watch.

    Args:
        specs: one per local rank.
    """

    def __init__(self, specs: list[WorkerSpec]):
        if resolve_device(specs[0].model_config.device).type == "cuda":
            # Fresh interpreters: nothing CUDA-related can leak into a worker from its parent.
            ctx = mp.get_context("spawn")
        else:
            # A fork server imports torch and the model code once; every worker is then a fork
            # of it, so N ranks start in about the time of one import instead of N (what CPU
            # tests on two cores need). torch imports dynamo (and sympy) lazily on the first
            # meta-device op, when the empty model is built: preloaded too.
            ctx = mp.get_context("forkserver")
            ctx.set_forkserver_preload([__name__, "torch._dynamo"])
        self.ranks = [s.rank for s in specs]
        self.procs: list[Any] = []
        self.conns: list[Any] = []
        for spec in specs:
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=worker_main, args=(spec, child), name=f"radixlm-tp{spec.rank}", daemon=True
            )
            proc.start()
            child.close()
            self.procs.append(proc)
            self.conns.append(parent)
        self._finalizer = weakref.finalize(self, _stop_procs, list(self.procs), None, 0.0)
        self.dead: str | None = None

    def wait_ready(self, timeout: float = START_TIMEOUT_SECONDS) -> list[_Ready]:
        """Wait until every worker has loaded its shard.

        Returns:
            The ready messages, by local rank.

        Raises:
            RunnerDeadError: a worker failed or exited first (or none came in time).
        """
        ready: dict[int, _Ready] = {}
        while len(ready) < len(self.procs):
            for i, msg in self._next_messages(timeout, want=None):
                if not isinstance(msg, _Ready):
                    raise self._fail(
                        f"unexpected start-up message from rank {self.ranks[i]}: {msg!r}"
                    )
                ready[i] = msg
        return [ready[i] for i in range(len(self.procs))]

    def send(self, msg: Any) -> None:
        """Send to the first local rank (rank 0 on the engine's host).

        Raises:
            RunnerDeadError: its pipe is broken (it exited).
        """
        self.check()
        try:
            self.conns[0].send(msg)
        except OSError as exc:
            self.check()
            raise self._fail(f"tensor-parallel rank {self.ranks[0]} is gone ({exc})") from None

    def receive(self, timeout: float | None = None) -> Any:
        """The next message of the first local rank, watching every worker meanwhile.

        Raises:
            RunnerDeadError: a worker failed or exited.
        """
        while True:
            for i, msg in self._next_messages(timeout, want=0):
                if i == 0:
                    return msg

    def check(self) -> None:
        """Raise RunnerDeadError if a worker has exited or reported a failure (no waiting)."""
        if self.dead is not None:
            raise RunnerDeadError(self.dead)
        for i, proc in enumerate(self.procs):
            if not proc.is_alive():
                raise self._fail(self._exit_text(i))
        for i, conn in enumerate(self.conns):
            if i > 0 and conn.poll(0):
                self._take(i)

    def _next_messages(self, timeout: float | None, want: int | None) -> list[tuple[int, Any]]:
        """Wait for messages (from ``want`` or anyone); raise on any worker's failure or exit.

        Failures win: a failed step of rank 0 caused by a peer that died reports the death.
        """
        if self.dead is not None:
            raise RunnerDeadError(self.dead)
        watched = [p.sentinel for p in self.procs] + self.conns
        ready = wait_any(watched, timeout)
        if not ready:
            raise self._fail(f"no answer from the tensor-parallel workers in {timeout} s")
        out = []
        for i, conn in enumerate(self.conns):
            if conn in ready or conn.poll(0):
                out.append((i, self._take(i)))
        for i, proc in enumerate(self.procs):
            if proc.sentinel in ready and not out:
                raise self._fail(self._exit_text(i))
        return [(i, msg) for i, msg in out if want is None or i == want]

    def _take(self, i: int) -> Any:
        try:
            msg = self.conns[i].recv()
        except (EOFError, OSError):
            self.procs[i].join(1.0)
            raise self._fail(self._exit_text(i)) from None
        if isinstance(msg, _Failed):
            raise self._fail(self._blame_dead_peers(i, msg.message))
        return msg

    def _blame_dead_peers(self, reporter: int, message: str) -> str:
        """A rank's failure often is a peer's death seen through a collective: name the dead
        peers first (their exits reach us a moment after the survivor's report)."""
        others = [j for j in range(len(self.procs)) if j != reporter]
        wait_any([self.procs[j].sentinel for j in others], 0.5)
        dead = [self._exit_text(j) for j in others if not self.procs[j].is_alive()]
        return "; ".join(dead + [message]) if dead else message

    def _exit_text(self, i: int) -> str:
        proc = self.procs[i]
        proc.join(0.5)
        code = proc.exitcode
        how = (
            f"was killed by signal {-code}"
            if code is not None and code < 0
            else f"exited with code {code}"
        )
        return f"tensor-parallel rank {self.ranks[i]} (pid {proc.pid}) {how}"

    def _fail(self, message: str) -> RunnerDeadError:
        """Record the failure, stop every worker, and return the error to raise."""
        if self.dead is None:
            self.dead = message
            logger.error("%s; stopping the other ranks", message)
            self.stop(grace=0.0)
        return RunnerDeadError(self.dead)

    def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """Ask rank 0 to stop everyone, wait up to ``grace`` seconds, then kill what is left."""
        self._finalizer.detach()
        _stop_procs(self.procs, self.conns[0] if self.conns and grace > 0 else None, grace)
        for conn in self.conns:
            conn.close()
        self.conns = []

    def wait_exit(self) -> None:
        """Block until every worker has exited (a follower node's ranks, stopped by rank 0).

        Raises:
            RunnerDeadError: a worker failed or exited with an error.
        """
        running = set(range(len(self.procs)))
        listening = set(running)
        while running:
            watched = [self.procs[i].sentinel for i in running]
            watched += [self.conns[i] for i in listening]
            ready = wait_any(watched)
            for i in list(listening):
                if self.conns[i] in ready:
                    try:
                        msg = self.conns[i].recv()
                    except (EOFError, OSError):  # the worker closed its end on the way out
                        listening.discard(i)
                        continue
                    if isinstance(msg, _Failed):
                        raise self._fail(msg.message)
            for i in list(running):
                if self.procs[i].sentinel in ready:
                    self.procs[i].join()
                    running.discard(i)
                    listening.discard(i)
                    if self.procs[i].exitcode != 0:
                        raise self._fail(self._exit_text(i))

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]


def _stop_procs(procs: list[Any], conn, grace: float) -> None:
    if conn is not None:
        try:
            conn.send(_Stop())
        except OSError:
            pass
    for proc in procs:
        proc.join(grace if proc.is_alive() else 0)
    for proc in procs:
        if proc.is_alive():
            proc.kill()
    for proc in procs:
        proc.join(5.0)


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (for the default rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker_specs(
    model_path: str,
    model_config: ModelConfig,
    cache_config: CacheConfig,
    parallel: ParallelConfig,
    eos_token_ids: frozenset[int],
    progress: bool,
    init_addr: str,
) -> list[WorkerSpec]:
    """The specs of this host's ranks (node ``parallel.node_rank``).

    Raises:
        ValueError: tp_size not divisible by nnodes, a node_rank out of range, a model that
            cannot be split over tp_size ranks, or FP8 quantization.
    """
    size, nnodes, node = parallel.tp_size, parallel.nnodes, parallel.node_rank
    if nnodes < 1 or size % nnodes:
        raise ValueError(f"tp_size={size} must be a multiple of nnodes={nnodes}")
    if not 0 <= node < nnodes:
        raise ValueError(f"node_rank={node} must be in [0, nnodes={nnodes})")
    meta_dir = model_metadata_dir(model_path)
    check_shardable(ModelArch.from_dir(meta_dir), size)
    if resolve_quantization(model_config.quantization, meta_dir) != "none":
        # Per-channel FP8 scales would need the same row/column split as their weights.
        raise ValueError(
            f"FP8 quantization does not run with tensor parallelism yet (tp_size={size})"
        )
    local = size // nnodes
    return [
        WorkerSpec(
            rank=node * local + i,
            size=size,
            local_rank=i,
            local_size=local,
            init_addr=init_addr,
            model_path=model_path,
            model_config=model_config,
            cache_config=cache_config,
            eos_token_ids=eos_token_ids,
            progress=progress,
            parent_pid=os.getpid(),
        )
        for i in range(local)
    ]


# ---- the core's side --------------------------------------------------------------------------


def compact_batch(batch: ScheduledBatch) -> ScheduledBatch:
    """The batch as it travels to the ranks: rows keep the prompt and output ids only where the
    executor reads them (penalties; prompt logprobs), else a ``range`` of the same length (the
    sampling step is ``len(output_ids)``), which pickles in a few bytes instead of one Python
    int per token of every row at every step.

    Args:
        batch: the scheduled batch (not modified).

    Returns:
        A batch whose rows are shallow copies where anything was dropped.
    """
    seqs = []
    for seq in batch.seqs:
        penalised = seq.params.has_penalties
        keep_prompt = penalised or seq.logits_from is not None
        if penalised and keep_prompt:
            seqs.append(seq)
            continue
        light = copy.copy(seq)
        if not keep_prompt:
            light.prompt_ids = range(len(seq.prompt_ids))
        if not penalised:
            light.output_ids = range(len(seq.output_ids))
        seqs.append(light)
    light_batch = copy.copy(batch)
    light_batch.seqs = seqs
    return light_batch


@dataclass(frozen=True)
class PoolShape:
    """What the scheduler reads of the KV pool (every rank's pool has these slots)."""

    num_pages: int
    page_size: int
    first_usable_slot: int

    @property
    def capacity_tokens(self) -> int:
        return self.num_pages * self.page_size


class RemoteStep:
    """A step launched on every rank (a ``PendingStep``); ``result()`` fetches rank 0's."""

    def __init__(self, runner: TPRunner, step: int, bitmask: torch.Tensor | None):
        self.step = step
        self.bitmask = bitmask
        self._runner = runner
        self._committed = bitmask is None
        self._result: StepResult | None = None

    @property
    def token_ids(self) -> torch.Tensor:
        raise RuntimeError("a tensor-parallel step's token ids live on the workers")

    def commit_mask(self) -> None:
        """Send the filled bitmask; every rank then queues its masked sampling (once)."""
        if not self._committed:
            self._committed = True
            self._runner.send(_CommitMask(self.step, self.bitmask))

    def result(self) -> StepResult:
        """Wait for rank 0's result of this step (once).

        Raises:
            RunnerDeadError: a worker died.
            RuntimeError: the step failed on the workers (the batch, not the workers).
        """
        if self._result is None:
            self._result = self._runner.fetch(self.step)
        return self._result


class TPRunner:
    """The engine core's runner under tensor parallelism: starts the workers of this host and
    relays batches to them. Same interface as ``ModelRunner`` for the engine core.

    Args:
        model_path: model directory or GGUF file (every host needs it at the same path).
        model_config / cache_config: as for ``ModelRunner`` (each rank uses cuda:local_rank).
        parallel: tp_size, rendezvous address and nodes; this must be node 0.
        eos_token_ids: EOS ids for sampling.
        progress: show rank 0's weight-loading bar.

    Raises:
        ValueError: a model or topology that cannot be split this way.
        RunnerDeadError: a worker failed to start (its traceback in the message).
    """

    def __init__(
        self,
        model_path: str,
        model_config: ModelConfig,
        cache_config: CacheConfig,
        parallel: ParallelConfig,
        eos_token_ids: frozenset[int] = frozenset(),
        progress: bool = True,
    ):
        if parallel.node_rank != 0:
            raise ValueError("the engine runs on node 0; other nodes run only their workers")
        if parallel.nnodes > 1 and not parallel.dist_init_addr:
            raise ValueError("several nodes need --dist-init-addr HOST:PORT (node 0's address)")
        addr = parallel.dist_init_addr or f"127.0.0.1:{free_port()}"
        specs = worker_specs(
            model_path, model_config, cache_config, parallel, eos_token_ids, progress, addr
        )
        self.tp_size = parallel.tp_size
        self.workers = WorkerGroup(specs)
        ready = self.workers.wait_ready()
        first = ready[0]
        self.pool = PoolShape(first.num_pages, first.info.page_size, first.first_usable_slot)
        self.vocab_size = first.info.vocab_size
        self.context_length = first.info.context_length
        self._ranks = {msg.rank: msg.info for msg in ready}
        self.graph_batch_sizes: list[int] = []
        self._steps = itertools.count(1)

    @property
    def info(self) -> RunnerInfo:
        return self._ranks[0]

    @property
    def rank_infos(self) -> list[RunnerInfo]:
        """One entry per rank on this host (rank order)."""
        return [self._ranks[r] for r in sorted(self._ranks)]

    def capture_cuda_graphs(self, max_batch_size: int) -> None:
        """Every rank captures its decode graphs (their collectives included)."""
        self.send(_Capture(max_batch_size))
        msg = self.workers.receive()
        if not isinstance(msg, _Captured):
            raise self.workers._fail(f"unexpected answer to a capture: {msg!r}")
        self.graph_batch_sizes = msg.batch_sizes

    def launch(self, batch: ScheduledBatch, futures: RemoteStep | None = None) -> RemoteStep:
        """Send one step to every rank.

        Args:
            batch: the scheduled rows.
            futures: the step in flight whose sampled ids the batch's placeholders point into.

        Returns:
            The remote step (its bitmask, if any, to fill before ``commit_mask``).
        """
        step = next(self._steps)
        self.send(
            _Launch(step, compact_batch(batch), futures.step if futures is not None else None)
        )
        rows = getattr(batch, "num_mask_rows", 0)
        bitmask = None
        if rows and any(s.sample for s in batch.seqs):
            bitmask = torch.empty((rows, -(-self.vocab_size // 32)), dtype=torch.int32)
        return RemoteStep(self, step, bitmask)

    def forward(self, batch: ScheduledBatch) -> StepResult:
        """Run one step and wait for it."""
        pending = self.launch(batch)
        pending.commit_mask()
        return pending.result()

    def send(self, msg: Any) -> None:
        self.workers.send(msg)

    def fetch(self, step: int) -> StepResult:
        """Rank 0's result of ``step`` (see :meth:`RemoteStep.result`)."""
        self.send(_Fetch(step))
        msg = self.workers.receive()
        if not isinstance(msg, _StepDone) or msg.step != step:
            raise self.workers._fail(f"rank 0 answered step {step} with {msg!r}")
        if msg.error is not None:
            # A peer's death shows on rank 0 as a failed collective: report the death.
            self.workers.check()
            raise RuntimeError(f"step failed on the tensor-parallel workers: {msg.error}")
        return msg.result

    def close(self) -> None:
        """Stop the workers (killed if they do not exit within a few seconds)."""
        self.workers.stop()
