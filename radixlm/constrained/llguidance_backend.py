"""The second backend: llguidance (an Earley parser over a lazily built lexer), same protocol.

llguidance compiles JSON schemas and regexes itself; we only align the policy (the same
separators as our compiler; non-strict mode = llguidance's ``lenient`` + ``coerce_one_of``), add
the SentencePiece dummy space, and wrap its matcher so a rejected token leaves the state
unchanged and EOS is handled like in the default backend.
Masks are computed by llguidance on every call (it keeps no per-state cache).
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from typing import Any

import torch

from radixlm.constrained.base import Grammar, GrammarMatcher
from radixlm.constrained.errors import GrammarError
from radixlm.constrained.index_build import choices_regex, user_regex
from radixlm.constrained.json_repair import MAX_REPAIRS, prepare, repair
from radixlm.constrained.json_schema import JsonSchemaOptions
from radixlm.constrained.outlines_backend import TokenizerInfo, complete_utf8

_SET_OPERATORS = re.compile(r"&&|--|~~")
# LLTokenizer per (HF tokenizer, width, EOS ids): building one walks the whole vocabulary
# (~1 s for 128k tokens), and it is immutable, so compilers of one tokenizer share it
_LL_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LL_LOCK = threading.Lock()


def _ll_tokenizer(tokenizer: Any, vocab_size: int, eos_ids: list[int]) -> Any:
    import llguidance.hf

    with _LL_LOCK:
        try:
            by_shape = _LL_TOKENIZERS.setdefault(tokenizer, {})
        except TypeError:  # not weak-referenceable: no sharing
            by_shape = {}
        key = (vocab_size, tuple(eos_ids))
        if key not in by_shape:
            by_shape[key] = llguidance.hf.from_tokenizer(
                tokenizer, n_vocab=vocab_size, eos_token=eos_ids or None
            )
        return by_shape[key]


class LLGuidanceCompiler:
    """Builds :class:`LLGuidanceGrammar` objects for one tokenizer.

    Args:
        info: the compiler's per-tokenizer tables (vocab size, EOS ids, retokenizer).
        options: the JSON whitespace policy to impose.
    """

    def __init__(self, info: TokenizerInfo, options: JsonSchemaOptions):
        self.info = info
        self.options = options
        self.tokenizer = _ll_tokenizer(info.tokenizer, info.vocab_size, sorted(info.eos_ids))

    def build(self, kind: str, spec: Any) -> LLGuidanceGrammar:
        """Compile one constraint (raises GrammarError)."""
        from llguidance import LLMatcher

        if kind == "json_schema":
            return self._build_schema(_schema_object(kind, spec))
        if kind == "regex" and isinstance(spec, str) and not _SET_OPERATORS.search(spec):
            # Most Python patterns mean the same in llguidance's (Rust) syntax, which it parses
            # in microseconds, while re-emitting one from Python's parse tree can take seconds
            # (a large counted repetition). Class set operators are literal text in Python and
            # operators in Rust; those patterns, and any Rust refuses, are translated.
            lead = "(?: )?" if self.info.vocab.dummy_prefix else ""
            grammar = LLMatcher.grammar_from_regex(lead + "(?:" + spec + ")")
            matcher = LLMatcher(self.tokenizer, grammar, log_level=0)
            if not matcher.is_error():
                return LLGuidanceGrammar(self, grammar, matcher)
        grammar = self._grammar_text(kind, spec)
        matcher = LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"llguidance: {matcher.get_error()[:400]}", feature="llguidance")
        return LLGuidanceGrammar(self, grammar, matcher)

    def _build_schema(self, schema: Any) -> LLGuidanceGrammar:
        """Compile as given; on a refusal json_repair knows, relax that part and retry."""
        from llguidance import LLMatcher

        notes: list[str] = []
        if not self.options.strict:
            schema, notes = prepare(schema)
        for _ in range(MAX_REPAIRS + 1):
            grammar = self._schema_grammar(schema)
            matcher = LLMatcher(self.tokenizer, grammar, log_level=0)
            if not matcher.is_error():
                return LLGuidanceGrammar(self, grammar, matcher, tuple(notes))
            error = matcher.get_error()
            fixed = None if self.options.strict else repair(schema, error, self._pattern_ok)
            if fixed is None:
                break
            schema, note = fixed
            notes.append(note)
        raise GrammarError(f"llguidance: {error[:400]}", feature=_feature(error))

    def _pattern_ok(self, pattern: str) -> bool:
        from llguidance import LLMatcher

        grammar = LLMatcher.grammar_from_json_schema({"type": "string", "pattern": pattern})
        return not LLMatcher.validate_grammar(grammar)

    def _schema_grammar(self, schema: Any) -> str:
        from llguidance import LLMatcher

        if isinstance(schema, dict):
            schema = {**schema, "x-guidance": self._json_options()}
        if self.info.vocab.dummy_prefix:
            lark = 'start: " "? body\nbody: %json ' + json.dumps(schema)
            return LLMatcher.grammar_from_lark(lark)
        return LLMatcher.grammar_from_json_schema(schema)

    def _grammar_text(self, kind: str, spec: Any) -> str:
        from llguidance import LLMatcher

        lead = self.info.vocab.dummy_prefix
        if kind in ("json_schema", "json_object"):
            return self._schema_grammar(_schema_object(kind, spec))
        if kind == "lark":  # taken as written (no optional SentencePiece dummy space)
            return LLMatcher.grammar_from_lark(spec)
        if kind == "regex":
            regex = user_regex(spec)
        elif kind == "choices":
            regex = choices_regex(spec)
        else:
            raise GrammarError(f"unknown constraint kind {kind!r}", feature="kind")
        return LLMatcher.grammar_from_regex(("(?: )?" if lead else "") + "(?:" + regex + ")")

    def _json_options(self) -> dict:
        # the same policy as the default backend: non-strict relaxes what it cannot enforce
        # (llguidance: ignore unimplemented keywords, compile oneOf as anyOf)
        lenient = not self.options.strict
        return {
            "item_separator": self.options.item_separator,
            "key_separator": self.options.key_separator,
            "whitespace_flexible": False,
            "lenient": lenient,
            "coerce_one_of": lenient,
        }


def _feature(error: str) -> str:
    """GrammarError.feature for an llguidance error (limits are "size", as in outlines)."""
    lowered = error.lower()
    if "unsatisfiable" in lowered:
        return "unsatisfiable"
    if "fuel" in lowered or "too many" in lowered or "limit" in lowered or "too large" in lowered:
        return "size"
    return "llguidance"


def _schema_object(kind: str, spec: Any) -> Any:
    if kind == "json_object":
        return {"type": "object"}
    if isinstance(spec, (str, bytes)):
        try:
            spec = json.loads(spec)
        except ValueError as exc:
            raise GrammarError(f"JSON schema is not valid JSON: {exc}", feature="json") from None
    if isinstance(spec, bool):
        return {} if spec else {"not": {}}
    if not isinstance(spec, dict):
        raise GrammarError("a JSON schema must be an object or a boolean", feature="schema")
    return spec


class LLGuidanceGrammar(Grammar):
    """A compiled llguidance grammar; matchers are copies of a validated template."""

    def __init__(
        self, owner: LLGuidanceCompiler, text: str, template: Any, repairs: tuple[str, ...] = ()
    ):
        self.owner = owner
        self.text = text
        self.vocab_size = owner.info.vocab_size
        self.relaxed = repairs + tuple(template.get_grammar_warnings())
        self._template = template

    def matcher(self) -> LLGuidanceMatcher:
        return LLGuidanceMatcher(self, self._template.deep_copy())


_EXECUTOR = None


def _executor() -> Any:
    """The process's llguidance executor: a Rust thread pool that computes a batch's masks in
    parallel without the GIL (made on first use; shared by every scheduler in the process)."""
    global _EXECUTOR
    with _LL_LOCK:
        if _EXECUTOR is None:
            from llguidance import LLExecutor

            _EXECUTOR = LLExecutor()
        return _EXECUTOR


class LLGuidanceMatcher(GrammarMatcher):
    """Per-request llguidance matcher with radixlm's accept/EOS/rollback semantics."""

    fills_batches_in_parallel = True

    @classmethod
    def fill_bitmasks(cls, bitmask: torch.Tensor, rows: list[tuple[int, GrammarMatcher]]) -> None:
        """One call into llguidance for the whole batch (its executor spreads the rows over
        its threads); rows whose grammar already ended get the EOS-only mask."""
        if bitmask.device.type != "cpu" or not bitmask.is_contiguous():
            raise ValueError("fill_bitmasks needs a contiguous CPU int32 bitmask")
        live = []
        for row, matcher in rows:
            if matcher._ended:
                matcher.fill_bitmask(bitmask, row)
            else:
                live.append((matcher._matcher, row))
        if live:
            words = bitmask.shape[1]
            _executor().unsafe_compute_mask_ptr(live, bitmask.data_ptr(), words * 4,
                                                bitmask.shape[0])  # fmt: skip

    def __init__(self, grammar: LLGuidanceGrammar, matcher: Any):
        self.grammar = grammar
        self.vocab_size = grammar.vocab_size
        self.retokenizer = grammar.owner.info.retokenizer
        self._matcher = matcher
        self._eos_ids = grammar.owner.info.eos_ids
        self._accepted = 0
        self._ended = False

    @property
    def num_accepted(self) -> int:
        return self._accepted + int(self._ended)

    def accept_token(self, token_id: int) -> bool:
        if self._ended:
            return False
        if token_id in self._eos_ids:
            if not self._matcher.is_accepting():
                return False
            self._ended = True
            return True
        if not 0 <= token_id < self.vocab_size or self._matcher.validate_tokens([token_id]) != 1:
            return False
        if not self._matcher.consume_token(token_id):
            raise GrammarError(f"llguidance: {self._matcher.get_error()[:300]}")
        self._accepted += 1
        return True

    def rollback(self, num_tokens: int) -> None:
        if num_tokens < 0 or num_tokens > self.num_accepted:
            raise ValueError(f"cannot roll back {num_tokens} of {self.num_accepted} tokens")
        if num_tokens and self._ended:
            self._ended = False
            num_tokens -= 1
        if num_tokens:
            self._matcher.rollback(num_tokens)
            self._accepted -= num_tokens

    def is_terminated(self) -> bool:
        return self._ended or (self._matcher.is_accepting() and self._matcher.is_stopped())

    def is_complete(self) -> bool:
        return self._ended or self._matcher.is_accepting()

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        view = bitmask[row]
        if self._ended:
            view.copy_(self.grammar.owner.info.eos_bits[: view.shape[0]])
            return
        if not view.is_contiguous() or view.device.type != "cpu":
            raise ValueError("fill_bitmask needs a contiguous CPU int32 bitmask")
        self._matcher.unsafe_compute_mask_ptr(view.data_ptr(), view.numel() * 4)

    def jump_forward(self) -> str | None:
        if self._ended:
            return None
        return complete_utf8(bytes(self._matcher.compute_ff_bytes()))
