"""apply_token_bitmask: the torch op against a brute-force loop, Triton against the op."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from radixlm.constrained.bitmask import (
    allocate_token_bitmask,
    apply_token_bitmask,
    apply_token_bitmask_torch,
    unpack_bitmask,
)


def _brute_force(logits: torch.Tensor, bitmask: torch.Tensor, rows) -> torch.Tensor:
    out = logits.clone()
    for i in range(logits.shape[0]):
        r = i if rows is None else int(rows[i])
        if r < 0:
            continue
        for j in range(logits.shape[1]):
            word = j // 32
            allowed = word < bitmask.shape[1] and (int(bitmask[r, word]) >> (j % 32)) & 1
            if not allowed:
                out[i, j] = float("-inf")
    return out


@pytest.mark.parametrize("batch, vocab, words, rows", [
    (3, 100, 4, None),            # mask wider than the vocabulary
    (4, 70, 2, [1, -1, 0, 1]),    # logits wider than the mask; an unconstrained row
    (2, 64, 2, None),
])
def test_torch_op_matches_brute_force(batch, vocab, words, rows):
    gen = torch.Generator().manual_seed(batch * vocab)
    logits = torch.randn(batch, vocab, generator=gen)
    mask_rows = batch if rows is None else 2
    bitmask = torch.randint(-2**31, 2**31 - 1, (mask_rows, words), dtype=torch.int32,
                            generator=gen)
    rows_t = None if rows is None else torch.tensor(rows)
    expected = _brute_force(logits, bitmask, rows_t)
    apply_token_bitmask_torch(logits, bitmask, rows_t)
    assert torch.equal(logits, expected)


def test_unpack_and_allocate():
    mask = allocate_token_bitmask(2, 40)
    assert mask.shape == (2, 2) and unpack_bitmask(mask, 40).all()
    mask[0, 1] = 0b101
    bits = unpack_bitmask(mask, 40)
    assert bits[0, 32] and not bits[0, 33] and bits[0, 34] and not bits[0, 39]


_INTERPRETED = textwrap.dedent("""
    import os
    os.environ["TRITON_INTERPRET"] = "1"   # before the kernel is created (it is, lazily)
    import torch
    from radixlm.constrained.bitmask import apply_token_bitmask, apply_token_bitmask_torch
    gen = torch.Generator().manual_seed(0)
    for batch, vocab, words, rows in [(3, 100, 4, None), (4, 70, 2, [1, -1, 0, 1]),
                                      (2, 2100, 66, None), (1, 33, 1, None)]:
        logits = torch.randn(batch, vocab, generator=gen)
        expected = logits.clone()
        bitmask = torch.randint(-2**31, 2**31 - 1, (batch if rows is None else 2, words),
                                dtype=torch.int32, generator=gen)
        rows_t = None if rows is None else torch.tensor(rows)
        apply_token_bitmask_torch(expected, bitmask, rows_t)
        apply_token_bitmask(logits, bitmask, rows_t, backend="triton")
        assert torch.equal(logits, expected), (batch, vocab, words)
    print("ok")
""")


def test_triton_kernel_matches_torch_op_under_interpreter():
    """In a fresh interpreter, so TRITON_INTERPRET is set before any kernel exists."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", _INTERPRETED], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


@pytest.mark.gpu
def test_triton_kernel_on_cuda():
    gen = torch.Generator(device="cuda").manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.randn(64, 128256, device="cuda", generator=gen).to(dtype)
        bitmask = torch.randint(-2**31, 2**31 - 1, (64, 4008), dtype=torch.int32,
                                device="cuda", generator=gen)
        rows = torch.randint(-1, 64, (64,), device="cuda", generator=gen)
        expected = logits.clone()
        apply_token_bitmask_torch(expected, bitmask, rows)
        apply_token_bitmask(logits, bitmask, rows)
        assert torch.equal(logits, expected)
