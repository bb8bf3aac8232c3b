"""The words of the language: gen, select, roles, and the default backend."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from radixlm_lang import ir
from radixlm_lang.choices import ChoicesMethod, token_length_normalized
from radixlm_lang.sampling import SamplingParams


def gen(
    name: str | None = None,
    max_tokens: int | None = None,
    min_tokens: int | None = None,
    stop: str | Sequence[str] | None = None,
    stop_token_ids: Sequence[int] | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    frequency_penalty: float | None = None,
    presence_penalty: float | None = None,
    ignore_eos: bool | None = None,
    regex: str | None = None,
    json_schema: str | dict | None = None,
    dtype: type | None = None,
    choices: Sequence[str] | None = None,
    choices_method: ChoicesMethod | None = None,
    return_logprob: bool | None = None,
    top_logprobs_num: int | None = None,
    **more: Any,
) -> ir.Expr:
    """Generate text into variable ``name``.

    Args:
        name: the variable that receives the output (None: only appended to the text).
        max_tokens: most tokens to generate (radixlm's ``max_new_tokens``).
        min_tokens: fewest tokens before EOS/stop may end it (``min_new_tokens``).
        stop, stop_token_ids, temperature, top_p, top_k, min_p, frequency_penalty,
        presence_penalty, ignore_eos: sampling, as in radixlm's SamplingParams.
        regex, json_schema: constrain the output (needs the server's constrained decoding).
        dtype: int, float, str or bool: constrain with a regex and convert the value.
        choices: turn this into :func:`select` over these choices.
        choices_method: how select scores choices (with ``choices``).
        return_logprob, top_logprobs_num: ask for logprobs in the variable's meta_info.
        **more: any other field of :class:`SamplingParams` (seed, repetition_penalty, ...).

    Returns:
        An expression to append to a state.
    """
    if choices is not None:
        return select(name, choices, choices_method=choices_method)
    params = SamplingParams.from_kwargs(
        max_tokens=max_tokens, min_tokens=min_tokens, stop=stop, stop_token_ids=stop_token_ids,
        temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
        frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
        ignore_eos=ignore_eos, regex=regex, json_schema=json_schema,
        return_logprob=return_logprob, top_logprobs_num=top_logprobs_num, **more,
    )  # fmt: skip
    if dtype is not None and (params.regex or params.json_schema):
        raise TypeError("gen(dtype=...) cannot be combined with regex or json_schema")
    if dtype is not None and dtype not in (int, float, str, bool):
        raise TypeError(f"gen(dtype=...) supports int, float, str and bool, not {dtype!r}")
    return ir.Gen(name, params, dtype)


def gen_int(name: str | None = None, **kwargs: Any) -> ir.Expr:
    """``gen(name, dtype=int, ...)``."""
    return gen(name, dtype=int, **kwargs)


def gen_string(name: str | None = None, **kwargs: Any) -> ir.Expr:
    """``gen(name, dtype=str, ...)``: a JSON-quoted string, stored unquoted."""
    return gen(name, dtype=str, **kwargs)


def select(
    name: str | None = None,
    choices: Sequence[str] | None = None,
    choices_method: ChoicesMethod | None = None,
) -> ir.Expr:
    """Append the choice the model scores best and store it in ``name``.

    Args:
        name: the variable that receives the choice.
        choices: the non-empty candidate strings.
        choices_method: ``token_length_normalized`` (default), ``greedy_token_selection`` or
            ``unconditional_likelihood_normalized``.

    Returns:
        An expression to append to a state.
    """
    if not choices or not all(isinstance(c, str) and c for c in choices):
        raise ValueError("select needs a non-empty list of non-empty strings")
    method = choices_method or token_length_normalized
    if not isinstance(method, ChoicesMethod):
        raise TypeError(f"choices_method must be a ChoicesMethod, not {method!r}")
    return ir.Select(name, tuple(choices), method)


def system(expr: Any = None) -> ir.Expr:
    """A system message around ``expr``."""
    return ir.role("system", expr)


def user(expr: Any = None) -> ir.Expr:
    """A user message around ``expr``."""
    return ir.role("user", expr)


def assistant(expr: Any = None) -> ir.Expr:
    """An assistant message around ``expr`` (typically a gen)."""
    return ir.role("assistant", expr)


def system_begin() -> ir.Expr:
    return ir.RoleBegin("system")


def system_end() -> ir.Expr:
    return ir.RoleEnd("system")


def user_begin() -> ir.Expr:
    return ir.RoleBegin("user")


def user_end() -> ir.Expr:
    return ir.RoleEnd("user")


def assistant_begin() -> ir.Expr:
    return ir.RoleBegin("assistant")


def assistant_end() -> ir.Expr:
    return ir.RoleEnd("assistant")


class _DefaultBackend:
    """The process-wide backend that ``run`` uses when none is passed (set by the user)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._backend: Any = None

    def set(self, backend: Any) -> None:
        with self._lock:
            self._backend = backend

    def get(self) -> Any:
        with self._lock:
            return self._backend


_default_backend = _DefaultBackend()


def set_default_backend(backend: Any) -> None:
    """Use ``backend`` for every run that does not pass one (None clears it)."""
    _default_backend.set(backend)


def get_default_backend() -> Any:
    """The backend set by :func:`set_default_backend`, or None."""
    return _default_backend.get()
