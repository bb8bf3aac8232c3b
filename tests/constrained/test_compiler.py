"""GrammarCompiler: futures, the LRU cache, worker isolation, time limits, both backends."""

from __future__ import annotations

import json
import time

import pytest
import torch

from radixlm.constrained import GrammarCompiler, GrammarError, apply_token_bitmask


def test_cache_shares_grammars_across_spellings(compiler3):
    schema = {"type": "object", "properties": {"k": {"type": "boolean"}}}
    first = compiler3.compile_json_schema(schema)
    assert compiler3.compile_json_schema(json.dumps(schema)) is first
    assert compiler3.submit("json_schema", schema).result() is first
    other = compiler3.compile_json_schema({"type": "object", "properties": {"k": {}}})
    assert other is not first


def test_submit_kinds_and_bad_kind(compiler3):
    futures = {kind: compiler3.submit(kind, spec) for kind, spec in [
        ("json_schema", {"type": "integer"}), ("regex", "[0-9]+"),
        ("choices", ["a", "b"]), ("json_object", None)]}
    for future in futures.values():
        assert future.result(timeout=60).matcher() is not None
    with pytest.raises(GrammarError) as info:
        compiler3.submit("yaml", "x").result()
    assert info.value.feature == "kind"


def test_isolated_worker_times_out_without_hanging(llama3):
    with GrammarCompiler(llama3, timeout_s=1.5, max_workers=1) as compiler:
        started = time.monotonic()
        # ~2,800 DFA states (8 per UTF-8 character) x 128k tokens: under the size guard, so
        # the index is built, and that takes ~20 s on a 2-core box, far past the 1.5 s limit
        future = compiler.submit("regex", '"[^"]{0,350}"')
        with pytest.raises(GrammarError) as info:
            future.result(timeout=120)
        assert info.value.feature == "timeout"
        assert time.monotonic() - started < 60
        # the lane got a fresh worker and keeps working
        grammar = compiler.compile_regex("[ab]{2}")
        matcher = grammar.matcher()
        assert all(matcher.accept_token(t) for t in llama3.encode("ab", add_special_tokens=False))
        assert matcher.is_complete()


def test_isolated_worker_reports_spec_errors(llama3):
    with GrammarCompiler(llama3, max_workers=1) as compiler:
        with pytest.raises(GrammarError) as info:
            compiler.compile_json_schema({"type": "integer", "minimum": 3, "maximum": 1})
        assert info.value.feature == "unsatisfiable"
        assert compiler.compile_json_schema({"type": "boolean"}).matcher() is not None


def test_unknown_backend():
    with pytest.raises(GrammarError):
        GrammarCompiler(None, backend="xgrammar")


def test_batch_bitmask_round_trip(compiler3, llg3, llama3):
    """What the engine does each step: one row per constrained request, then the logits op."""
    grammars = [compiler3.compile_choices(["yes", "no"]), llg3.compile_regex("[0-9]+")]
    matchers = [g.matcher() for g in grammars]
    bitmask = torch.zeros((2, compiler3.words), dtype=torch.int32)
    for row, matcher in enumerate(matchers):
        matcher.fill_bitmask(bitmask, row)
    logits = torch.zeros(3, compiler3.vocab_size)
    apply_token_bitmask(logits, bitmask, torch.tensor([0, -1, 1]))
    allowed_yes = set(torch.nonzero(logits[0] == 0).reshape(-1).tolist())
    assert allowed_yes == set(matchers[0].allowed_token_ids())
    assert torch.isfinite(logits[1]).all()
    digits = set(torch.nonzero(logits[2] == 0).reshape(-1).tolist())
    assert digits == set(matchers[1].allowed_token_ids())
    assert llama3.encode("7", add_special_tokens=False)[0] in digits


def test_oversized_index_is_refused_before_building(compiler3):
    started = time.monotonic()
    with pytest.raises(GrammarError) as info:
        compiler3.compile_regex('"[^"]{0,3000}"')  # ~24,000 DFA states x 128k tokens
    assert info.value.feature == "size"
    assert "DFA states" in str(info.value)
    assert time.monotonic() - started < 30
