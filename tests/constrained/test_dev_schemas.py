"""Real schemas from ../shared/schemas/dev on the default backend: no valid instance rejected.

A schema passes when it compiles, every ``valid: true`` instance is accepted token by token (then
EOS) and every invalid one is rejected. A fixed sample (every 4th file, so every source set is
represented) keeps this to seconds; ``radixlm bench grammar`` runs all 1,002 and the other
backends. Instances are spelled as the grammar accepts them (``grammar_json``: key order and
number spelling found by asking the grammar), then tokenized whole, as a model would emit them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from radixlm.constrained import GrammarError, canonical_json, grammar_json

DEV = Path(__file__).resolve().parents[2].parent / "shared" / "schemas" / "dev"
SAMPLE = sorted(p for p in DEV.iterdir() if p.suffix == ".json")[::4] if DEV.is_dir() else []


def _spell(instance, schema, grammar) -> str | None:
    try:
        hint = json.loads(canonical_json(instance, schema))  # schema key order: a first guess
    except Exception:  # canonical_json follows the outlines compiler, which may refuse it
        hint = instance
    return grammar_json(hint, grammar)


def _accepts(grammar, tokenizer, text: str, eos: int) -> bool:
    matcher = grammar.matcher()
    ids = tokenizer.encode(text, add_special_tokens=False)
    return matcher.accept_tokens(ids) and matcher.accept_token(eos)


@pytest.mark.slow
@pytest.mark.skipif(not SAMPLE, reason=f"{DEV} not found")
def test_default_backend_on_dev_schemas(llg3, llama3):
    eos = 128009
    passed, false_rejections, errors = 0, [], []
    for path in SAMPLE:
        data = json.loads(path.read_text())
        try:
            grammar = llg3.compile_json_schema(data["schema"])
        except GrammarError as exc:  # a clear error is an allowed outcome; a crash is not
            assert exc.feature, str(exc)
            errors.append(path.name)
            continue
        ok = True
        for test in data["tests"]:
            text = _spell(test["data"], data["schema"], grammar)
            accepted = text is not None and _accepts(grammar, llama3, text, eos)
            if test["valid"] and not accepted:
                false_rejections.append(path.name)
            ok &= accepted == test["valid"]
        passed += ok
    assert not false_rejections, false_rejections
    assert passed >= 0.96 * len(SAMPLE), (passed, len(SAMPLE), errors)
