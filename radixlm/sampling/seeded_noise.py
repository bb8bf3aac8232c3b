"""Exp(1) noise for the rows of requests that carry a seed.

A seeded row's noise depends only on its (seed, step) seed and the token index, never on the
batch, so the request samples the same tokens in any batch and at any row. On CUDA one Triton
launch fills every seeded row from counter-based Philox streams; elsewhere each row draws from
its own ``torch.Generator``. The two give different (each reproducible) streams, so a seeded
request reproduces on the same kind of device.
"""

from __future__ import annotations

import torch

from radixlm.transfer import int_tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is Linux-only; the torch path below serves every device
    triton = None

_BLOCK = 1024


if triton is not None:

    @triton.jit
    def _seeded_exponential_kernel(
        out_ptr, out_stride, rows_ptr, seeds_ptr, vocab, BLOCK: tl.constexpr
    ):
        row = tl.load(rows_ptr + tl.program_id(0))
        seed = tl.load(seeds_ptr + tl.program_id(0))
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        # u in [0, 1): -log(u) is Exp(1) in (0, inf]; u == 0 gives inf, a token that never wins.
        noise = -tl.log(tl.rand(seed, cols))
        tl.store(out_ptr + row.to(tl.int64) * out_stride + cols, noise, mask=cols < vocab)


def fill_seeded_noise(noise: torch.Tensor, row_seeds: list[tuple[int, int]]) -> None:
    """Overwrite the seeded rows of ``noise`` [B, V] float32 with their own Exp(1) draws.

    Args:
        noise: the batch's noise, rows contiguous.
        row_seeds: (row, seed) pairs; seeds below 2**63.
    """
    if not row_seeds:
        return
    if noise.is_cuda and triton is not None:
        _fill_with_triton(noise, row_seeds)
    else:
        _fill_with_generators(noise, row_seeds)


def _fill_with_triton(noise: torch.Tensor, row_seeds: list[tuple[int, int]]) -> None:
    rows = int_tensor([row for row, _ in row_seeds], noise.device)
    seeds = int_tensor([seed for _, seed in row_seeds], noise.device)
    vocab = noise.shape[-1]
    grid = (len(row_seeds), triton.cdiv(vocab, _BLOCK))
    _seeded_exponential_kernel[grid](noise, noise.stride(0), rows, seeds, vocab, BLOCK=_BLOCK)


def _fill_with_generators(noise: torch.Tensor, row_seeds: list[tuple[int, int]]) -> None:
    generator = torch.Generator(device=noise.device)
    for row, seed in row_seeds:
        generator.manual_seed(seed)  # also rewinds the stream to its start
        noise[row].exponential_(generator=generator)
