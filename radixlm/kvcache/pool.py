"""The paged KV pool: per-layer K and V tensors addressed by slot index.

A slot holds one token's K (or V) for all KV heads of one layer. Slots are grouped into pages of
``page_size`` consecutive slots. Page 0 is reserved as a scratch page for padded batch rows
(CUDA-graph padding writes there), so usable slots start at ``page_size``.

An FP8 pool (``float8_e4m3fn`` storage) holds ``K / k_scale`` and ``V / v_scale`` with one pair
of scales per layer (from the checkpoint, 1.0 when it has none), saturated to +-448: half the
bytes of a bf16 pool, so twice the tokens fit in the same memory. Readers multiply the scale back
in: the torch reference through :func:`read_float`, the Triton kernels folded into their softmax
scale and output.
"""

from __future__ import annotations

import torch

FP8_KV_DTYPE = torch.float8_e4m3fn
FP8_KV_MAX = float(torch.finfo(FP8_KV_DTYPE).max)
KV_CACHE_DTYPES = ("auto", "fp8_e4m3")


def resolve_kv_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The storage dtype of the KV pool.

    Args:
        name: "auto" (the model dtype) or "fp8_e4m3".
        model_dtype: the activation dtype.

    Returns:
        The dtype.

    Raises:
        ValueError: an unknown name.
    """
    if name == "auto":
        return model_dtype
    if name == "fp8_e4m3":
        return FP8_KV_DTYPE
    raise ValueError(f"unknown kv_cache_dtype {name!r}; choose one of {KV_CACHE_DTYPES}")


def quantize_kv(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x / scale`` saturated to the e4m3 range, rounded to nearest-even FP8."""
    return (x.float() / scale).clamp_(-FP8_KV_MAX, FP8_KV_MAX).to(FP8_KV_DTYPE)


def read_float(rows: torch.Tensor, scale: float) -> torch.Tensor:
    """Pool rows (gathered from a K or V buffer) as float32, the layer's scale applied.

    Args:
        rows: any gather of one layer's K or V buffer.
        scale: that buffer's scale (``KVPool.scales``); 1.0 for a high-precision pool.

    Returns:
        float32 tensor of ``rows``' shape.
    """
    out = rows.float()
    return out if scale == 1.0 else out.mul_(scale)


class KVPool:
    """Fixed-capacity K/V storage.

    Args:
        num_layers: transformer layers.
        num_kv_heads: KV heads per layer.
        head_dim: size of one head.
        num_pages: usable pages (capacity = num_pages * page_size tokens).
        page_size: slots per page.
        dtype: storage dtype (the model dtype, or ``float8_e4m3fn`` for an FP8 cache).
        device: where the buffers live.
        kv_scales: per-layer (k_scale, v_scale) of an FP8 pool (default 1.0 each); must be
            1.0 for any other dtype.
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
        kv_scales: list[tuple[float, float]] | None = None,
    ):
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"KV pool needs >= 1 page of >= 1 slot, got {num_pages}x{page_size}")
        scales = list(kv_scales) if kv_scales is not None else [(1.0, 1.0)] * num_layers
        if len(scales) != num_layers:
            raise ValueError(f"{len(scales)} KV scale pairs for {num_layers} layers")
        if any(s <= 0 or s != s for pair in scales for s in pair):
            raise ValueError("KV scales must be positive numbers")
        if dtype != FP8_KV_DTYPE and any(pair != (1.0, 1.0) for pair in scales):
            raise ValueError(f"KV scales other than 1.0 need an FP8 pool, not {dtype}")
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.page_size = page_size
        self.num_pages = num_pages
        self.dtype = dtype
        self.device = torch.device(device)
        self.kv_scales = [(float(k), float(v)) for k, v in scales]
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

    @property
    def is_fp8(self) -> bool:
        """Whether K/V are stored in FP8 (scaled by ``scales``)."""
        return self.dtype == FP8_KV_DTYPE

    def k(self, layer: int) -> torch.Tensor:
        return self.k_buffers[layer]

    def v(self, layer: int) -> torch.Tensor:
        return self.v_buffers[layer]

    def scales(self, layer: int) -> tuple[float, float]:
        """(k_scale, v_scale) of ``layer``: stored value x scale = real value."""
        return self.kv_scales[layer]

    def store(self, layer: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write K/V rows [T, kv_heads, head_dim] into slots ``loc`` [T] (the torch path;
        quantized with the layer's scales in an FP8 pool).

        Args:
            layer: layer index.
            loc: [T] slot of each row.
            k: [T, kv_heads, head_dim] keys.
            v: [T, kv_heads, head_dim] values.
        """
        if self.is_fp8:
            k_scale, v_scale = self.kv_scales[layer]
            k, v = quantize_kv(k, k_scale), quantize_kv(v, v_scale)
        self.k_buffers[layer][loc] = k.to(self.dtype)
        self.v_buffers[layer][loc] = v.to(self.dtype)

    @staticmethod
    def bytes_per_token(
        num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        """K and V bytes one token takes across all layers (for sizing the pool)."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * num_kv_heads * head_dim * itemsize
