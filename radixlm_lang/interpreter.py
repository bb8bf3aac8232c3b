"""Executes a program's expressions against a backend.

Every program state owns a :class:`StreamExecutor`: a worker thread that runs the state's
expressions in order while the program's Python code runs ahead. ``s += gen(...)`` therefore
returns at once; reading ``s["x"]`` waits only for the expression that defines ``x``. Forked
states have their own workers, so the branches of a fork are served concurrently, and the
server batches them together.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import queue
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from radixlm_lang import ir
from radixlm_lang.backends.base import Backend
from radixlm_lang.choices import ChoiceLogprobs
from radixlm_lang.dtypes import dtype_constraint
from radixlm_lang.reasoning import REASONING_SUFFIX, split_reasoning
from radixlm_lang.sampling import SamplingParams

_END = object()


class ProgramError(RuntimeError):
    """A program misused the language, or needed a value that a failed step never produced."""


class GenerationAborted(RuntimeError):
    """The backend finished a generation with ``finish_reason`` abort (e.g. an aborted request)."""


@dataclass(frozen=True)
class ExecutionOptions:
    """What every executor of one program run shares.

    Attributes:
        backend: the model backend.
        defaults: program-wide generation parameters (``run(**default_sampling)``).
        stream: stream generations piece by piece (for ``text_iter``).
        fork_prefixes: from ``compile()``: per fork (``(stream path, fork ordinal)``), the
            constant text its branches begin with, hoisted into the prefix sent at the fork.
    """

    backend: Backend
    defaults: SamplingParams = SamplingParams()
    stream: bool = False
    fork_prefixes: Any = None


class StreamExecutor:
    """Runs one program state's expressions on a worker thread, in submission order.

    Args:
        options: backend and settings shared by the whole run.
        path: where this state sits in the fork tree (``()`` for the root).
    """

    def __init__(self, options: ExecutionOptions, path: tuple = ()):
        self.options = options
        self.path = path
        self.text = ""
        self.messages: list[dict[str, str]] = []
        self.variables: dict[str, Any] = {}
        self.meta_info: dict[str, Any] = {}
        self.children: list[StreamExecutor] = []
        self.fork_base = 0  # length of the text inherited from the parent
        self.fork_base_messages = 0
        self.assigned: list[str] = []  # variables set since the fork, in order
        self._error: BaseException | None = None
        self._role: str | None = None
        self._role_start = 0
        self._scopes: dict[str, int] = {}
        self._forks_made = 0
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._cond = threading.Condition()
        self._chunks: list[tuple[str | None, str, dict[str, Any]]] = []
        self._pending: dict[str, int] = {}  # variable -> queued expressions that will set it
        self._finished = False

    # ---- called from the program's thread ----

    def submit(self, expr: ir.Expr) -> None:
        """Queue ``expr`` (flattened) for the worker."""
        self._ensure_worker()
        for leaf in expr.flatten():
            with self._cond:
                for name in _defined_names(leaf):
                    self._pending[name] = self._pending.get(name, 0) + 1
            self._queue.put(leaf)

    def sync(self) -> None:
        """Wait until every queued expression has run."""
        if self._thread is not None:
            self._queue.join()

    def get_var(self, name: str) -> Any:
        """The value of variable ``name``, waiting for the step that sets it.

        Raises:
            ProgramError: the program failed before setting it.
            KeyError: no step sets it.
        """
        with self._cond:
            self._cond.wait_for(lambda: not self._pending.get(name) or self._error is not None)
        if name not in self.variables:
            self.sync()
        if name in self.variables:
            return self.variables[name]
        if self._error is not None:
            message = f"variable {name!r} was not produced: {self._error}"
            raise ProgramError(message) from self._error
        raise KeyError(name)

    def set_var(self, name: str, value: Any) -> None:
        """Set a variable directly (after the queued steps)."""
        self.sync()
        self._assign(name, value, None)

    def fork(self, size: int) -> list[StreamExecutor]:
        """Split into ``size`` copies after sending the text so far once (so the cache holds it).

        Returns:
            The child executors, each starting from this state's text, messages and variables.
        """
        if size < 1:
            raise ValueError(f"fork size must be >= 1, got {size}")
        self.sync()
        ordinal = self._forks_made
        self._forks_made += 1
        self._warm_prefix(ordinal)
        children = [self._child((ordinal, i)) for i in range(size)]
        self.children.extend(children)
        return children

    def end(self) -> None:
        """Finish: wait for the queue, stop the worker and those of every descendant."""
        if self._thread is not None:
            self._queue.put(_END)
            self._thread.join()
        for child in self.children:
            child.end()
        with self._cond:
            self._finished = True
            self._cond.notify_all()

    @property
    def error(self) -> BaseException | None:
        return self._error

    def fail(self, exc: BaseException) -> None:
        """Record ``exc`` as the state's error unless an earlier one is already recorded."""
        with self._cond:
            if self._error is None:
                self._error = exc
            self._cond.notify_all()

    def current_messages(self) -> list[dict[str, str]]:
        """The chat messages, with the open message's content so far."""
        messages = copy.deepcopy(self.messages)
        if self._role is not None:
            messages[-1]["content"] = self.text[self._role_start :]
        return messages

    def chunks(self, var: str | None = None) -> Iterator[tuple[dict[str, Any], str]]:
        """Text as it is appended (``var``: only that variable's generated text), until the end.

        Yields:
            ``(meta_info, piece)``: the generation's meta_info as known with this piece (``{}``
            until it finishes) and the text; a finished stream's meta_info may come with "".
        """
        seen = 0
        while True:
            with self._cond:
                self._cond.wait_for(functools.partial(self._has_news, seen))
                batch, seen = self._chunks[seen:], len(self._chunks)
                done = self._finished and seen == len(self._chunks)
            for owner, piece, meta in batch:
                if var is None or owner == var:
                    yield meta, piece
            if done:
                return

    def _has_news(self, seen: int) -> bool:
        return len(self._chunks) > seen or self._finished

    # ---- the worker ----

    def _ensure_worker(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._work, name="radixlm-lang-state", daemon=True
            )
            self._thread.start()

    def _work(self) -> None:
        while True:
            expr = self._queue.get()
            try:
                if expr is _END:
                    return
                if self._error is None:
                    self._execute(expr)
            except Exception as exc:
                self.fail(exc)
            finally:
                self._settle(expr)
                self._queue.task_done()

    def _settle(self, expr: Any) -> None:
        names = _defined_names(expr) if isinstance(expr, ir.Expr) else ()
        with self._cond:
            for name in names:
                self._pending[name] -= 1
            self._cond.notify_all()

    def _execute(self, expr: ir.Expr) -> None:
        handler = _HANDLERS.get(type(expr))
        if handler is None:
            raise ProgramError(f"cannot execute {type(expr).__name__}")
        handler(self, expr)

    def _append(self, text: str, var: str | None = None, meta: Any = None) -> None:
        if not text and meta is None:
            return
        with self._cond:
            self.text += text
            self._chunks.append((var, text, meta or {}))
            self._cond.notify_all()

    def _assign(self, name: str, value: Any, meta: Any) -> None:
        self.variables[name] = value
        if meta is not None:
            self.meta_info[name] = meta
        if name not in self.assigned:
            self.assigned.append(name)

    # ---- expression handlers ----

    def _exec_text(self, expr: ir.Text) -> None:
        self._append(expr.text)

    def _exec_gen(self, expr: ir.Gen) -> None:
        params = self.options.defaults.merged(expr.params)
        if expr.dtype is not None:
            regex, stops = dtype_constraint(expr.dtype)
            params = replace(params, regex=regex, stop=(params.stop or ()) + stops)
        messages = self._chat_messages_for_gen()
        backend = self.options.backend
        if (params.n or 1) > 1:
            self._gen_samples(expr, backend, params, messages)
            return
        if params.max_new_tokens == 0 and params.top_logprobs_num:
            text, meta = "", _next_token_distribution(backend, self.text, params, messages)
        elif params.stop_regex:
            text, meta = _until_regex(backend, self.text, params, messages)
            self._append(text, expr.name, meta)
        elif self.options.stream:
            text, meta = self._stream_gen(backend, params, messages, expr.name)
        else:
            completion = backend.generate(self.text, params, messages)
            text, meta = completion.text, completion.meta_info
            self._append(text, expr.name, meta)
        if params.return_text_in_logprobs:
            meta = _with_token_texts(backend, meta)
        if expr.name is not None:
            self._assign(expr.name, text, meta)
        _raise_if_aborted(expr.name, meta)

    def _gen_samples(self, expr: ir.Gen, backend, params, messages) -> None:
        """``n > 1``: the variable gets every sample, the text continues with the first."""
        if params.stop_regex:
            raise ProgramError("gen(n > 1) cannot be combined with stop_regex")
        completions = backend.generate_samples(self.text, params, messages)
        metas = [c.meta_info for c in completions]
        if params.return_text_in_logprobs:
            metas = [_with_token_texts(backend, m) for m in metas]
        self._append(completions[0].text, expr.name)
        if expr.name is not None:
            self._assign(expr.name, [c.text for c in completions], metas)
        for meta in metas:
            _raise_if_aborted(expr.name, meta)

    def _stream_gen(self, backend, params, messages, name) -> tuple[str, dict]:
        pieces, meta = [], {}
        for delta in backend.generate_stream(self.text, params, messages):
            pieces.append(delta.text)
            self._append(delta.text, name, delta.meta_info)
            if delta.meta_info is not None:
                meta = delta.meta_info
        return "".join(pieces), meta

    def _chat_messages_for_gen(self) -> list[dict[str, str]] | None:
        if not self.options.backend.uses_chat_messages or self._role is None:
            return None
        if self._role != "assistant":
            raise ProgramError("a chat-message backend generates only inside an assistant role")
        messages = self.current_messages()
        if messages[-1]["content"]:
            raise ProgramError(
                "a chat-message backend cannot continue a partially written assistant message; "
                "put gen() first in the assistant role"
            )
        return messages[:-1]

    def _exec_select(self, expr: ir.Select) -> None:
        method = expr.method
        scored = self.options.backend.score_choices(
            self.text, expr.choices, unconditional=method.needs_unconditional
        )
        decision = method.decide(scored)
        choice = expr.choices[decision.index]
        self._append(choice, expr.name)
        if expr.name is not None:
            self._assign(expr.name, choice, _select_meta(method.name, scored, decision))

    def _exec_separate_reasoning(self, expr: ir.SeparateReasoning) -> None:
        value = self.variables.get(expr.name)
        if not isinstance(value, str):
            raise ProgramError(f"separate_reasoning: variable {expr.name!r} holds no text")
        reasoning, answer = split_reasoning(value, expr.model_type)
        self._assign(expr.name, answer, self.meta_info.get(expr.name))
        self._assign(expr.name + REASONING_SUFFIX, reasoning, None)

    def _exec_role_begin(self, expr: ir.RoleBegin) -> None:
        if self._role is not None:
            raise ProgramError(f"cannot open a {expr.role!r} message inside a {self._role!r} one")
        history = tuple(m["role"] for m in self.messages)
        header = self.options.backend.chat_renderer().header(history, expr.role)
        self._append(header)
        self.messages.append({"role": expr.role, "content": ""})
        self._role, self._role_start = expr.role, len(self.text)

    def _exec_role_end(self, expr: ir.RoleEnd) -> None:
        if self._role != expr.role:
            raise ProgramError(f"{expr.role}_end() without an open {expr.role!r} message")
        self.messages[-1]["content"] = self.text[self._role_start :]
        self._role = None
        roles = tuple(m["role"] for m in self.messages)
        self._append(self.options.backend.chat_renderer().footer(roles))

    def _exec_scope_begin(self, expr: ir.VarScopeBegin) -> None:
        self._scopes[expr.name] = len(self.text)

    def _exec_scope_end(self, expr: ir.VarScopeEnd) -> None:
        if expr.name not in self._scopes:
            raise ProgramError(f"var_scope {expr.name!r} ended without beginning")
        self._assign(expr.name, self.text[self._scopes.pop(expr.name) :], None)

    def _exec_join(self, expr: ir.Join) -> None:
        children = expr.forks.executors
        for child in children:
            child.sync()
        for index, child in enumerate(children):
            if child.error is not None:
                raise ProgramError(f"fork branch {index} failed: {child.error}") from child.error
        if expr.mode == "gather":
            self._gather(children)
        else:
            self._concat(children)

    def _gather(self, children: list[StreamExecutor]) -> None:
        names = list(dict.fromkeys(n for child in children for n in child.assigned))
        for name in names:
            self._assign(name, [c.variables.get(name) for c in children], None)
            self.meta_info[name] = [c.meta_info.get(name) for c in children]

    def _concat(self, children: list[StreamExecutor]) -> None:
        for child in children:
            self._append(child.text[child.fork_base :])
            self.messages.extend(copy.deepcopy(child.messages[child.fork_base_messages :]))

    # ---- fork helpers ----

    def _warm_prefix(self, ordinal: int) -> None:
        hoisted = ""
        if self.options.fork_prefixes is not None:
            hoisted = self.options.fork_prefixes.get((self.path, ordinal), "")
        prefix = self.text + hoisted
        if prefix and self._error is None:
            try:
                self.options.backend.cache_prefix(prefix)
            except Exception as exc:
                self.fail(exc)

    def _child(self, step: tuple[int, int]) -> StreamExecutor:
        child = StreamExecutor(self.options, self.path + (step,))
        child.text = self.text
        child.messages = copy.deepcopy(self.messages)
        child.variables = dict(self.variables)
        child.meta_info = dict(self.meta_info)
        child.fork_base, child.fork_base_messages = len(self.text), len(self.messages)
        child._role, child._role_start = self._role, self._role_start
        child._scopes = dict(self._scopes)
        child._error = self._error
        return child


def _defined_names(expr: ir.Expr) -> tuple[str, ...]:
    if isinstance(expr, (ir.Gen, ir.Select, ir.VarScopeEnd)) and expr.name is not None:
        return (expr.name,)
    if isinstance(expr, ir.SeparateReasoning):
        return (expr.name, expr.name + REASONING_SUFFIX)
    return ()


def _raise_if_aborted(name: str | None, meta: dict[str, Any] | None) -> None:
    finish = (meta or {}).get("finish_reason") or {}
    if finish.get("type") == "abort":
        reason = finish.get("message") or "aborted"
        raise GenerationAborted(f"gen {name!r} was aborted by the backend: {reason}")


def _next_token_distribution(backend, prompt, params, messages) -> dict[str, Any]:
    """``max_tokens=0`` with ``top_logprobs_num``: SGLang reports the top logprobs of the token
    that would come next (``output_top_logprobs[0]``) and generates nothing.

    The backend is asked for one greedy token with its top logprobs; the token itself is
    dropped, only the distribution it was drawn from is kept.
    """
    probe = replace(params, max_new_tokens=1, min_new_tokens=None, temperature=0.0,
                    return_logprob=True)  # fmt: skip
    meta = dict(backend.generate(prompt, probe, messages).meta_info)
    meta["output_top_logprobs"] = (meta.get("output_top_logprobs") or [])[:1]
    meta["output_token_logprobs"] = []
    meta["completion_tokens"] = 0
    meta["finish_reason"] = {"type": "length", "matched": None}
    return meta


def _until_regex(backend, prompt, params, messages) -> tuple[str, dict[str, Any]]:
    """Generate until the output matches one of ``params.stop_regex``; cut the match off.

    The generation is streamed and the stream closed at the first match, which ends the
    request on the server too.
    """
    patterns = [re.compile(p) for p in params.stop_regex]
    text, meta = "", {}
    stream = backend.generate_stream(prompt, params, messages)
    with contextlib.closing(stream):
        for delta in stream:
            text += delta.text
            if delta.meta_info is not None:
                meta = delta.meta_info
            hits = [m for m in (p.search(text) for p in patterns) if m is not None]
            if hits:
                first = min(hits, key=lambda m: m.start())
                finish = {"type": "stop", "matched": first.group(0)}
                return text[: first.start()], {**meta, "finish_reason": finish}
    return text, meta


_LOGPROB_KEYS = ("input_token_logprobs", "output_token_logprobs")
_TOP_KEYS = ("input_top_logprobs", "output_top_logprobs")


def _with_token_texts(backend, meta: dict[str, Any]) -> dict[str, Any]:
    """``meta`` whose logprob entries all end with the token's text ([logprob, id, text])."""
    entries = [e for k in _LOGPROB_KEYS for e in meta.get(k) or ()]
    entries += [e for k in _TOP_KEYS for row in meta.get(k) or () for e in row or ()]
    missing = [e[1] for e in entries if len(e) < 3 or e[2] is None]
    if not missing:
        return meta
    texts = dict(zip(missing, backend.token_texts(missing)))

    def fill(entry):
        return [entry[0], entry[1], texts[entry[1]] if len(entry) < 3 or entry[2] is None
                else entry[2]]  # fmt: skip

    out = dict(meta)
    for key in _LOGPROB_KEYS:
        if meta.get(key) is not None:
            out[key] = [fill(e) for e in meta[key]]
    for key in _TOP_KEYS:
        if meta.get(key) is not None:
            out[key] = [None if row is None else [fill(e) for e in row] for row in meta[key]]
    return out


def _select_meta(method: str, scored: ChoiceLogprobs, decision) -> dict[str, Any]:
    means = [sum(r) / len(r) if r else float("-inf") for r in scored.token_logprobs]
    texts = scored.token_texts or tuple((None,) * len(r) for r in scored.token_ids)
    return {
        # SGLang's keys: per choice, [logprob, token id, token text] of each of its tokens, and
        # the output tokens of the scoring requests (none: they generate nothing).
        "input_token_logprobs": [
            [[lp, tid, text] for lp, tid, text in zip(lps, ids, row)]
            for lps, ids, row in zip(scored.token_logprobs, scored.token_ids, texts)
        ],
        "output_token_logprobs": [[] for _ in scored.choices],
        "method": method,
        "choices": list(scored.choices),
        "selected_index": decision.index,
        "scores": list(decision.scores),
        "normalized_prompt_logprobs": means,
        "token_ids": [list(ids) for ids in scored.token_ids],
        "token_logprobs": [list(r) for r in scored.token_logprobs],
        "unconditional_token_logprobs": (
            None
            if scored.unconditional_logprobs is None
            else [list(r) for r in scored.unconditional_logprobs]
        ),
    }


_HANDLERS = {
    ir.Text: StreamExecutor._exec_text,
    ir.Gen: StreamExecutor._exec_gen,
    ir.Select: StreamExecutor._exec_select,
    ir.RoleBegin: StreamExecutor._exec_role_begin,
    ir.RoleEnd: StreamExecutor._exec_role_end,
    ir.VarScopeBegin: StreamExecutor._exec_scope_begin,
    ir.VarScopeEnd: StreamExecutor._exec_scope_end,
    ir.Join: StreamExecutor._exec_join,
    ir.SeparateReasoning: StreamExecutor._exec_separate_reasoning,
}
