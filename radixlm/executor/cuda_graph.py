"""Decode steps replayed from CUDA graphs, one graph per padded batch-size bucket.

A decode step launches hundreds of small kernels; at small batch the GPU would wait on Python
between them. Capturing the whole forward once per bucket and replaying it removes that gap.
Inputs are copied into static buffers; padded rows write their K/V into the pool's scratch
slot and attend to it alone, so they never touch a live sequence.
"""

from __future__ import annotations

import bisect

import torch

from radixlm.batch import ForwardBatch, ForwardMode

DEFAULT_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 448, 512)


class DecodeGraphRunner:
    """Captures and replays the model's decode forward.

    Args:
        model: the CausalLM.
        pool: its KV pool.
        attn: the attention backend (must not sync with the host per layer).
        max_batch_size: largest bucket captured.
        buckets: candidate bucket sizes.
    """

    def __init__(self, model, pool, attn, max_batch_size: int, context_length: int,
                 buckets: tuple[int, ...] = DEFAULT_BUCKETS):
        self.model, self.pool, self.attn = model, pool, attn
        self.device = pool.device
        self.buckets = [b for b in buckets if b <= max_batch_size] or [1]
        self.max_bs = self.buckets[-1]
        # Shared prefixes appear once per sequence in kv_indices, so a decode batch can list
        # more slots than the pool holds: size for the longest possible batch.
        self.max_kv = self.max_bs * context_length + self.max_bs
        self._make_buffers()
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool_handle = None

    def _make_buffers(self) -> None:
        n, dev = self.max_bs, self.device
        long = dict(dtype=torch.int64, device=dev)
        self.input_ids = torch.zeros(n, **long)
        self.positions = torch.zeros(n, **long)
        self.out_cache_loc = torch.full((n,), self.pool.scratch_slot, **long)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.extend_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.qo_indptr = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.kv_indptr = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.kv_indices = torch.full((self.max_kv,), self.pool.scratch_slot, **long)
        self.logits_indices = torch.arange(n, **long)

    def can_run(self, batch: ForwardBatch) -> bool:
        return (batch.mode is ForwardMode.DECODE and batch.batch_size <= self.max_bs
                and batch.kv_indices.shape[0] + self.max_bs <= self.max_kv)

    def _view(self, bs: int, seq_lens_cpu: list[int]) -> ForwardBatch:
        return ForwardBatch(
            mode=ForwardMode.DECODE, input_ids=self.input_ids[:bs],
            positions=self.positions[:bs], out_cache_loc=self.out_cache_loc[:bs],
            seq_lens=self.seq_lens[:bs], extend_lens=self.extend_lens[:bs],
            qo_indptr=self.qo_indptr[: bs + 1], kv_indptr=self.kv_indptr[: bs + 1],
            kv_indices=self.kv_indices, logits_indices=self.logits_indices[:bs],
            seq_lens_cpu=seq_lens_cpu, extend_lens_cpu=[1] * bs)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket (largest first, so smaller ones reuse its memory pool)."""
        for bs in reversed(self.buckets):
            self._reset_padding(bs, 0)
            batch = self._view(bs, [1] * bs)
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up: Triton compiles and autotunes outside capture
                    self.model(batch, self.pool, self.attn)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool_handle):
                self.outputs[bs] = self.model(batch, self.pool, self.attn)
            self.pool_handle = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize(self.device)

    def _reset_padding(self, start: int, kv_start: int) -> None:
        """Rows from ``start`` on attend to one scratch slot and write only there."""
        n = self.max_bs
        self.input_ids[start:] = 0
        self.positions[start:] = 0
        self.out_cache_loc[start:] = self.pool.scratch_slot
        self.seq_lens[start:] = 1
        self.kv_indptr[start + 1 :] = kv_start + torch.arange(
            1, n - start + 1, dtype=torch.int32, device=self.device)
        self.kv_indices[kv_start : kv_start + n - start] = self.pool.scratch_slot

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """Replay the bucket's graph for ``batch``; returns logits for its rows."""
        bs = batch.batch_size
        bucket = self.buckets[bisect.bisect_left(self.buckets, bs)]
        total = batch.kv_indices.shape[0]
        self.input_ids[:bs].copy_(batch.input_ids, non_blocking=True)
        self.positions[:bs].copy_(batch.positions, non_blocking=True)
        self.out_cache_loc[:bs].copy_(batch.out_cache_loc, non_blocking=True)
        self.seq_lens[:bs].copy_(batch.seq_lens, non_blocking=True)
        self.kv_indptr[: bs + 1].copy_(batch.kv_indptr, non_blocking=True)
        self.kv_indices[:total].copy_(batch.kv_indices, non_blocking=True)
        if bucket > bs:
            self._reset_padding(bs, total)
        self.graphs[bucket].replay()
        logits = self.outputs[bucket][:bs]
        if batch.logits_indices.shape[0] != bs:
            # Rows of a jump-forward sequence (one per spliced token) want only the last logits.
            logits = logits.index_select(0, batch.logits_indices)
        return logits
