"""Per-request sampling parameters: the one definition every layer shares."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

# Temperatures below this sample greedily: dividing logits by a tinier one overflows them.
GREEDY_TEMPERATURE = 1e-5
# The output constraints; at most one may be set.
CONSTRAINT_FIELDS = ("regex", "json_schema", "choices", "ebnf", "lark")
# llguidance's EBNF->Lark converter is pure Python and superlinear in the rule count (one pass
# over every rule per rule it resolves); these bounds keep a conversion under ~0.25 s of GIL on
# a busy 2-core box (measured: 128 chained rules in 32 KiB, 0.22 s). Lark has no such limit.
MAX_EBNF_CHARS = 32 * 1024
MAX_EBNF_RULES = 128


class SamplingParamsError(ValueError):
    """An invalid sampling value; ``field`` names the offending parameter."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


@dataclass
class SamplingParams:
    """How to pick the next tokens and when to stop.

    ``regex``, ``json_schema``, ``choices``, ``ebnf`` and ``lark`` are mutually exclusive
    constraints on the output. ``ebnf`` is a GBNF / XGrammar-style grammar (``root ::= ...``,
    SGLang's field), converted to Lark; ``lark`` is llguidance's Lark syntax, taken as written.
    Grammars need the llguidance grammar backend.
    """

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    n: int = 1
    seed: int | None = None
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] = field(default_factory=dict)
    regex: str | None = None
    json_schema: str | None = None
    choices: list[str] | None = None
    ebnf: str | None = None
    lark: str | None = None

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> SamplingParams:
        """Build and validate from a JSON-like dict.

        Raises:
            SamplingParamsError: an unknown key or an invalid value, naming the field.
        """
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            if key not in known:
                raise SamplingParamsError(key, "unknown sampling parameter")
        if isinstance(values.get("stop"), str):
            values["stop"] = [values["stop"]]
        if isinstance(values.get("json_schema"), dict):
            values["json_schema"] = json.dumps(values["json_schema"])
        if isinstance(values.get("logit_bias"), dict):
            values["logit_bias"] = _int_keys(values["logit_bias"])
        elif values.get("logit_bias") is not None:
            raise SamplingParamsError("logit_bias", "must be an object of token id -> bias")
        params = cls(**values)
        params.validate()
        return params

    def validate(self) -> None:
        """Raise :class:`SamplingParamsError` for the first invalid field."""
        _check_int(self, "max_new_tokens", 0)
        _check_int(self, "min_new_tokens", 0)
        if self.min_new_tokens > self.max_new_tokens:
            raise SamplingParamsError("min_new_tokens", "must not exceed max_new_tokens")
        _check_range(self, "temperature", 0.0, 100.0)
        _check_range(self, "top_p", 0.0, 1.0, low_open=True)
        _check_int(self, "top_k", -1)
        if self.top_k == 0:
            raise SamplingParamsError("top_k", "must be -1 (disabled) or >= 1")
        _check_range(self, "min_p", 0.0, 1.0)
        _check_range(self, "frequency_penalty", -2.0, 2.0)
        _check_range(self, "presence_penalty", -2.0, 2.0)
        _check_range(self, "repetition_penalty", 0.0, 10.0, low_open=True)
        _check_int(self, "n", 1)
        if self.seed is not None:
            _check_int(self, "seed", 0)
        self._validate_collections()
        for name in ("ignore_eos", "skip_special_tokens"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise SamplingParamsError(name, f"must be true or false, got {value!r}")
        self._validate_constraint()

    def _validate_collections(self) -> None:
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise SamplingParamsError("stop", "must be a string or a list of non-empty strings")
        if not isinstance(self.stop_token_ids, list) or not all(
            _is_int(t) and t >= 0 for t in self.stop_token_ids
        ):
            raise SamplingParamsError("stop_token_ids", "must be a list of non-negative integers")
        if not isinstance(self.logit_bias, dict):
            raise SamplingParamsError("logit_bias", "must be an object of token id -> bias")
        if any(not _is_number(v) or not -100.0 <= v <= 100.0 for v in self.logit_bias.values()):
            raise SamplingParamsError("logit_bias", "values must be numbers in [-100, 100]")

    def _validate_constraint(self) -> None:
        for name in ("regex", "json_schema", "ebnf", "lark"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise SamplingParamsError(name, "must be a string")
        if self.choices is not None and not isinstance(self.choices, list):
            raise SamplingParamsError("choices", "must be a list of strings")
        given = [name for name in CONSTRAINT_FIELDS if getattr(self, name)]
        if len(given) > 1:
            raise SamplingParamsError(given[1], f"cannot be combined with {given[0]}")
        if self.choices is not None and (
            not self.choices or not all(isinstance(c, str) and c for c in self.choices)
        ):
            raise SamplingParamsError("choices", "must be a non-empty list of non-empty strings")
        if self.json_schema is not None:
            try:
                json.loads(self.json_schema)
            except (TypeError, ValueError) as exc:
                raise SamplingParamsError("json_schema", f"is not valid JSON: {exc}") from None
        for name in ("ebnf", "lark"):
            text = getattr(self, name)
            if text is not None and not text.strip():
                raise SamplingParamsError(name, "must be a non-empty grammar")
        if self.ebnf is not None:
            # converted here, where a syntax error names the field before the request is
            # queued; kept (it travels with the pickled params) so the engine core's
            # scheduling loop does not convert again
            self.__dict__["_ebnf_lark"] = (self.ebnf, ebnf_to_lark(self.ebnf))

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        """Whether a repetition, frequency or presence penalty applies."""
        return bool(
            self.repetition_penalty != 1.0 or self.frequency_penalty or self.presence_penalty
        )

    @property
    def constraint(self) -> tuple[str, Any] | None:
        """``(kind, spec)`` of the output constraint, or None; a grammar (``ebnf`` or
        ``lark``) is ``("lark", text in Lark syntax)``."""
        for kind in ("regex", "json_schema", "choices"):
            spec = getattr(self, kind)
            if spec is not None:
                return kind, spec
        if self.ebnf is not None:
            converted = self.__dict__.get("_ebnf_lark")
            if converted is not None and converted[0] == self.ebnf:
                return "lark", converted[1]
            return "lark", ebnf_to_lark(self.ebnf)
        if self.lark is not None:
            return "lark", self.lark
        return None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@lru_cache(maxsize=128)
def ebnf_to_lark(text: str) -> str:
    """Convert a GBNF / XGrammar-style EBNF grammar (``root ::= ...``) to llguidance's Lark.

    Args:
        text: the EBNF grammar; ``root`` is its start rule.

    Returns:
        The same grammar in Lark syntax (``start`` is the start rule).

    Raises:
        SamplingParamsError: (field ``ebnf``) the text is not a valid EBNF grammar, with where
            and why, or is larger than ``MAX_EBNF_CHARS`` / ``MAX_EBNF_RULES``.
    """
    if len(text) > MAX_EBNF_CHARS:
        raise SamplingParamsError(
            "ebnf", f"is {len(text)} characters; at most {MAX_EBNF_CHARS} (use lark for more)"
        )
    rules = text.count("::=")  # at least the number of rules (one "::=" each)
    if rules > MAX_EBNF_RULES:
        raise SamplingParamsError(
            "ebnf", f"has {rules} rules; at most {MAX_EBNF_RULES} (use lark for more)"
        )
    return _converted(text)


@lru_cache(maxsize=64)
def _converted(text: str) -> str:
    # Memoized: the server checks a grammar before the request is queued and validation then
    # converts the same text (a refusal raises and is not kept). llguidance ships the converter
    # (pure Python, ~0.1 ms for a small grammar, 0.2 s at the limits); imported here so that
    # building SamplingParams without a grammar never loads the native library.
    from llguidance.gbnf_to_lark import gbnf_to_lark

    try:
        return gbnf_to_lark(text)
    except RecursionError:
        raise SamplingParamsError("ebnf", "is nested too deeply to convert") from None
    except Exception as exc:  # the converter raises bare Exception for unknown/missing rules
        raise SamplingParamsError("ebnf", f"is not a valid EBNF grammar: {exc}") from None


def _int_keys(bias: dict) -> dict[int, float]:
    # Values stay as given ("1.5" is not a number); validate() checks them.
    try:
        return {int(k): v for k, v in bias.items()}
    except (TypeError, ValueError):
        raise SamplingParamsError("logit_bias", "keys must be token ids") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_int(params: SamplingParams, name: str, minimum: int) -> None:
    value = getattr(params, name)
    if not _is_int(value) or value < minimum:
        raise SamplingParamsError(name, f"must be an integer >= {minimum}, got {value!r}")


def _check_range(
    params: SamplingParams, name: str, low: float, high: float, low_open: bool = False
) -> None:
    value = getattr(params, name)
    if not _is_number(value):
        raise SamplingParamsError(name, f"must be a number, got {value!r}")
    # Written so that NaN, which fails every comparison, is out of range too.
    in_range = (value > low if low_open else value >= low) and value <= high
    if not in_range:
        bracket = "(" if low_open else "["
        raise SamplingParamsError(name, f"must be in {bracket}{low}, {high}], got {value}")
    setattr(params, name, float(value))
