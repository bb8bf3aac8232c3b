"""Default sizes that depend on the machine: the CPU KV pool and the prefill chunk.

On a GPU the pool takes a share of the device's free memory (``CacheConfig.mem_fraction``). On
the CPU the pool lives in the same RAM as everything else, so it takes a small share of the
memory available to this process (cgroup limit included) and is capped: a fixed 65,536-token
pool was ~3 GB for a 135M model. The prefill chunk bounds how long one step runs (a decode step
waits behind at most one extend step) and how much activation memory a long prompt needs.
"""

from __future__ import annotations

import os
from pathlib import Path

# CPU KV pool: this share of the available memory, within [CPU_KV_MIN_TOKENS, CPU_KV_MAX_TOKENS].
CPU_KV_MEM_FRACTION = 0.10
CPU_KV_MIN_TOKENS = 1024
CPU_KV_MAX_TOKENS = 16384
# Longest extend per step: on a GPU ~2k tokens of an 8B model are tens of milliseconds, so a
# decode step never waits long behind a prefill; on the CPU 512 tokens of a 135M model are a
# few hundred milliseconds.
GPU_PREFILL_CHUNK = 2048
CPU_PREFILL_CHUNK = 512
CPU_PREFILL_MIN_CHUNK = 64
# Activations of one prompt token on the CPU may take at most this share of available memory.
CPU_PREFILL_MEM_FRACTION = 0.02


def available_host_bytes() -> int:
    """Memory this process may still use: MemAvailable, lowered to the cgroup's headroom when
    a cgroup v2 limit is set (containers). Falls back to total RAM / 2 off Linux."""
    available = _meminfo_available()
    headroom = _cgroup_headroom()
    if headroom is not None:
        available = min(available, headroom) if available else headroom
    if not available:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        available = pages * page_size // 2
    return available


def _meminfo_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _cgroup_headroom() -> int | None:
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        return max(int(limit) - used, 0)
    except (OSError, ValueError):
        return None


def cpu_kv_tokens(bytes_per_token: int, available_bytes: int | None = None) -> int:
    """Default KV pool capacity on the CPU.

    Args:
        bytes_per_token: K and V bytes of one token over all layers.
        available_bytes: memory available to the process; measured when None.

    Returns:
        ``CPU_KV_MEM_FRACTION`` of the available memory in tokens, within
        [``CPU_KV_MIN_TOKENS``, ``CPU_KV_MAX_TOKENS``].
    """
    if available_bytes is None:
        available_bytes = available_host_bytes()
    tokens = int(available_bytes * CPU_KV_MEM_FRACTION) // max(bytes_per_token, 1)
    return max(CPU_KV_MIN_TOKENS, min(tokens, CPU_KV_MAX_TOKENS))


def default_prefill_chunk(device_type: str, activation_bytes_per_token: int = 256 << 10,
                          available_bytes: int | None = None) -> int:
    """Longest extend per request per step when none is configured.

    Args:
        device_type: "cuda" or "cpu" (anything else is treated as the CPU).
        activation_bytes_per_token: a generous bound of one token's activations in a forward.
        available_bytes: host memory available (CPU only); measured when None.

    Returns:
        ``GPU_PREFILL_CHUNK`` on a GPU; on the CPU ``CPU_PREFILL_CHUNK``, fewer when the
        chunk's activations would exceed ``CPU_PREFILL_MEM_FRACTION`` of available memory.
    """
    if device_type == "cuda":
        return GPU_PREFILL_CHUNK
    if available_bytes is None:
        available_bytes = available_host_bytes()
    fits = int(available_bytes * CPU_PREFILL_MEM_FRACTION) // max(activation_bytes_per_token, 1)
    return max(CPU_PREFILL_MIN_CHUNK, min(CPU_PREFILL_CHUNK, fits))
