"""``radixlm bench grammar`` on a few real schemas: the report has every column it prints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from radixlm.bench import grammar

DEV = Path(__file__).resolve().parents[2].parent / "shared" / "schemas" / "dev"


@pytest.mark.skipif(not DEV.is_dir(), reason=f"{DEV} not found")
def test_grammar_bench_reports_pass_rate_and_timings(tmp_path, llama3_tokenizer_dir, capsys):
    out = tmp_path / "grammar.json"
    assert (
        grammar.main(
            [
                "--schemas",
                str(DEV),
                "--tokenizer",
                str(llama3_tokenizer_dir),
                "--match",
                "Glaiveai2K---calculate_area",
                "--limit",
                "2",
                "--backends",
                "llguidance,llguidance-raw:2",
                "--batch",
                "",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    default = report["backends"]["llguidance"]["summary"]
    assert default["total"] == 2 and report["backends"]["llguidance-raw:2"]["summary"]["total"] == 1
    assert default["passed"] <= default["compiled"] <= default["total"]
    assert default["false_rejections"] == 0 and default["valid_checked"] > 0
    assert default["compile_p50_s"] > 0 and default["compile_cpu_p50_s"] > 0
    assert default["mask_avg_us"] > 0 and default["mask_cpu_avg_us"] > 0
    table = capsys.readouterr().out
    assert "| llguidance | 2 |" in table and "| llguidance-raw:2 | 1 |" in table
