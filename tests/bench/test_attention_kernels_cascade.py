"""The cascade case of the attention-kernel benchmark, at a tiny size on CPU (interpreter): the
batch it builds has the groups asked for, both paths pass its check, and its byte counts."""

from __future__ import annotations

import torch

from radixlm.bench import attention_kernels as bench


def test_cascade_setup_check_and_bytes():
    args = bench.parse_args(["--device", "cpu", "--cascade-groups", "2", "--group-size", "3",
                             "--shared-len", "48", "--suffix-len", "8", "--min-shared", "16",
                             "--page-size", "4"])  # fmt: skip
    gen = torch.Generator("cpu").manual_seed(0)
    cs = bench.build_cascade_setup(args, gen)
    groups = cs.setup.batch.prefix_groups
    assert groups.group_sizes_cpu == [3, 3] and groups.shared_lens_cpu == [48, 48]
    assert cs.plain.prefix_groups is None
    checks = bench.check_cascade(cs)
    assert [c["kernel"] for c in checks] == ["decode cascade", "decode plain"]
    assert all(c["ok"] for c in checks)
    # bf16 K and V of 8 heads x 128 dims: 4 KiB per token, plus its 8-byte slot index.
    per_token = 2 * bench.KV_HEADS * bench.HEAD_DIM * 2 + 8
    q_and_out = 2 * 6 * bench.Q_HEADS * bench.HEAD_DIM * 2
    assert bench.cascade_bytes(2, 3, 48, 8) == (2 * 48 + 6 * 8) * per_token + q_and_out
    assert bench.attention_bytes(6, 56, 1) == 6 * 56 * per_token + q_and_out
    assert bench.time_group_finder(cs.slots, 16, repeats=3) > 0
