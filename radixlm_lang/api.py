"""The words of the language: gen, select, roles, and the default backend."""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from typing import Any

from radixlm_lang import ir
from radixlm_lang.choices import ChoicesMethod, token_length_normalized
from radixlm_lang.dtypes import normalize_dtype
from radixlm_lang.ir import to_expr
from radixlm_lang.reasoning import reasoning_format
from radixlm_lang.sampling import SamplingParams


def gen(
    name: str | None = None,
    max_tokens: int | None = None,
    min_tokens: int | None = None,
    n: int | None = None,
    stop: str | Sequence[str] | None = None,
    stop_token_ids: Sequence[int] | None = None,
    stop_regex: str | Sequence[str] | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    frequency_penalty: float | None = None,
    presence_penalty: float | None = None,
    ignore_eos: bool | None = None,
    return_logprob: bool | None = None,
    logprob_start_len: int | None = None,
    top_logprobs_num: int | None = None,
    return_text_in_logprobs: bool | None = None,
    dtype: type | str | None = None,
    choices: Sequence[str] | None = None,
    choices_method: ChoicesMethod | None = None,
    regex: str | None = None,
    json_schema: str | dict | None = None,
    **more: Any,
) -> ir.Expr:
    """Generate text into variable ``name``.

    The parameters come in SGLang's order, so positional calls (``gen("x", 64)``) mean the same.

    Args:
        name: the variable that receives the output (None: only appended to the text).
        max_tokens: most tokens to generate (radixlm's ``max_new_tokens``).
        min_tokens: fewest tokens before EOS/stop may end it (``min_new_tokens``).
        n: samples to draw; with ``n > 1`` the variable holds the list of samples and the
            text continues with the first.
        stop, stop_token_ids, temperature, top_p, top_k, min_p, frequency_penalty,
        presence_penalty, ignore_eos: sampling, as in radixlm's SamplingParams.
        stop_regex: end the output at the first match of this pattern (or any of these
            patterns); the match is cut off like a stop string.
        return_logprob, logprob_start_len, top_logprobs_num: logprobs in the variable's
            meta_info (with ``max_tokens=0``: only the prompt's).
        return_text_in_logprobs: add each token's text to its logprob entries.
        dtype: int, float, str or bool (or their names): constrain with SGLang's regex for the
            type; the variable keeps the generated text.
        choices: turn this into :func:`select` over these choices.
        choices_method: how select scores choices (with ``choices``).
        regex, json_schema: constrain the output (needs the server's constrained decoding).
        **more: any other field of :class:`SamplingParams` (seed, repetition_penalty, ...).

    Returns:
        An expression to append to a state.
    """
    if choices:
        return select(name, choices, temperature or 0.0, choices_method)
    if regex is not None:
        re.compile(regex)  # a malformed pattern fails here, in the program's own line
    params = SamplingParams.from_kwargs(
        max_tokens=max_tokens, min_tokens=min_tokens, n=n, stop=stop,
        stop_token_ids=stop_token_ids, stop_regex=stop_regex, temperature=temperature,
        top_p=top_p, top_k=top_k, min_p=min_p, frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty, ignore_eos=ignore_eos, return_logprob=return_logprob,
        logprob_start_len=logprob_start_len, top_logprobs_num=top_logprobs_num,
        return_text_in_logprobs=return_text_in_logprobs, regex=regex, json_schema=json_schema,
        **more,
    )  # fmt: skip
    for pattern in params.stop_regex or ():
        re.compile(pattern)
    if dtype is not None:
        if params.regex or params.json_schema:
            raise TypeError("gen(dtype=...) cannot be combined with regex or json_schema")
        dtype = normalize_dtype(dtype)
    return ir.Gen(name, params, dtype)


def gen_int(
    name: str | None = None,
    max_tokens: int | None = None,
    n: int | None = None,
    stop: str | Sequence[str] | None = None,
    stop_token_ids: Sequence[int] | None = None,
    stop_regex: str | Sequence[str] | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    frequency_penalty: float | None = None,
    presence_penalty: float | None = None,
    ignore_eos: bool | None = None,
    return_logprob: bool | None = None,
    logprob_start_len: int | None = None,
    top_logprobs_num: int | None = None,
    return_text_in_logprobs: bool | None = None,
    **more: Any,
) -> ir.Expr:
    """``gen(name, ..., dtype=int)`` (SGLang's positional order, without ``min_tokens``)."""
    return gen(
        name, max_tokens, more.pop("min_tokens", None), n, stop, stop_token_ids, stop_regex,
        temperature, top_p, top_k, min_p, frequency_penalty, presence_penalty, ignore_eos,
        return_logprob, logprob_start_len, top_logprobs_num, return_text_in_logprobs,
        dtype=int, **more,
    )  # fmt: skip


def gen_string(
    name: str | None = None,
    max_tokens: int | None = None,
    n: int | None = None,
    stop: str | Sequence[str] | None = None,
    stop_token_ids: Sequence[int] | None = None,
    stop_regex: str | Sequence[str] | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    frequency_penalty: float | None = None,
    presence_penalty: float | None = None,
    ignore_eos: bool | None = None,
    return_logprob: bool | None = None,
    logprob_start_len: int | None = None,
    top_logprobs_num: int | None = None,
    return_text_in_logprobs: bool | None = None,
    **more: Any,
) -> ir.Expr:
    """``gen(name, ..., dtype=str)``: a double-quoted string; the variable keeps the quotes."""
    return gen(
        name, max_tokens, more.pop("min_tokens", None), n, stop, stop_token_ids, stop_regex,
        temperature, top_p, top_k, min_p, frequency_penalty, presence_penalty, ignore_eos,
        return_logprob, logprob_start_len, top_logprobs_num, return_text_in_logprobs,
        dtype=str, **more,
    )  # fmt: skip


def select(
    name: str | None = None,
    choices: Sequence[str] | None = None,
    temperature: float = 0.0,
    choices_method: ChoicesMethod | None = None,
) -> ir.Expr:
    """Append the choice the model scores best and store it in ``name``.

    Args:
        name: the variable that receives the choice.
        choices: the non-empty candidate strings.
        temperature: must be 0 (a select decides greedily; SGLang refuses others too).
        choices_method: ``token_length_normalized`` (default), ``greedy_token_selection`` or
            ``unconditional_likelihood_normalized``.

    Returns:
        An expression to append to a state.
    """
    if not choices or not all(isinstance(c, str) and c for c in choices):
        raise ValueError("select needs a non-empty list of non-empty strings")
    if temperature is None or temperature > 1e-5:
        raise ValueError(f"select decides greedily: temperature must be 0, not {temperature!r}")
    method = choices_method or token_length_normalized
    if not isinstance(method, ChoicesMethod):
        raise TypeError(f"choices_method must be a ChoicesMethod, not {method!r}")
    return ir.Select(name, tuple(choices), method)


def separate_reasoning(expr: Any = None, model_type: str | None = None) -> ir.Expr:
    """``expr`` (a named gen or select, or an expression holding some), then split the
    reasoning out of each such variable.

    After it runs, the variable holds the answer only and ``<name>_reasoning_content`` the
    reasoning (the text inside the model's thinking tags). The state's text is not changed.

    Args:
        expr: a gen or select with a name.
        model_type: the reasoning format: ``deepseek-r1``, ``deepseek-v3``, ``qwen3``,
            ``qwen3-thinking``, ``kimi`` or ``kimi_k2`` (None: ``<think>...</think>``).

    Returns:
        An expression to append to a state.
    """
    if expr is None:
        raise ValueError("separate_reasoning needs the gen (or select) whose output it splits")
    expr = to_expr(expr)
    names = [
        leaf.name
        for leaf in expr.flatten()
        if isinstance(leaf, (ir.Gen, ir.Select)) and leaf.name is not None
    ]
    if not names:
        raise TypeError("separate_reasoning wraps an expression with a named gen or select")
    reasoning_format(model_type)  # an unknown model type fails here
    return ir.Concat((expr, *(ir.SeparateReasoning(name, model_type) for name in names)))


def image(expr: Any) -> ir.Expr:
    """SGLang's image input: radixlm serves text-only models.

    Raises:
        NotImplementedError: always, saying so.
    """
    raise NotImplementedError(_NO_MULTIMODAL)


def video(path: str, num_frames: int) -> ir.Expr:
    """SGLang's video input: radixlm serves text-only models.

    Raises:
        NotImplementedError: always, saying so.
    """
    raise NotImplementedError(_NO_MULTIMODAL)


_NO_MULTIMODAL = (
    "multimodal input is not supported: radixlm serves text-only models, so sgl.image and "
    "sgl.video have nothing to send the image or video to"
)


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


def flush_cache(backend: Any = None) -> Any:
    """Empty the server's prefix cache (``backend``, else the default backend).

    Returns:
        The backend's answer, or False when there is no backend (as SGLang).
    """
    backend = backend if backend is not None else get_default_backend()
    if backend is None:
        return False
    return backend.flush_cache()


def get_server_info(backend: Any = None) -> Any:
    """The server's figures and settings (``backend``, else the default backend; None if none)."""
    backend = backend if backend is not None else get_default_backend()
    if backend is None:
        return None
    return backend.get_server_info()
