"""Request models of the HTTP API and their translation into engine sampling parameters.

The pydantic models accept what the official ``openai`` client and SGLang's native API send;
the functions below turn them into plain ``SamplingParams`` dicts. Everything here is pure, so it
is tested without a server.

Every model is strict: a JSON string is not a number or a boolean (``"max_tokens": "4"``,
``"stream": "yes"``), a boolean is not a number (``"logprobs": true`` on completions,
``input_ids: [true]``), and a number is not a boolean (``"logprobs": 1`` on chat): each is a 400
naming the field, never a silent conversion.
"""

from __future__ import annotations

import json
import math
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from radixlm.sampling_params import SamplingParams, SamplingParamsError
from radixlm.server.errors import APIError

# Parameters the OpenAI API defines but radixlm does not implement: rejected loudly rather than
# silently ignored, because ignoring them would change what the caller gets.
UNSUPPORTED_OPENAI_FIELDS = (
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "parallel_tool_calls",
    "suffix",
    "audio",
    "modalities",
    "prediction",
    "web_search_options",
)
MAX_N = 64
MAX_TOP_LOGPROBS = 20

# JSON as Python parses it allows NaN and Infinity; no sampling value means anything with them,
# and a NaN slips through every range check (all comparisons are false).
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
# A logit_bias key: the decimal text of a token id (int() alone would take " 1", "1_0", "١").
_TOKEN_KEY = re.compile(r"-?[0-9]+")
# JSON's "\ud800" escapes decode to lone surrogates, which no tokenizer, grammar compiler or
# UTF-8 response can take.
_SURROGATE = re.compile("[\ud800-\udfff]")

# Engine sampling field -> the OpenAI name a client knows it by (for error messages).
OPENAI_PARAM_NAMES = {
    "max_new_tokens": "max_tokens",
    "min_new_tokens": "min_tokens",
    "input_ids": "prompt",
}


class _Lenient(BaseModel):
    """Unknown fields are kept (then checked against UNSUPPORTED_OPENAI_FIELDS)."""

    model_config = ConfigDict(extra="allow", strict=True)

    def reject_unsupported(self) -> None:
        """Raise a 400 naming the first OpenAI field radixlm does not implement."""
        for name in UNSUPPORTED_OPENAI_FIELDS:
            if getattr(self, name, None) not in (None, [], {}):
                raise APIError(400, f"'{name}' is not supported by radixlm", param=name)


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)

    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(populate_by_name=True, strict=True)

    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(strict=True)

    type: Literal["text", "json_object", "json_schema", "regex"]
    json_schema: JsonSchemaFormat | None = None
    regex: str | None = None


class StructuredOutputs(BaseModel):
    """vLLM's ``structured_outputs`` (one of its keys); other keys are a 400."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    json_: str | dict[str, Any] | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class _SamplingFields(_Lenient):
    """Fields shared by /v1/completions and /v1/chat/completions (with radixlm extensions)."""

    model: str | None = None
    temperature: FiniteFloat | None = None
    top_p: FiniteFloat | None = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: FiniteFloat | None = None
    frequency_penalty: FiniteFloat | None = None
    logit_bias: dict[str, FiniteFloat] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None
    best_of: int | None = None
    # radixlm / SGLang extensions
    top_k: int | None = None
    min_p: FiniteFloat | None = None
    repetition_penalty: FiniteFloat | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool | None = None
    regex: str | None = None
    json_schema: str | dict[str, Any] | None = None
    ebnf: str | None = None
    # vLLM's guided decoding fields
    guided_regex: str | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputs | None = None
    rid: str | None = None


class CompletionRequest(_SamplingFields):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    add_generation_prompt: bool = True
    continue_final_message: bool = False


class GenerateRequest(BaseModel):
    """POST /generate (SGLang's native shape)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None
    stream: bool = False
    return_logprob: bool = False
    logprob_start_len: int = Field(default=-1, ge=-1)
    top_logprobs_num: int = Field(default=0, ge=0, le=MAX_TOP_LOGPROBS)
    # SGLang's default is False (entries carry None for the text); ours keeps the texts unless
    # the client turns them off, as this API always returned them.
    return_text_in_logprobs: bool = True
    rid: str | list[str] | None = None


def native_sampling_params(values: Any, vocab_size: int) -> dict[str, Any]:
    """Check one native ``sampling_params`` dict by the engine's own rules, before queueing.

    ``SamplingParams`` is the one definition of the fields, their types and ranges; checking
    here turns its error into a 400 naming the field instead of a failed job.

    Returns:
        The dict as given, ``logit_bias`` keys converted to token ids.

    Raises:
        APIError: an unknown key or an invalid value, naming the field.
    """
    if not isinstance(values, dict):
        raise APIError(400, "'sampling_params' must be an object", "sampling_params")
    try:
        SamplingParams.from_dict(values)
    except SamplingParamsError as exc:
        raise APIError(400, f"sampling_params.{exc}", exc.field) from None
    out = dict(values)
    if out.get("logit_bias"):  # values are checked numbers now; keys get the strict check
        out["logit_bias"] = logit_bias(out["logit_bias"], vocab_size)
    return out


class TokenizeRequest(BaseModel):
    """POST /tokenize: exactly one of prompt (alias text) or messages."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    prompt: str | None = None
    text: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    tokens: list[int]
    skip_special_tokens: bool = False


class AbortRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    rid: str | None = None
    abort_all: bool = False


def check_values(body: BaseModel) -> None:
    """400 for a string or key that is not valid Unicode, or a number that is NaN or infinite.

    Typed float fields refuse non-finite numbers themselves; this also covers the untyped parts
    of a request (a JSON schema, unknown fields) that would carry them on to the engine.

    Raises:
        APIError: naming the first field found that holds one.
    """
    stack: list[tuple[Any, str | None]] = [(body.model_dump(by_alias=True), None)]
    while stack:  # a loop, not recursion: a body may nest as deep as the JSON parser allows
        value, path = stack.pop()
        if isinstance(value, str):
            _check_text(value, path)
            if path is not None and (
                path.rsplit(".", 1)[-1] in ("json_schema", "guided_json")
                or path == "structured_outputs.json"
            ):
                _check_schema_text(value, path)
        elif isinstance(value, float) and not math.isfinite(value):
            raise APIError(
                400,
                f"{path}: {value} is not a number JSON allows (NaN and Infinity are extensions)",
                path,
            )
        elif isinstance(value, dict):
            for key, item in value.items():
                _check_text(str(key), path)
                stack.append((item, f"{path}.{key}" if path else str(key)))
        elif isinstance(value, (list, tuple)):
            stack.extend((item, f"{path}.{i}" if path else str(i)) for i, item in enumerate(value))


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows (NaN and Infinity are extensions)")


def _check_schema_text(text: str, param: str) -> None:
    """A JSON schema given as a string must be strict JSON (Python's parser takes NaN)."""
    try:
        json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise APIError(400, f"{param}: the JSON schema is nested too deeply", param) from None
    except ValueError as exc:
        raise APIError(400, f"{param}: not a valid JSON schema string: {exc}", param) from None


def _check_text(text: str, param: str | None) -> None:
    if _SURROGATE.search(text):
        raise APIError(
            400,
            f"{param or 'a key'} is not valid Unicode: it contains a lone "
            "surrogate (a \\uD800-\\uDFFF escape without its pair)",
            param,
        )


# ---- OpenAI request -> engine sampling params ---------------------------------------------


def completion_max_tokens(req: CompletionRequest | ChatCompletionRequest) -> int | None:
    """The requested output budget; None means "up to the context length" (chat default)."""
    if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
        return req.max_completion_tokens
    return req.max_tokens


def sampling_params(
    req: CompletionRequest | ChatCompletionRequest, max_new_tokens: int, vocab_size: int
) -> dict[str, Any]:
    """Translate an OpenAI request into a ``SamplingParams`` dict.

    Args:
        req: the validated request.
        max_new_tokens: the output budget (already resolved against the context length).
        vocab_size: the tokenizer's vocabulary size (to check ``logit_bias`` keys).

    Returns:
        A dict ``SamplingParams.from_dict`` accepts; values the engine validates are passed
        through unchecked so that its error names the field.
    """
    params: dict[str, Any] = {"max_new_tokens": max_new_tokens}
    _copy_if_set(
        req,
        params,
        {
            "temperature": "temperature",
            "top_p": "top_p",
            "seed": "seed",
            "presence_penalty": "presence_penalty",
            "frequency_penalty": "frequency_penalty",
            "top_k": "top_k",
            "min_p": "min_p",
            "repetition_penalty": "repetition_penalty",
            "min_tokens": "min_new_tokens",
            "ignore_eos": "ignore_eos",
            "stop_token_ids": "stop_token_ids",
            "skip_special_tokens": "skip_special_tokens",
        },
    )
    if req.stop is not None:
        params["stop"] = [req.stop] if isinstance(req.stop, str) else list(req.stop)
    if req.logit_bias:
        params["logit_bias"] = logit_bias(req.logit_bias, vocab_size)
    params.update(constraint_params(req))
    return params


# OpenAI request field -> the engine's constraint field (a grammar: "ebnf" or "lark").
_CONSTRAINT_SOURCES = {
    "regex": "regex",
    "guided_regex": "regex",
    "json_schema": "json_schema",
    "guided_json": "json_schema",
    "guided_choice": "choices",
    "ebnf": "ebnf",
    "guided_grammar": "ebnf",
}
# vLLM's structured_outputs keys -> the engine's constraint field
_STRUCTURED_OUTPUTS = {"json_": "json_schema", "regex": "regex", "choice": "choices",
                       "grammar": "ebnf", "json_object": "json_schema"}  # fmt: skip
# A GBNF / XGrammar rule definition; Lark writes ``name: ...`` and never ``::=``.
_EBNF_RULE = re.compile(r"^\s*[A-Za-z_][A-Za-z0-9_-]*\s*::=", re.MULTILINE)


def _given_constraints(req: CompletionRequest | ChatCompletionRequest) -> list[tuple[str, Any]]:
    """(client field, engine sampling fields) for every constraint the request sets."""
    given: list[tuple[str, Any]] = []
    for name, target in _CONSTRAINT_SOURCES.items():
        value = getattr(req, name)
        if value is not None:
            given.append((name, lambda t=target, v=value: _grammar_field(t, v)))
    outputs = req.structured_outputs
    for key, target in _STRUCTURED_OUTPUTS.items():
        value = getattr(outputs, key) if outputs is not None else None
        if value is None or value is False:
            continue
        if key == "json_object":
            value = json.dumps({"type": "object"})
        path = f"structured_outputs.{key.rstrip('_')}"
        given.append((path, lambda t=target, v=value: _grammar_field(t, v)))
    fmt = req.response_format
    if fmt is not None and fmt.type != "text":
        given.append(("response_format", lambda: response_format_constraint(fmt)))
    return given


def _grammar_field(target: str, value: Any) -> dict[str, Any]:
    # vLLM's grammar fields take EBNF (XGrammar/GBNF, ``::=`` rules) or Lark text
    if target == "ebnf" and not _EBNF_RULE.search(value):
        return {"lark": value}
    return {target: value}


def constraint_params(req: CompletionRequest | ChatCompletionRequest) -> dict[str, Any]:
    """The output constraint of an OpenAI request as engine sampling fields.

    Accepts radixlm/SGLang's ``regex``, ``json_schema`` and ``ebnf``; vLLM's ``guided_regex``,
    ``guided_json``, ``guided_choice``, ``guided_grammar`` and ``structured_outputs`` (a grammar
    with ``::=`` rules is EBNF, else Lark); and ``response_format``.

    Raises:
        APIError: more than one constraint given, naming the second.
    """
    given = _given_constraints(req)
    if len(given) > 1:
        (first, _), (second, _) = given[:2]
        raise APIError(400, f"'{second}' cannot be combined with '{first}'", second)
    return given[0][1]() if given else {}


def constraint_param(req: CompletionRequest | ChatCompletionRequest) -> str | None:
    """The field through which the client gave the output constraint (``guided_grammar``,
    ``response_format``...), for errors the engine reports on its own field names; None when
    the request has no constraint."""
    given = _given_constraints(req)
    return given[0][0] if given else None


def _copy_if_set(req: BaseModel, params: dict[str, Any], names: dict[str, str]) -> None:
    for source, target in names.items():
        value = getattr(req, source)
        if value is not None:
            params[target] = value


def logit_bias(bias: dict[str, float], vocab_size: int) -> dict[int, float]:
    """Check and convert OpenAI's ``{"token_id": bias}`` map (bias in [-100, 100])."""
    out: dict[int, float] = {}
    for key, value in bias.items():
        if not _TOKEN_KEY.fullmatch(key):
            raise APIError(400, f"logit_bias key {key!r} is not a token id", "logit_bias")
        token = int(key)
        if not 0 <= token < vocab_size:
            raise APIError(
                400,
                f"logit_bias token id {token} is outside the vocabulary (size {vocab_size})",
                "logit_bias",
            )
        if not -100.0 <= value <= 100.0:
            raise APIError(
                400,
                f"logit_bias value {value} for token {token} is outside [-100, 100]",
                "logit_bias",
            )
        out[token] = float(value)
    return out


def response_format_constraint(fmt: ResponseFormat | None) -> dict[str, Any]:
    """``response_format`` as a ``json_schema`` / ``regex`` sampling constraint."""
    if fmt is None or fmt.type == "text":
        return {}
    if fmt.type == "json_object":
        return {"json_schema": json.dumps({"type": "object"})}
    if fmt.type == "regex":
        if not fmt.regex:
            raise APIError(400, "response_format of type regex needs 'regex'", "response_format")
        return {"regex": fmt.regex}
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise APIError(
            400,
            "response_format of type json_schema needs json_schema.schema",
            "response_format.json_schema",
        )
    return {"json_schema": json.dumps(fmt.json_schema.schema_)}


def openai_param(param: str | None, max_field: str = "max_tokens") -> str | None:
    """Rename an engine field in an error to the name the OpenAI caller used.

    Args:
        param: the engine's field name (``max_new_tokens``...), or None.
        max_field: which of ``max_tokens`` / ``max_completion_tokens`` the caller sent.
    """
    if param == "max_new_tokens":
        return max_field
    return OPENAI_PARAM_NAMES.get(param or "", param)


def max_tokens_field(req: CompletionRequest | ChatCompletionRequest) -> str:
    """The name under which the caller gave the output budget."""
    if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
        return "max_completion_tokens"
    return "max_tokens"


def message_dicts(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as plain dicts for a chat template, with text parts joined into one string.

    Raises:
        APIError: a content part that is not text (images, audio).
    """
    out = []
    for index, message in enumerate(messages):
        content = message.content
        if isinstance(content, list):
            content = "".join(_text_part(part, index) for part in content)
        entry: dict[str, Any] = {"role": message.role, "content": content or ""}
        if message.name is not None:
            entry["name"] = message.name
        out.append(entry)
    return out


def _text_part(part: ContentPart, index: int) -> str:
    if part.type != "text" or part.text is None:
        raise APIError(
            400,
            f"content parts of type {part.type!r} are not supported (text only)",
            f"messages.{index}.content",
        )
    return part.text
