"""Tensor parallelism (Megatron style): which slice of each weight a rank holds, and the layers
that need a collective.

A rank holds a contiguous block of query heads and of the MLP's intermediate columns, so the
merged q/k/v and gate/up projections are column-parallel plain ``nn.Linear`` layers over the rank's
rows and need no communication. ``o_proj`` and ``down_proj`` are row-parallel: each rank
multiplies its block of input columns and one all-reduce sums the partial outputs. KV heads are
split like query heads when there are at least as many as ranks; with fewer, each rank keeps the
one KV head its query heads attend to (so KV heads are replicated ``size / num_kv_heads`` times).
The embedding and the LM head are split by vocabulary rows (padded to a multiple of the rank
count): the embedding masks ids outside its rows and all-reduces, the LM head gathers the logits
once so every rank samples from the whole vocabulary.

Nothing here is global: a :class:`TensorParallel` is passed to the model's constructor, and a
model built without one is the plain single-device model (no collective, no extra copy).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from radixlm.model.arch import ModelArch

# torch 2.13 renamed all_gather_into_tensor (deprecated there); older releases lack the new name.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in a tensor-parallel group.

    Attributes:
        rank: this rank (0 .. size - 1).
        size: ranks in the group.
        group: the process group the model's collectives run on (NCCL on CUDA, gloo on CPU);
            None only where no collective runs (shape checks, loading slices in tests).
        cpu_group: a gloo group for host-side agreement (KV capacity) and control messages;
            the same as ``group`` on CPU.
    """

    rank: int
    size: int
    group: Any = None
    cpu_group: Any = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks, in place.

        Args:
            x: this rank's partial sum.

        Returns:
            ``x``, now the total.
        """
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's ``x`` stacked along a new leading dimension.

        Args:
            x: [...] this rank's tensor (same shape on every rank).

        Returns:
            [size, ...], rank r's tensor at index r.
        """
        x = x.contiguous()
        out = torch.empty((self.size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        _all_gather_single(out, x, group=self.group)
        return out.view(self.size, *x.shape)

    def min_int(self, value: int) -> int:
        """The smallest of every rank's ``value`` (host-side agreement, on the gloo group)."""
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.cpu_group)
        return int(t.item())


def init_tensor_parallel(
    rank: int,
    size: int,
    init_addr: str,
    device: torch.device,
    timeout_s: float = 600.0,
) -> TensorParallel:
    """Join the default process group and create the groups a rank needs.

    Args:
        rank: global rank.
        size: world size (the tensor-parallel size: one group spans every process).
        init_addr: "HOST:PORT" of rank 0's TCP store.
        device: this rank's device; CUDA uses NCCL, anything else gloo.
        timeout_s: how long a collective (and the rendezvous) may wait.

    Returns:
        The rank's :class:`TensorParallel`.
    """
    cuda = device.type == "cuda"
    timeout = datetime.timedelta(seconds=timeout_s)
    kwargs: dict[str, Any] = {"device_id": device} if cuda else {}
    dist.init_process_group(
        backend="nccl" if cuda else "gloo",
        init_method=f"tcp://{init_addr}",
        rank=rank,
        world_size=size,
        timeout=timeout,
        **kwargs,
    )
    group = dist.group.WORLD
    cpu_group = dist.new_group(backend="gloo", timeout=timeout) if cuda else group
    return TensorParallel(rank=rank, size=size, group=group, cpu_group=cpu_group)


@dataclass(frozen=True)
class ShardLayout:
    """Which heads, MLP columns and vocabulary rows one rank holds.

    Attributes:
        rank / size: the rank and the group size (size 1: the whole model).
        num_heads: query heads on this rank.
        num_kv_heads: KV heads on this rank.
        head_start: first query head of this rank.
        kv_head_start: first KV head of this rank.
        intermediate_size: MLP columns on this rank.
        vocab_rows: embedding / LM-head rows on this rank (the padded vocab / size).
        vocab_size: the real vocabulary size.
    """

    rank: int
    size: int
    num_heads: int
    num_kv_heads: int
    head_start: int
    kv_head_start: int
    intermediate_size: int
    vocab_rows: int
    vocab_size: int

    @classmethod
    def of(cls, arch: ModelArch, rank: int = 0, size: int = 1) -> ShardLayout:
        """The layout of ``rank`` among ``size`` ranks.

        Raises:
            ValueError: the model cannot be split that way (query heads, KV heads or the MLP
                width not divisible as required), naming the offending dimension.
        """
        check_shardable(arch, size)
        heads = arch.num_heads // size
        if arch.num_kv_heads >= size:
            kv_heads, kv_start = arch.num_kv_heads // size, rank * (arch.num_kv_heads // size)
        else:
            kv_heads, kv_start = 1, rank // (size // arch.num_kv_heads)
        vocab_rows = -(-arch.vocab_size // size)
        return cls(
            rank=rank,
            size=size,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_start=rank * heads,
            kv_head_start=kv_start,
            intermediate_size=arch.intermediate_size // size,
            vocab_rows=vocab_rows,
            vocab_size=arch.vocab_size,
        )

    @property
    def vocab_start(self) -> int:
        return self.rank * self.vocab_rows

    @property
    def vocab_real_rows(self) -> int:
        """Rows of this rank's vocabulary block that are real tokens (the rest is padding)."""
        return max(0, min(self.vocab_rows, self.vocab_size - self.vocab_start))

    def checkpoint_slice(self, hf_name: str, head_dim: int) -> tuple[int, int, int] | None:
        """Which part of checkpoint tensor ``hf_name`` this rank loads.

        Args:
            hf_name: a Hugging Face parameter name.
            head_dim: size of one attention head.

        Returns:
            ``(dim, start, length)``, or None for a tensor every rank loads whole.
        """
        if self.size == 1:
            return None
        kind = hf_name.rsplit(".", 1)[-1]
        proj = hf_name.rsplit(".", 2)[-2] if "." in hf_name else ""
        if proj == "q_proj":
            return 0, self.head_start * head_dim, self.num_heads * head_dim
        if proj in ("k_proj", "v_proj"):
            return 0, self.kv_head_start * head_dim, self.num_kv_heads * head_dim
        if proj in ("gate_proj", "up_proj"):
            start = self.rank * self.intermediate_size
            return 0, start, self.intermediate_size
        if proj == "o_proj" and kind == "weight":
            return 1, self.head_start * head_dim, self.num_heads * head_dim
        if proj == "down_proj" and kind == "weight":
            return 1, self.rank * self.intermediate_size, self.intermediate_size
        if hf_name.endswith("embed_tokens.weight") or hf_name == "lm_head.weight":
            return 0, self.vocab_start, self.vocab_real_rows
        return None


def check_shardable(arch: ModelArch, size: int) -> None:
    """Raise ValueError when ``arch`` cannot be split over ``size`` ranks.

    Args:
        arch: the model.
        size: the tensor-parallel size.
    """
    if size < 1:
        raise ValueError(f"tp_size must be >= 1, got {size}")
    if arch.num_heads % size:
        raise ValueError(f"num_attention_heads={arch.num_heads} is not divisible by tp_size={size}")
    kv = arch.num_kv_heads
    if kv >= size and kv % size:
        raise ValueError(f"num_key_value_heads={kv} is not divisible by tp_size={size}")
    if kv < size and size % kv:
        raise ValueError(
            f"tp_size={size} is not a multiple of num_key_value_heads={kv} (KV heads fewer "
            "than ranks are replicated, which needs a whole number of ranks per KV head)"
        )
    if arch.intermediate_size % size:
        raise ValueError(
            f"intermediate_size={arch.intermediate_size} is not divisible by tp_size={size}"
        )


class RowParallelLinear(nn.Module):
    """``y = x W^T + b`` where this rank holds W's block of input columns; one all-reduce sums
    the partial products, then the (whole, unsplit) bias is added once.

    Args:
        in_features: this rank's input columns.
        out_features: output width (whole).
        bias: whether a bias is added.
        tp: the group.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TensorParallel):
        super().__init__()
        self.tp = tp
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.tp.all_reduce(F.linear(x, self.weight))
        return out if self.bias is None else out + self.bias


class VocabParallelEmbedding(nn.Module):
    """An embedding split by vocabulary rows: each rank looks up the ids it holds, writes zeros
    for the others, and one all-reduce assembles every row.

    Args:
        layout: this rank's rows.
        embedding_dim: hidden size.
        tp: the group.
    """

    def __init__(self, layout: ShardLayout, embedding_dim: int, tp: TensorParallel):
        super().__init__()
        self.tp = tp
        self.start = layout.vocab_start
        self.rows = layout.vocab_rows
        self.weight = nn.Parameter(torch.empty(layout.vocab_rows, embedding_dim))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.rows)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0.0)
        return self.tp.all_reduce(out)


class ParallelLMHead(nn.Module):
    """The LM head split by vocabulary rows; one all-gather gives every rank the whole logits.

    Args:
        layout: this rank's rows (the same rows as the embedding, so a tied head shares them).
        hidden_size: input width.
        tp: the group.
    """

    def __init__(self, layout: ShardLayout, hidden_size: int, tp: TensorParallel):
        super().__init__()
        self.tp = tp
        self.vocab_size = layout.vocab_size
        self.weight = nn.Parameter(torch.empty(layout.vocab_rows, hidden_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[T, hidden] -> [T, vocab_size] logits (in the weight's dtype)."""
        parts = self.tp.all_gather_rows(F.linear(hidden, self.weight))  # [size, T, rows]
        tokens = hidden.shape[0]
        return parts.permute(1, 0, 2).reshape(tokens, -1)[:, : self.vocab_size]


def row_parallel_linear(
    in_features: int, out_features: int, bias: bool, tp: TensorParallel | None
) -> nn.Module:
    """``nn.Linear`` without a group, :class:`RowParallelLinear` with one.

    Args:
        in_features: this rank's input columns.
        out_features: output width.
        bias: whether a bias is added.
        tp: the group, or None for a single device.

    Returns:
        The layer.
    """
    if tp is None:
        return nn.Linear(in_features, out_features, bias=bias)
    return RowParallelLinear(in_features, out_features, bias, tp)


def vocab_embedding(layout: ShardLayout, hidden_size: int, tp: TensorParallel | None) -> nn.Module:
    """``nn.Embedding`` without a group, :class:`VocabParallelEmbedding` with one."""
    if tp is None:
        return nn.Embedding(layout.vocab_size, hidden_size)
    return VocabParallelEmbedding(layout, hidden_size, tp)


def lm_head(layout: ShardLayout, hidden_size: int, tp: TensorParallel | None) -> nn.Module:
    """``nn.Linear`` without a group, :class:`ParallelLMHead` with one."""
    if tp is None:
        return nn.Linear(hidden_size, layout.vocab_size, bias=False)
    return ParallelLMHead(layout, hidden_size, tp)
