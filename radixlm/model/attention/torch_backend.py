"""The torch attention backend: batched, padded attention over slots gathered from the pool.

Scores, softmax and the weighted sum run in float32 whatever the pool dtype. It runs anywhere
torch runs, is the CPU path, and is what the Triton kernels are tested against.

Everything that depends only on the batch (which slots each sequence reads, the positions of its
queries, the visibility mask) is built once per forward in :meth:`TorchAttentionBackend.prepare`;
each layer then does one gather of K/V from the pool and one batched
``scaled_dot_product_attention`` per group of similar sequences, with no per-sequence loop.
Sequences are grouped so that padding them to the group's longest query run and longest KV run
wastes little work (a decode batch of similar lengths is one group; a long prefill next to short
ones gets its own). A group's query rows are processed in chunks whose score matrices stay within
``score_budget_bytes``, so an 8k-token prefill never materialises its full [heads, n, S] scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from radixlm.batch import ForwardBatch
from radixlm.kvcache.pool import KVPool, read_float
from radixlm.model.attention.base import AttentionBackend

# Score-matrix bytes one attention call may materialise (float32 scores and probabilities).
DEFAULT_SCORE_BUDGET_BYTES = 64 << 20
# A sequence joins a group while the padded work stays within this factor of the real work ...
PAD_WASTE_FACTOR = 1.5
# ... plus this many query x key pairs, so tiny batches never split over a few padded slots.
PAD_WASTE_SLACK = 1 << 15
# Masks up to this many elements are built once per forward; larger ones per query chunk.
MAX_CACHED_MASK_ELEMS = 1 << 23
# Per score element: the float32 score, the float32 probability and the boolean mask, with room
# for the temporaries of softmax.
BYTES_PER_SCORE = 12


@dataclass
class _Group:
    """Sequences attended together in one padded batch (built once per forward).

    Attributes:
        seq_ids: the batch's sequence indices in this group.
        q_rows: [G*Nmax] rows of ``q`` to gather (padding repeats a valid row), or None when
            the group is the whole batch with one query each (decode) or one unpadded sequence.
        q_slice: (start, end) rows of ``q`` when the group is one contiguous run, else None.
        out_src: [R] indices into the group's flattened [G*Nmax] results that are real rows.
        out_rows: [R] rows of the output they go to (None when identical to ``q_slice``).
        slots: [G, Smax] pool slots per sequence (padding reads slot 0, masked out).
        q_pos: [G, Nmax] absolute position of each query (padding: the last real position).
        kv_len: [G, 1] real KV length of each sequence.
        num_q: Nmax; num_kv: Smax.
        mask: [G, 1, Nmax, Smax] visibility, or None (built per query chunk).
    """

    seq_ids: list[int]
    q_rows: torch.Tensor | None
    q_slice: tuple[int, int] | None
    out_src: torch.Tensor | None
    out_rows: torch.Tensor | None
    slots: torch.Tensor
    q_pos: torch.Tensor
    kv_len: torch.Tensor
    num_q: int
    num_kv: int
    mask: torch.Tensor | None


class TorchAttentionBackend(AttentionBackend):
    """Batched paged attention over the KV pool.

    Args:
        sliding_window: if set, a token at absolute position p sees only positions
            (p - sliding_window, p] (Mistral's window, as transformers applies it).
        score_budget_bytes: most bytes of scores one attention call materialises; long query
            runs are split into chunks to stay within it.
    """

    def __init__(
        self,
        sliding_window: int | None = None,
        score_budget_bytes: int = DEFAULT_SCORE_BUDGET_BYTES,
    ):
        self.sliding_window = sliding_window
        self.score_budget_bytes = score_budget_bytes
        self._prepared_for: ForwardBatch | None = None
        self._groups: list[_Group] = []

    def prepare(self, batch: ForwardBatch) -> None:
        """Group the sequences and build their gather indices and masks, once per forward."""
        self._prepared_for = batch
        ext = np.asarray(batch.extend_lens_cpu, dtype=np.int64)
        lens = np.asarray(batch.seq_lens_cpu, dtype=np.int64)
        qo = np.zeros(len(ext) + 1, dtype=np.int64)
        np.cumsum(ext, out=qo[1:])
        kv = np.zeros(len(lens) + 1, dtype=np.int64)
        np.cumsum(lens, out=kv[1:])
        device = batch.kv_indices.device
        self._groups = [
            self._build_group(ids, ext, lens, qo, kv, batch, device)
            for ids in _group_sequences(ext, lens)
        ]

    def _build_group(
        self,
        ids: list[int],
        ext: np.ndarray,
        lens: np.ndarray,
        qo: np.ndarray,
        kv: np.ndarray,
        batch: ForwardBatch,
        device: torch.device,
    ) -> _Group:
        g_ext, g_len = ext[ids], lens[ids]
        num_q, num_kv = int(g_ext.max()), int(g_len.max())
        count = len(ids)
        # Slot gather: row b reads kv_indices[kv[b] : kv[b] + len_b], padded with slot 0.
        key_idx = np.arange(num_kv, dtype=np.int64)[None, :]
        valid_k = key_idx < g_len[:, None]
        flat = np.where(valid_k, kv[ids][:, None] + key_idx, 0)
        kv_indices = batch.kv_indices
        slots = kv_indices[torch.from_numpy(flat).to(device)]
        slots = torch.where(torch.from_numpy(valid_k).to(device), slots, 0)
        # Queries: row j of sequence b is at position len_b - ext_b + j; padded rows repeat the
        # last real query (so they see every key of the sequence and never produce NaN).
        q_idx = np.arange(num_q, dtype=np.int64)[None, :]
        valid_q = q_idx < g_ext[:, None]
        within = np.minimum(q_idx, g_ext[:, None] - 1)
        q_pos = g_len[:, None] - g_ext[:, None] + within
        rows = qo[ids][:, None] + within
        contiguous = count == 1 or (num_q == 1 and ids == list(range(ids[0], ids[-1] + 1)))
        if contiguous:
            start = int(qo[ids[0]])
            q_rows = out_src = out_rows = None
            q_slice = (start, start + int(g_ext.sum()))
        else:
            q_slice = None
            q_rows = torch.from_numpy(rows.reshape(-1)).to(device)
            src = np.flatnonzero(valid_q.reshape(-1))
            out_src = torch.from_numpy(src).to(device)
            out_rows = torch.from_numpy(rows.reshape(-1)[src]).to(device)
        group = _Group(
            seq_ids=ids,
            q_rows=q_rows,
            q_slice=q_slice,
            out_src=out_src,
            out_rows=out_rows,
            slots=slots,
            q_pos=torch.from_numpy(q_pos).to(device),
            kv_len=torch.from_numpy(g_len[:, None].copy()).to(device),
            num_q=num_q,
            num_kv=num_kv,
            mask=None,
        )
        if count * num_q * num_kv <= MAX_CACHED_MASK_ELEMS:
            group.mask = self._mask(group, 0, num_q)
        return group

    def _mask(self, group: _Group, start: int, end: int) -> torch.Tensor:
        """[G, 1, end - start, Smax] True where query row (start..end) may see key s."""
        key_pos = torch.arange(group.num_kv, device=group.slots.device)[None, None, :]
        q_pos = group.q_pos[:, start:end, None]
        visible = (key_pos <= q_pos) & (key_pos < group.kv_len[:, :, None])
        if self.sliding_window is not None:
            visible &= key_pos > q_pos - self.sliding_window
        return visible.unsqueeze(1)

    def store_kv(
        self, k: torch.Tensor, v: torch.Tensor, layer_id: int, loc: torch.Tensor, pool: KVPool
    ) -> None:
        """Write K/V rows [T, kv_heads, head_dim] into pool slots ``loc`` [T]."""
        pool.store(layer_id, loc, k, v)

    def extend(
        self, q: torch.Tensor, layer_id: int, batch: ForwardBatch, pool: KVPool, scale: float
    ) -> torch.Tensor:
        """Each sequence's new tokens attend causally to its prefix and to themselves."""
        return self._attend_all(q, layer_id, batch, pool, scale)

    def decode(
        self, q: torch.Tensor, layer_id: int, batch: ForwardBatch, pool: KVPool, scale: float
    ) -> torch.Tensor:
        """One new token per sequence attends to the whole sequence."""
        return self._attend_all(q, layer_id, batch, pool, scale)

    def _attend_all(
        self, q: torch.Tensor, layer_id: int, batch: ForwardBatch, pool: KVPool, scale: float
    ) -> torch.Tensor:
        if self._prepared_for is not batch:
            self.prepare(batch)
        kv = (pool.k(layer_id), pool.v(layer_id), *pool.scales(layer_id))
        if len(self._groups) == 1 and self._groups[0].q_slice == (0, q.shape[0]):
            return self._attend_group(self._groups[0], q, kv, scale).to(q.dtype)
        out = torch.empty_like(q)
        for group in self._groups:
            res = self._attend_group(group, q, kv, scale)
            if group.q_slice is not None:
                out[group.q_slice[0] : group.q_slice[1]] = res
            else:
                out.index_copy_(0, group.out_rows, res.to(q.dtype))
        return out

    def _attend_group(
        self,
        group: _Group,
        q: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor, float, float],
        scale: float,
    ) -> torch.Tensor:
        """The group's real query rows [R, H, D] (float32), in q_slice or out_rows order.
        ``kv``: the layer's K and V buffers and their scales (FP8 pools: see kvcache.pool)."""
        count, num_q, num_kv = len(group.seq_ids), group.num_q, group.num_kv
        num_heads, head_dim = q.shape[1], q.shape[2]
        if group.q_slice is not None:
            qg = q[group.q_slice[0] : group.q_slice[1]]
        else:
            qg = q.index_select(0, group.q_rows)
        # [G, H, Nmax, D]: a contiguous single sequence is [1, n]; a decode run is [B, 1].
        qg = qg.float().view(count, num_q, num_heads, head_dim).transpose(1, 2)
        k_buf, v_buf, k_scale, v_scale = kv
        k = read_float(k_buf[group.slots], k_scale).transpose(1, 2)  # [G, KH, Smax, D]
        v = read_float(v_buf[group.slots], v_scale).transpose(1, 2)
        gqa = k.shape[1] != num_heads
        per_row = count * num_heads * num_kv * BYTES_PER_SCORE
        chunk = max(1, self.score_budget_bytes // per_row)
        if chunk >= num_q:
            mask = group.mask if group.mask is not None else self._mask(group, 0, num_q)
            res = F.scaled_dot_product_attention(qg, k, v, mask, scale=scale, enable_gqa=gqa)
        else:
            res = torch.empty_like(qg)
            for start in range(0, num_q, chunk):
                end = min(start + chunk, num_q)
                mask = (
                    group.mask[:, :, start:end]
                    if group.mask is not None
                    else self._mask(group, start, end)
                )
                res[:, :, start:end] = F.scaled_dot_product_attention(
                    qg[:, :, start:end], k, v, mask, scale=scale, enable_gqa=gqa
                )
        res = res.transpose(1, 2).reshape(count * num_q, num_heads, head_dim)
        if group.out_src is not None:
            res = res.index_select(0, group.out_src)
        return res


def _group_sequences(ext: np.ndarray, lens: np.ndarray) -> list[list[int]]:
    """Split the batch into groups whose padded work stays close to their real work.

    Each group is padded to its longest query run and its longest KV run. A batch whose
    sequences are alike (every decode batch of similar lengths) stays one group in batch order;
    otherwise sequences are taken in order of their work and a group closes when adding the
    next one would pad it beyond ``PAD_WASTE_FACTOR``.
    """
    if len(ext) == 0:
        return []
    work = ext * lens
    if _padded_ok(ext, lens, int(work.sum())):
        return [list(range(len(ext)))]
    groups: list[list[int]] = []
    current: list[int] = []
    real = max_q = max_kv = 0
    for i in np.argsort(work, kind="stable").tolist():
        q_i, kv_i = int(ext[i]), int(lens[i])
        new_q, new_kv = max(max_q, q_i), max(max_kv, kv_i)
        padded = (len(current) + 1) * new_q * new_kv
        if current and padded > PAD_WASTE_FACTOR * (real + q_i * kv_i) + PAD_WASTE_SLACK:
            groups.append(sorted(current))
            current, real, new_q, new_kv = [], 0, q_i, kv_i
        current.append(i)
        real += q_i * kv_i
        max_q, max_kv = new_q, new_kv
    groups.append(sorted(current))
    return groups


def _padded_ok(ext: np.ndarray, lens: np.ndarray, real: int) -> bool:
    padded = len(ext) * int(ext.max()) * int(lens.max())
    return padded <= PAD_WASTE_FACTOR * real + PAD_WASTE_SLACK
