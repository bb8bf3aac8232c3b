"""One decoder-only transformer, parameterised for Llama, Mistral, Qwen2 and Qwen3.

The four architectures differ only in details ``ModelArch`` captures: q/k/v (and o) biases,
per-head q/k RMSNorm, rotary scaling, Mistral's sliding window and tied embeddings. Module names
mirror Hugging Face's so checkpoints map one to one, except that q/k/v and gate/up are merged into
single matmuls (``qkv_proj``, ``gate_up_proj``); ``STACKED_WEIGHTS`` says where each HF tensor goes.
"""

from __future__ import annotations

import torch
from torch import nn

from radixlm.batch import ForwardBatch
from radixlm.kvcache.pool import KVPool
from radixlm.model.arch import ModelArch
from radixlm.model.attention.base import AttentionBackend
from radixlm.model.layers.activation import silu_and_mul
from radixlm.model.layers.linear import apply_linear
from radixlm.model.layers.norm import RMSNorm
from radixlm.model.layers.rotary import RotaryEmbedding
from radixlm.model.parallel import (
    ShardLayout,
    TensorParallel,
    lm_head,
    row_parallel_linear,
    vocab_embedding,
)

# HF projection name -> (merged module name, index of its block within the merged rows).
STACKED_WEIGHTS: dict[str, tuple[str, int]] = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class Attention(nn.Module):
    """Self-attention of one layer: merged qkv, optional q/k norm, rotary, paged attention.

    With tensor parallelism the layer holds its rank's query and KV heads (``layout``): qkv is
    column-parallel (no communication), o_proj row-parallel (one all-reduce).
    """

    def __init__(
        self,
        arch: ModelArch,
        layer_id: int,
        rotary: RotaryEmbedding,
        layout: ShardLayout | None = None,
        tp: TensorParallel | None = None,
    ):
        super().__init__()
        layout = layout or ShardLayout.of(arch)
        self.layer_id = layer_id
        self.num_heads, self.num_kv_heads = layout.num_heads, layout.num_kv_heads
        self.head_dim = arch.head_dim
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.split_sizes = [q_size, kv_size, kv_size]
        self.scale = arch.head_dim**-0.5
        self.qkv_proj = nn.Linear(arch.hidden_size, sum(self.split_sizes), bias=arch.attention_bias)
        self.o_proj = row_parallel_linear(q_size, arch.hidden_size, arch.o_proj_bias, tp)
        self.q_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps) if arch.qk_norm else None
        self.k_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps) if arch.qk_norm else None
        # A plain attribute, not a submodule: the rotary cache is shared by every layer.
        self._rotary = (rotary,)

    def forward(
        self, x: torch.Tensor, batch: ForwardBatch, pool: KVPool, attn: AttentionBackend
    ) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden]; writes this layer's new K/V into the pool."""
        tokens = x.shape[0]
        q, k, v = apply_linear(self.qkv_proj, x).split(self.split_sizes, dim=-1)
        q = q.view(tokens, self.num_heads, self.head_dim)
        k = k.view(tokens, self.num_kv_heads, self.head_dim)
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self._rotary[0](batch.positions, q, k)
        out = attn.forward(q, k, v, self.layer_id, batch, pool, self.scale)
        return apply_linear(self.o_proj, out.reshape(tokens, -1))


class MLP(nn.Module):
    """Gated SiLU MLP with gate and up merged into one matmul (column-parallel under tensor
    parallelism: this rank's gate columns, then its up columns); down is row-parallel."""

    def __init__(
        self, arch: ModelArch, layout: ShardLayout | None = None, tp: TensorParallel | None = None
    ):
        super().__init__()
        size = (layout or ShardLayout.of(arch)).intermediate_size
        self.gate_up_proj = nn.Linear(arch.hidden_size, 2 * size, bias=arch.mlp_bias)
        self.down_proj = row_parallel_linear(size, arch.hidden_size, arch.mlp_bias, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_linear(self.down_proj, silu_and_mul(apply_linear(self.gate_up_proj, x)))


class DecoderLayer(nn.Module):
    """Pre-norm block; carries the residual stream separately so the adds fuse into the norms."""

    def __init__(
        self,
        arch: ModelArch,
        layer_id: int,
        rotary: RotaryEmbedding,
        layout: ShardLayout | None = None,
        tp: TensorParallel | None = None,
    ):
        super().__init__()
        self.self_attn = Attention(arch, layer_id, rotary, layout, tp)
        self.mlp = MLP(arch, layout, tp)
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        batch: ForwardBatch,
        pool: KVPool,
        attn: AttentionBackend,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's output not yet added to the residual, the residual)."""
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(hidden, batch, pool, attn)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class DecoderModel(nn.Module):
    """Embedding, the layers and the final norm (HF's ``model.`` prefix)."""

    def __init__(
        self, arch: ModelArch, layout: ShardLayout | None = None, tp: TensorParallel | None = None
    ):
        super().__init__()
        layout = layout or ShardLayout.of(arch)
        self.embed_tokens = vocab_embedding(layout, arch.hidden_size, tp)
        self.rotary_emb = RotaryEmbedding(
            arch.head_dim, arch.max_position_embeddings, arch.rope_theta, arch.rope_scaling
        )
        self.layers = nn.ModuleList(
            DecoderLayer(arch, i, self.rotary_emb, layout, tp) for i in range(arch.num_layers)
        )
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)

    def forward(
        self, batch: ForwardBatch, pool: KVPool, attn: AttentionBackend
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (last layer output, residual), both [T, hidden], before the final norm."""
        hidden, residual = self.embed_tokens(batch.input_ids), None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, batch, pool, attn)
        return hidden, residual


class CausalLM(nn.Module):
    """A decoder-only LM reading and writing its KV cache in a paged ``KVPool``.

    Args:
        arch: the model's architecture (one of SUPPORTED_ARCHITECTURES).
        tp: this rank's tensor-parallel group, or None for the whole model on one device
            (plain layers: no collective, no extra copy).
    """

    def __init__(self, arch: ModelArch, tp: TensorParallel | None = None):
        super().__init__()
        self.arch = arch
        # Per-layer (k_scale, v_scale) of an FP8 KV cache; the loader sets them from the
        # checkpoint when it has them.
        self.kv_scales: list[tuple[float, float]] = [(1.0, 1.0)] * arch.num_layers
        self.tp = tp
        # Which heads, MLP columns and vocabulary rows this rank holds (all of them without tp).
        self.layout = ShardLayout.of(arch) if tp is None else ShardLayout.of(arch, tp.rank, tp.size)
        self.model = DecoderModel(arch, self.layout, tp)
        self.lm_head = lm_head(self.layout, arch.hidden_size, tp)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding with the LM head when the config ties them (call again after
        any conversion that re-creates parameters, such as ``to_empty``)."""
        if self.arch.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def forward(self, batch: ForwardBatch, pool: KVPool, attn: AttentionBackend) -> torch.Tensor:
        """Run one extend or decode pass.

        Args:
            batch: the ragged batch (new tokens, their positions and KV slots).
            pool: the KV pool; this pass writes the new tokens' K/V into it.
            attn: the attention backend; ``attn.prepare(batch)`` is called here.

        Returns:
            [L, vocab_size] float32 logits for the rows ``batch.logits_indices``.

        Raises:
            ValueError: a sequence longer than the rotary cache, or longer than Mistral's
                sliding window with a backend that does not apply that window.
        """
        self._check_lengths(batch, attn)
        attn.prepare(batch)
        hidden, residual = self.model(batch, pool, attn)
        rows = batch.logits_indices
        # The final norm is per row, so only the rows that need logits are normalised.
        hidden, _ = self.model.norm(hidden[rows], residual[rows])
        return self.lm_head(hidden).float()

    def _check_lengths(self, batch: ForwardBatch, attn: AttentionBackend) -> None:
        longest = batch.max_seq_len
        if longest > self.arch.max_position_embeddings:
            raise ValueError(
                f"sequence of {longest} tokens exceeds max_position_embeddings="
                f"{self.arch.max_position_embeddings}"
            )
        window = self.arch.sliding_window
        if window is not None and longest > window:
            if getattr(attn, "sliding_window", None) != window:
                raise ValueError(
                    f"sequence of {longest} tokens exceeds the model's sliding_window={window} "
                    f"and {type(attn).__name__} does not apply that window"
                )
