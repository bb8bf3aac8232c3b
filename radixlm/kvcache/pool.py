"""The paged KV pool: per-layer K and V tensors addressed by slot index.

A slot holds one token's K (or V) for all KV heads of one layer. Slots are grouped into pages of
``page_size`` consecutive slots. Page 0 is reserved as a scratch page for padded batch rows
(CUDA-graph padding writes there), so usable slots start at ``page_size``.
"""

from __future__ import annotations

import torch


class KVPool:
    """Fixed-capacity K/V storage.

    Args:
        num_layers: transformer layers.
        num_kv_heads: KV heads per layer.
        head_dim: size of one head.
        num_pages: usable pages (capacity = num_pages * page_size tokens).
        page_size: slots per page.
        dtype: storage dtype.
        device: where the buffers live.
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_pages: int,
        page_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"KV pool needs >= 1 page of >= 1 slot, got {num_pages}x{page_size}")
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.page_size = page_size
        self.num_pages = num_pages
        self.dtype = dtype
        self.device = torch.device(device)
        total_slots = (num_pages + 1) * page_size
        shape = (total_slots, num_kv_heads, head_dim)
        self.k_buffers = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v_buffers = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @property
    def capacity_tokens(self) -> int:
        """Usable token slots (the scratch page excluded)."""
        return self.num_pages * self.page_size

    @property
    def first_usable_slot(self) -> int:
        return self.page_size

    @property
    def scratch_slot(self) -> int:
        """A slot padded rows may write to; never handed out."""
        return 0

    def k(self, layer: int) -> torch.Tensor:
        return self.k_buffers[layer]

    def v(self, layer: int) -> torch.Tensor:
        return self.v_buffers[layer]

    @staticmethod
    def bytes_per_token(
        num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        """K and V bytes one token takes across all layers (for sizing the pool)."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * num_kv_heads * head_dim * itemsize
