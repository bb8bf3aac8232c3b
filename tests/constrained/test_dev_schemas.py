"""Real schemas from ../shared/schemas/dev: every valid instance is accepted token by token.

A fixed sample (every 33rd file, so each source set is represented, minus files over 100 kB whose
compile alone takes seconds) keeps this short; the benchmark (``python -m radixlm.bench.grammar``)
runs all 1,002.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from radixlm.constrained import GrammarError, canonical_json

DEV = Path(__file__).resolve().parents[2].parent / "shared" / "schemas" / "dev"
SAMPLE = [p for p in sorted(DEV.iterdir())[::33] if p.stat().st_size < 100_000] \
    if DEV.is_dir() else []


@pytest.mark.skipif(not SAMPLE, reason=f"{DEV} not found")
@pytest.mark.parametrize("path", SAMPLE, ids=lambda p: p.name[:40])
def test_valid_instances_accepted_token_by_token(path, compiler3, llama3):
    data = json.loads(path.read_text())
    try:
        grammar = compiler3.compile_json_schema(data["schema"])
    except GrammarError as exc:  # a clear error is an allowed outcome; a crash is not
        assert exc.feature, str(exc)
        return
    eos = 128009
    for test in data["tests"]:
        if not test["valid"]:
            continue
        text = canonical_json(test["data"], data["schema"])
        matcher = grammar.matcher()
        ids = llama3.encode(text, add_special_tokens=False)
        for i, token in enumerate(ids):
            assert matcher.accept_token(token), (path.name, llama3.decode(ids[: i + 1]))
        assert matcher.accept_token(eos) and matcher.is_terminated(), (path.name, text)
