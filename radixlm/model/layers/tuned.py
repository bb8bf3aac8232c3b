"""Measured kernel choices for linear layers at a few rows (decode), per GPU model.

Which kernel streams a weight fastest at batch 1-16 depends on the GPU and the matrix shape
(cuBLAS, the tensor-core small-M kernel or the CUDA-core GEMV; which tile), and nothing but a
measurement settles it. ``radixlm bench fp8-gemm --tune-out FILE`` times every candidate per
projection shape and row count and writes the winners to ``tuned/<gpu>.json`` beside this file;
the layers look their shape up here at run time. A GPU or shape with no entry keeps the
defaults (cuBLAS for unquantized weights; the heuristics of :mod:`radixlm.model.layers.fp8`).

File layout::

    {"device": "NVIDIA H200", "date": ..., "command": ...,
     "fp8":  {"6144x4096": {"1": {"kernel": "gemv", "block_n": 4, ...}, "2": ..., "16": ...}},
     "bf16": {"6144x4096": {"1": {"kernel": "cublas"}, ...}}}

keys ``"NxK"`` (output x input features), then the row count measured; a call with ``m`` rows
takes the entry of the smallest measured row count >= m.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

TUNED_DIR = Path(__file__).with_name("tuned")
KERNELS = ("cublas", "scaled_mm", "gemv", "dot", "dot_f16", "swap_ab")
# Row counts a plan covers (decode at small batch); above, the layers' defaults always apply.
MAX_TUNED_M = 16


@dataclass(frozen=True)
class KernelChoice:
    """One measured winner.

    Attributes:
        kernel: ``cublas`` (unquantized ``F.linear``), ``scaled_mm`` (per-token FP8 activation,
            ``torch._scaled_mm``), ``gemv`` (:mod:`radixlm.model.layers.gemv_triton`), ``dot`` /
            ``dot_f16`` (the tensor-core small-M kernel of
            :mod:`radixlm.model.layers.fp8_triton`, on the activation's dtype / on fp16),
            ``swap_ab`` (W8A8 on FP8 tensor cores
            with the weight as the MMA's wide side, ``fp8_triton.fp8_swap_ab_gemm``).
        block_n / block_k / num_warps / widen / split_k: the Triton kernels' tile (0 where
            unused).
    """

    kernel: str
    block_n: int = 0
    block_k: int = 0
    num_warps: int = 4
    widen: str = "cvt"
    split_k: int = 1

    @classmethod
    def from_dict(cls, entry: dict) -> KernelChoice:
        choice = cls(**entry)
        if choice.kernel not in KERNELS:
            raise ValueError(f"unknown kernel {choice.kernel!r} in a tuned plan")
        return choice

    def to_dict(self) -> dict:
        out = {"kernel": self.kernel}
        if self.block_n:
            out.update(block_n=self.block_n, block_k=self.block_k, num_warps=self.num_warps)
            if self.widen != "cvt":
                out["widen"] = self.widen
            if self.split_k != 1:
                out["split_k"] = self.split_k
        return out


def device_slug(name: str) -> str:
    """File stem for a GPU name: ``"NVIDIA H200"`` -> ``"nvidia_h200"``."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def load_plan(path: Path) -> dict[tuple[str, int, int], list[tuple[int, KernelChoice]]]:
    """Read a tuned plan file: ``(weight, n, k) -> [(rows measured, choice)]`` sorted by rows.

    Args:
        path: the JSON file (see the module docstring).

    Returns:
        The plan ({} when the file does not exist).
    """
    if not path.is_file():
        return {}
    raw = json.loads(path.read_text())
    plan = {}
    for weight in ("fp8", "bf16"):
        for shape, by_m in raw.get(weight, {}).items():
            n, k = (int(v) for v in shape.split("x"))
            rows = sorted((int(m), KernelChoice.from_dict(e)) for m, e in by_m.items())
            plan[(weight, n, k)] = rows
    return plan


def choose(plan: dict, weight: str, n: int, k: int, m: int) -> KernelChoice | None:
    """The plan's entry for the smallest measured row count >= ``m``, or None."""
    for measured, choice in plan.get((weight, n, k), ()):
        if m <= measured:
            return choice
    return None


@functools.cache
def _plan_for(index: int) -> dict:
    return load_plan(TUNED_DIR / f"{device_slug(torch.cuda.get_device_name(index))}.json")


def tuned_choice(device: torch.device, weight: str, n: int, k: int, m: int) -> KernelChoice | None:
    """The measured winner for ``m`` rows of an ``[n, k]`` weight on this GPU, or None.

    Args:
        device: a CUDA device.
        weight: ``"fp8"`` or ``"bf16"`` (unquantized weights of any 16-bit dtype).
        n: output features.
        k: input features.
        m: rows of the activation.

    Returns:
        The choice, or None when the plan has no entry for this shape and row count.
    """
    index = device.index if device.index is not None else torch.cuda.current_device()
    return choose(_plan_for(index), weight, n, k, m)
