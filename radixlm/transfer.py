"""Host-to-device copies that never make the host wait for the device's queue.

A copy from pageable memory may synchronise with the stream; from pinned memory with
``non_blocking`` it is truly asynchronous, which overlap scheduling relies on (the previous step
may still be running). Every per-step host-to-device copy (batch indices, sampler parameters,
prefix groups) goes through here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a host tensor to ``device`` without making the host wait for the GPU queue
    (pinned memory + non_blocking on CUDA)."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def int_tensor(values: Sequence[int], device: torch.device) -> torch.Tensor:
    """[N] int64 on ``device``."""
    return to_device(torch.tensor(values, dtype=torch.int64), device)


def float_tensor(values: Sequence[float], device: torch.device) -> torch.Tensor:
    """[N] float32 on ``device``."""
    return to_device(torch.tensor(values, dtype=torch.float32), device)
