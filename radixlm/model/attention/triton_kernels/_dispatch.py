"""One kernel body, two runtimes: compiled for CUDA tensors, interpreted for CPU tensors.

``triton.jit`` decides between the compiler and the interpreter from ``TRITON_INTERPRET`` at the
moment the decorator runs, so whichever test or module imports the kernels first would fix the
mode for the whole process. Wrapping the plain functions in both runtimes up front and choosing
per call from the tensors' device makes the choice independent of import order.

The same trap holds for triton.language's own @jit helpers (tl.max, tl.sum, tl.cdiv, tl.zeros):
their runtime was fixed when triton.language was imported. So kernel bodies call no @jit function
at all: they reduce with the builtin ``tl.reduce`` and tl.standard's combine functions (which the
compiler inlines and the interpreter maps to numpy), and spell cdiv and zeros out.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction


@dataclass(frozen=True)
class DualKernel:
    """A Triton kernel wrapped for both the GPU compiler and the CPU interpreter."""

    compiled: JITFunction
    interpreted: InterpretedFunction

    def on(self, device: torch.device):
        """The launchable kernel for tensors on ``device`` (index it with a grid)."""
        return self.interpreted if runs_interpreted(device) else self.compiled


def runs_interpreted(device: torch.device) -> bool:
    """Whether kernels on ``device`` tensors run under the interpreter."""
    return device.type == "cpu" or os.environ.get("TRITON_INTERPRET") == "1"


def dual_kernel(fn: Callable) -> DualKernel:
    """Wrap a plain kernel function (written in triton.language) for both runtimes."""
    return DualKernel(compiled=JITFunction(fn), interpreted=InterpretedFunction(fn))


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (and >= 1)."""
    return 1 << max(0, (int(n) - 1).bit_length())
