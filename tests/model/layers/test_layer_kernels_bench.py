"""Smoke run of radixlm/bench/layer_kernels.py on the CPU (kernels under the interpreter)."""

from __future__ import annotations

import json

import torch

from radixlm.bench import layer_kernels
from radixlm.model.attention.torch_backend import TorchAttentionBackend


def test_bench_checks_and_times_every_kernel_on_cpu(tmp_path, capsys):
    out = tmp_path / "layer_kernels.json"
    argv = ["--device", "cpu", "--shape", "tiny", "--tokens", "1", "3", "--layers", "2",
            "--skip-model", "--out", str(out)]  # fmt: skip
    assert layer_kernels.main(argv) == 0
    report = json.loads(out.read_text())
    ops = {op.name for op in layer_kernels.OPS}
    assert {row["op"] for row in report["checks"]} == ops
    assert all(row["ok"] for row in report["checks"])
    assert {(row["op"], row["tokens"]) for row in report["kernels"]} == {
        (op, t) for op in ops for t in (1, 3)}  # fmt: skip
    assert all(row["torch_us"] > 0 and row["fused_us"] > 0 for row in report["kernels"])
    assert "rotary q+k" in capsys.readouterr().out


def test_decode_setup_builds_full_contexts():
    """Each sequence holds ``context`` slots of its own, the decoded token in the last one."""
    model, pool, batches = layer_kernels.build_decode_setup("llama", [1, 3], 8, device="cpu")
    batch = batches[3]
    assert batch.seq_lens.tolist() == [8, 8, 8]
    assert batch.positions.tolist() == [7, 7, 7]
    assert len(set(batch.kv_indices.tolist())) == 24
    assert pool.scratch_slot not in batch.kv_indices.tolist()
    logits = model(batch, pool, TorchAttentionBackend())
    assert logits.shape == (3, model.arch.vocab_size) and torch.isfinite(logits).all()
