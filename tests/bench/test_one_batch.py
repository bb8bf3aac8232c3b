"""`radixlm bench one-batch` end to end on a tiny CPU model, with the HF baseline."""

from __future__ import annotations

import json

import pytest

from radixlm.bench import one_batch


def test_one_batch_times_prefill_and_decode_and_hf(bench_model_dir, tmp_path, capsys,
                                                    ceilings):
    out = tmp_path / "one_batch.json"
    status = one_batch.main(["--model", str(bench_model_dir), "--batch-sizes", "1", "3",
                             "--input-lens", "6", "--output-len", "4", "--baseline", "hf",
                             "--out", str(out), *ceilings])
    assert status == 0
    result = json.loads(out.read_text())
    rows = result["results"]
    assert [(r["batch"], r["input_len"]) for r in rows] == [(1, 6), (3, 6)]
    for row in rows:
        # Overlapped loop: the call that launches the extend returns nothing, the next one
        # returns the first tokens; each later call returns one decoded token per request.
        assert len(row["step_seconds"]) == 5 and row["decode_steps"] == 3
        assert row["prefill_ms"] == pytest.approx(sum(row["step_seconds"][:2]) * 1e3)
        assert row["total_s"] == pytest.approx(sum(row["step_seconds"]))
        assert row["output_tok_s"] == pytest.approx(row["batch"] * 4 / row["total_s"])
        assert 0 < row["prefill_roof_ms"] and 0 < row["decode_roof_ms"] < row["decode_ms"]
    hf = result["hf_baseline"]
    assert sorted((r["variant"], r["batch"]) for r in hf) == [
        ("default", 1), ("default", 3), ("static-compile", 1), ("static-compile", 3)]
    for r in hf:
        ours = next(x for x in rows if x["batch"] == r["batch"])
        assert r["radixlm_speedup"] == pytest.approx(ours["output_tok_s"] / r["output_tok_s"])
    printed = capsys.readouterr().out
    assert "decode ms/step" in printed and "HF variant" in printed


def test_one_batch_serial_loop_and_profile(bench_model_dir, tmp_path, capsys, ceilings):
    out = tmp_path / "ob.json"
    status = one_batch.main(["--model", str(bench_model_dir), "--batch-sizes", "2",
                             "--input-lens", "5", "--output-len", "8", "--no-enable-overlap",
                             "--profile", "--profile-steps", "3", "--out", str(out),
                             *ceilings])
    assert status == 0
    row = json.loads(out.read_text())["results"][0]
    # Serially every call runs one step: one extend, then seven decodes.
    assert len(row["step_seconds"]) == 8 and row["decode_steps"] == 7
    prof = row["profile"]
    assert prof["profiled_steps"] == 3 and prof["host_op_ms_per_step"] > 0
    assert prof["top"] and all(item["calls_per_step"] > 0 for item in prof["top"])
    assert (tmp_path / "ob-trace-bs2-in5.json").is_file()
    assert "kernel ms/step" in capsys.readouterr().out
