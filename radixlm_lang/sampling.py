"""Generation parameters: one definition shared by gen(), run(), the interpreter and backends.

Field names are radixlm's own (``radixlm.SamplingParams`` plus the native API's logprob flags),
so a backend speaking the native API forwards them unchanged. ``None`` means "not set here": a
value set on ``gen`` overrides the program-wide default given to ``run``, which overrides the
server's default.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

# Frontend spellings (SGLang's gen/run keywords) that map onto radixlm's field names.
ALIASES = {"max_tokens": "max_new_tokens", "min_tokens": "min_new_tokens"}

# Fields that the native API carries beside sampling_params rather than inside it.
REQUEST_FIELDS = ("return_logprob", "logprob_start_len", "top_logprobs_num")

# Fields the frontend itself implements; they are never sent to a backend. ``stop_regex`` ends a
# generation at the first match of a pattern (the client watches the stream and stops it there);
# ``return_text_in_logprobs`` adds each token's text to the logprob entries of ``meta_info``.
CLIENT_FIELDS = ("stop_regex", "return_text_in_logprobs")


@dataclass(frozen=True)
class SamplingParams:
    """Every knob of one generation call; unset fields are ``None``."""

    max_new_tokens: int | None = None
    min_new_tokens: int | None = None
    n: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    stop: tuple[str, ...] | None = None
    stop_token_ids: tuple[int, ...] | None = None
    ignore_eos: bool | None = None
    seed: int | None = None
    skip_special_tokens: bool | None = None
    logit_bias: dict[int, float] | None = None
    regex: str | None = None
    json_schema: str | None = None
    return_logprob: bool | None = None
    logprob_start_len: int | None = None
    top_logprobs_num: int | None = None
    stop_regex: tuple[str, ...] | None = None
    return_text_in_logprobs: bool | None = None

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> SamplingParams:
        """Build from keyword arguments, accepting the ``max_tokens``/``min_tokens`` aliases.

        Args:
            **kwargs: field names or aliases; ``None`` values are ignored.

        Returns:
            The parameters, normalized (``stop`` as a tuple, ``json_schema`` as a JSON string).

        Raises:
            TypeError: an unknown keyword, or an alias given together with its field.
        """
        values: dict[str, Any] = {}
        for key, value in kwargs.items():
            name = ALIASES.get(key, key)
            if name not in FIELD_NAMES:
                raise TypeError(f"unknown sampling parameter {key!r}")
            if value is None:
                continue
            if name in values:
                raise TypeError(f"{key!r} given twice (as {name!r} and an alias)")
            values[name] = _normalize(name, value)
        return cls(**values)

    @staticmethod
    def accepts(key: str) -> bool:
        """Whether ``key`` names a parameter (or an alias of one)."""
        return ALIASES.get(key, key) in FIELD_NAMES

    def merged(self, override: SamplingParams) -> SamplingParams:
        """These parameters with every field that ``override`` sets replaced.

        Args:
            override: the more specific parameters (e.g. a gen's over run's defaults).

        Returns:
            A new SamplingParams.
        """
        return dataclasses.replace(self, **override.set_fields())

    def set_fields(self) -> dict[str, Any]:
        """The fields that are not ``None``, as a dict."""
        return {f: getattr(self, f) for f in FIELD_NAMES if getattr(self, f) is not None}

    def sampling_dict(self) -> dict[str, Any]:
        """The set sampling fields as the native API's ``sampling_params`` object."""
        out = {
            k: v
            for k, v in self.set_fields().items()
            if k not in REQUEST_FIELDS and k not in CLIENT_FIELDS
        }
        for key in ("stop", "stop_token_ids"):
            if key in out:
                out[key] = list(out[key])
        return out

    def request_dict(self) -> dict[str, Any]:
        """The set logprob flags, which the native API carries beside ``sampling_params``."""
        return {k: v for k, v in self.set_fields().items() if k in REQUEST_FIELDS}


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(SamplingParams))


def _normalize(name: str, value: Any) -> Any:
    if name in ("stop", "stop_regex") and isinstance(value, str):
        return (value,)
    if name in ("stop", "stop_token_ids", "stop_regex"):
        return tuple(value)
    if name == "json_schema" and not isinstance(value, str):
        return json.dumps(value)
    if name == "logit_bias":
        return {int(k): float(v) for k, v in value.items()}
    return value
