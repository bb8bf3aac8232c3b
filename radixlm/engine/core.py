"""The engine core: the one place where the scheduler and the model runner meet.

``EngineCore`` is usable in-process (tests, benchmarks); ``run_core_loop`` drives it inside the
core process, talking to the caller only through the messages in :mod:`radixlm.engine.ipc`.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
import traceback
from typing import Any

from radixlm.config import EngineConfig
from radixlm.constrained import GrammarCompiler
from radixlm.engine import ipc
from radixlm.engine.overlap import StepLoop
from radixlm.executor.errors import RunnerDeadError
from radixlm.executor.memory import default_prefill_chunk
from radixlm.executor.model_runner import ModelRunner
from radixlm.executor.tp_worker import TPRunner
from radixlm.kvcache.allocator import PageAllocator
from radixlm.kvcache.radix_tree import RadixCache
from radixlm.kvcache.tree_summary import summarize_tree
from radixlm.model.loader import model_metadata_dir
from radixlm.outputs import TokenOutput
from radixlm.process_exit import exit_now
from radixlm.request import FinishKind, FinishReason, Request
from radixlm.sched.grammar_state import GrammarState
from radixlm.sched.kv_manager import KVManager
from radixlm.sched.scheduler import Scheduler, SchedulerLimits
from radixlm.tokenizer.detokenizer import IncrementalDetokenizer
from radixlm.tokenizer.tokenizer import eos_token_ids, load_tokenizer

logger = logging.getLogger(__name__)

# With requests waiting only on grammar compilation the loop polls at this interval (seconds).
IDLE_POLL_SECONDS = 0.002


class EngineCore:
    """Scheduler + model runner over one KV pool.

    Args:
        config: the engine configuration; ``config.model.model`` must be a model directory or
            GGUF file.
        progress: show a progress bar while weights load.
    """

    def __init__(self, config: EngineConfig, progress: bool = True):
        self.config = config
        path = config.model.model
        meta_dir = model_metadata_dir(path)
        self.tokenizer = load_tokenizer(config.model.tokenizer or meta_dir)
        eos = frozenset(eos_token_ids(self.tokenizer, meta_dir))
        if config.parallel.tp_size > 1:
            self.runner = TPRunner(path, config.model, config.cache, config.parallel, eos,
                                   progress=progress)
        else:  # in this process: no worker, no collective
            self.runner = ModelRunner(path, config.model, config.cache, eos, progress=progress)
        self.config = config = with_default_prefill_chunk(config, self.runner.info.device)
        pool = self.runner.pool
        self.allocator = PageAllocator(pool.num_pages, pool.page_size, pool.first_usable_slot)
        enable = config.cache.enable_radix_cache
        tree = RadixCache(pool.page_size, free_fn=self.allocator.free, disabled=not enable)
        self.kv = KVManager(self.allocator, tree, enable)
        limits = SchedulerLimits(self._max_running(), self.runner.context_length, eos)
        graph_bs = min(config.model.cuda_graph_max_batch_size, limits.max_running_requests)
        if graph_bs > 0:
            self.runner.capture_cuda_graphs(graph_bs)
        compiler = GrammarCompiler(self.tokenizer, backend=config.grammar_backend,
                                   vocab_size=self.runner.vocab_size)
        self.grammar = GrammarState(compiler, self.tokenizer,
                                    config.scheduler.enable_jump_forward)
        self.scheduler = Scheduler(config.scheduler, limits, self.kv, self.grammar,
                                   self._stop_checker, seed=config.model.random_seed)
        self.loop = StepLoop(self.scheduler, self.runner, config.scheduler.enable_overlap)

    def _max_running(self) -> int:
        configured = self.config.scheduler.max_running_requests
        if configured:
            return configured
        return max(1, min(512, self.runner.pool.capacity_tokens // 64))

    def _stop_checker(self, req: Request) -> IncrementalDetokenizer | None:
        if not req.params.stop:
            return None
        return IncrementalDetokenizer(
            self.tokenizer, skip_special_tokens=req.params.skip_special_tokens,
            stop=req.params.stop, prompt_token_ids=req.input_ids)

    # ---- requests -------------------------------------------------------------------------

    def add_request(self, msg: ipc.AddRequest) -> TokenOutput | None:
        """Queue a request.

        Returns:
            None when queued; an ABORT output naming the reason when the request cannot even be
            queued (a constraint the compiler cannot take, say), so one bad request never takes
            the core down.
        """
        req = Request(rid=msg.rid, input_ids=list(msg.input_ids), params=msg.params,
                      logprob=msg.logprob, namespace=msg.namespace)
        try:
            self.grammar.submit(req)
            self.scheduler.add(req)
        except Exception as exc:
            logger.warning("request %s refused:\n%s", msg.rid, traceback.format_exc())
            self.grammar.forget(req)
            reason = FinishReason(FinishKind.ABORT, message=f"invalid request: {exc!r}")
            return TokenOutput(rid=msg.rid, new_token_ids=[], finish=reason,
                               prompt_tokens=len(req.input_ids), cached_tokens=0)
        return None

    def abort(self, rid: str, message: str = "aborted") -> TokenOutput | None:
        """Finish request ``rid`` now, even with a step of it in flight (that row's result is
        dropped; its slots are freed at once, which is safe because any later reuse of them is
        queued on the device behind the step in flight).

        Returns:
            Its final output, or None if the request is unknown or already finished.
        """
        return self.scheduler.abort(rid, message)

    def step(self) -> list[TokenOutput]:
        """Run one step of the loop (see :mod:`radixlm.engine.overlap`).

        Serially: schedule, run and process one batch. With overlap: schedule and launch the
        next batch, then process the one launched by the previous call.

        Returns:
            The outputs produced (maybe none).
        """
        return self.loop.step()

    def close(self) -> None:
        """Stop helper workers (grammar compilation, the mask thread, tensor-parallel ranks)."""
        self.loop.close()
        self.grammar.close()
        self.runner.close()

    def has_work(self) -> bool:
        """Requests queued or running, or a step in flight whose outputs are still to come."""
        return self.loop.has_work()

    # ---- control --------------------------------------------------------------------------

    def flush_cache(self) -> bool:
        """Empty the radix cache. False (nothing done) while requests are in flight.

        A step still in flight is processed first (its outputs come with the next ``step()``),
        so a flush right after the last request finished succeeds.
        """
        self.loop.drain()
        if self.scheduler.has_work():
            return False
        self.kv.flush()
        return True

    def server_info(self) -> dict[str, Any]:
        info = self.runner.info
        tree = self.kv.tree
        stats = self.scheduler.stats
        prompt = stats["prompt_tokens"]
        return {
            "model_path": self.config.model.model,
            "device": info.device,
            "tp_size": self.config.parallel.tp_size,
            "tp_ranks": [
                {"rank": rank, "device": r.device, "kv_capacity_tokens": r.kv_capacity_tokens}
                for rank, r in enumerate(self.runner.rank_infos)
            ],
            "dtype": info.dtype,
            "context_length": info.context_length,
            "vocab_size": info.vocab_size,
            "page_size": info.page_size,
            "kv_capacity_tokens": info.kv_capacity_tokens,
            "kv_free_tokens": self.allocator.free_tokens,
            "radix_cache_tokens": tree.total_tokens(),
            "evictable_tokens": tree.evictable_tokens(),
            "running_requests": len(self.scheduler.running) + len(self.scheduler.prefilling),
            "waiting_requests": len(self.scheduler.waiting),
            "max_running_requests": self.scheduler.limits.max_running_requests,
            "cache_hit_rate": stats["cached_tokens"] / prompt if prompt else 0.0,
            "num_prompt_tokens": prompt,
            "num_cached_tokens": stats["cached_tokens"],
            "num_generated_tokens": stats["generated_tokens"],
            "num_retractions": stats["retractions"],
            "config": self.config.flat(),
        }

    def dashboard_state(self) -> dict[str, Any]:
        """What the dashboard shows, as plain data: figures, the tree's largest nodes, and the
        recent batches, admissions and compilations. Bounded work whatever the tree's size."""
        info = self.server_info()
        info.pop("config", None)
        return {
            "time": time.time(),
            "info": info,
            "tree": summarize_tree(self.kv.tree),
            "activity": self.scheduler.telemetry.snapshot(),
        }

    def check_invariants(self) -> None:
        """Every slot is in exactly one place; raises AssertionError otherwise.

        Valid with a step in flight: its slots belong to their requests (or, for a request
        that finished meanwhile, are already back on the free list).
        """
        live = self.kv.live_slots(self.scheduler.all_requests())
        self.kv.tree.check_invariants(self.allocator, live)

    def control(self, command: str) -> Any:
        if command == "flush_cache":
            return self.flush_cache()
        if command == "server_info":
            return self.server_info()
        if command == "dashboard_state":
            return self.dashboard_state()
        if command == "check_invariants":
            self.check_invariants()
            return True
        raise ValueError(f"unknown control command {command!r}")


def with_default_prefill_chunk(config: EngineConfig, device: str) -> EngineConfig:
    """``config`` with ``chunked_prefill_size`` sized for ``device`` when it is unset (None).

    Args:
        config: the engine configuration.
        device: the runner's device ("cpu", "cuda:0").

    Returns:
        The same config, or a copy whose scheduler section carries the default chunk.
    """
    if config.scheduler.chunked_prefill_size is not None:
        return config
    chunk = default_prefill_chunk(device.split(":", 1)[0])
    scheduler = dataclasses.replace(config.scheduler, chunked_prefill_size=chunk)
    return dataclasses.replace(config, scheduler=scheduler)


def run_core_loop(config: EngineConfig, conn) -> None:
    """The core process's main function: build the core, then serve messages until shutdown."""
    logging.basicConfig(level=logging.INFO)
    try:
        core = EngineCore(config)
    except Exception as exc:
        conn.send(ipc.Fatal(f"engine failed to start: {exc!r}\n{traceback.format_exc()}"))
        return
    # Weights' wrappers, the tokenizer and grammar tables live as long as the process: moving
    # them out of the collector's reach keeps each cyclic collection from rescanning them
    # (in a trial at batch 256 the collector's share of a step fell from ~1.5 ms to ~0.3 ms).
    gc.collect()
    gc.freeze()
    conn.send(ipc.Ready(core.server_info()))
    try:
        while _drain_messages(core, conn):
            outputs = core.step()
            if outputs:
                conn.send(ipc.Outputs(outputs))
    except (EOFError, BrokenPipeError, ConnectionResetError):
        logger.info("caller went away; engine core exits")
    except RunnerDeadError as exc:  # a tensor-parallel rank died: no step can run any more
        logger.error("engine core stops: %s", exc)
        try:
            conn.send(ipc.Fatal(f"engine core stopped: {exc}"))
        except OSError:
            pass
    finally:
        core.close()
        # Give the frozen start-up heap back to the collector: objects left frozen are never
        # freed at exit, and Triton's nanobind bindings then report each one as a leak (a wall
        # of ~30 "nanobind: leaked ..." lines on every shutdown).
        gc.unfreeze()


def run_core_process(config: EngineConfig, conn) -> None:
    """The core process's entry point: ``run_core_loop``, then end the process at once.

    A spawned child ends through ``sys.exit``, and CPython's finalization would then collect
    over every object the process holds (torch, transformers, triton, the model) while the
    caller's ``shutdown()`` waits in ``join``: 2.4 s of a loaded 2-core host. Once the loop has
    returned its workers are stopped, so :func:`radixlm.process_exit.exit_now` ends the process
    after its exit hooks. An exception still takes the ordinary path.

    Args:
        config: the engine configuration.
        conn: this process's end of the pipe to the caller.
    """
    run_core_loop(config, conn)
    conn.close()
    exit_now(0)


def _drain_messages(core: EngineCore, conn) -> bool:
    """Handle every pending message; block while idle. False on shutdown."""
    timeout = None if not core.has_work() else 0
    if core.loop.only_waiting():
        timeout = IDLE_POLL_SECONDS
    while conn.poll(timeout):
        msg = conn.recv()
        if not _handle(core, conn, msg):
            return False
        timeout = 0
    return True


def _handle(core: EngineCore, conn, msg) -> bool:
    if isinstance(msg, ipc.AddRequest):
        refused = core.add_request(msg)
        if refused is not None:
            conn.send(ipc.Outputs([refused]))
    elif isinstance(msg, ipc.AbortRequest):
        out = core.abort(msg.rid, msg.message)
        if out is not None:
            conn.send(ipc.Outputs([out]))
    elif isinstance(msg, ipc.Control):
        if msg.command == "shutdown":
            conn.send(ipc.ControlReply(msg.token, True))
            return False
        try:
            value = core.control(msg.command)
        except Exception as exc:
            value = exc
        conn.send(ipc.ControlReply(msg.token, value))
    return True
