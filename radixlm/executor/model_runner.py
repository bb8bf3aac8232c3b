"""The model runner: ScheduledBatch in, StepResult out (forward, mask, sample, logprobs)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from radixlm.batch import ForwardBatch, ScheduledBatch, ScheduledSeq
from radixlm.config import CacheConfig, ModelConfig
from radixlm.constrained.bitmask import apply_token_bitmask
from radixlm.executor.cuda_graph import DecodeGraphRunner
from radixlm.executor.logits import LogitsLayout, gather_input_logprobs
from radixlm.kvcache.pool import KVPool
from radixlm.model.attention import TritonAttentionBackend, create_attention_backend
from radixlm.model.loader import load_model, resolve_device
from radixlm.outputs import SeqStepResult, StepResult
from radixlm.sampling.penalty_cache import PenaltyCache
from radixlm.sampling.sampler import SamplingBatch, sample

# Pool size on CPU when none is given: plenty for tests and the demo, small in host memory.
DEFAULT_CPU_KV_TOKENS = 65536


@dataclass(frozen=True)
class RunnerInfo:
    """What the scheduler needs to know about the runner, fixed at start-up."""

    device: str
    dtype: str
    vocab_size: int
    context_length: int
    kv_capacity_tokens: int
    page_size: int


class ModelRunner:
    """Owns the model, the KV pool and the attention backend.

    Args:
        model_path: local Hugging Face model directory.
        model_config: dtype, device, attention backend, context length.
        cache_config: page size and pool sizing.
        eos_token_ids: tokens that ``min_new_tokens`` keeps from being sampled early.
    """

    def __init__(
        self,
        model_path: str,
        model_config: ModelConfig,
        cache_config: CacheConfig,
        eos_token_ids: frozenset[int] = frozenset(),
        progress: bool = True,
    ):
        self.device = resolve_device(model_config.device)
        self.model = load_model(model_path, model_config.dtype, self.device, progress=progress)
        arch = self.model.arch
        self.dtype = next(self.model.parameters()).dtype
        self.vocab_size = arch.vocab_size
        self.context_length = model_config.context_length or arch.max_position_embeddings
        self.eos_token_ids = eos_token_ids
        self.pool = self._make_pool(cache_config)
        self.attn = create_attention_backend(model_config.attention_backend, self.device,
                                             sliding_window=arch.sliding_window)
        cascade = (model_config.cascade_attention and arch.sliding_window is None
                   and isinstance(self.attn, TritonAttentionBackend))
        self.cascade_min_shared = model_config.cascade_min_shared if cascade else None
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(model_config.random_seed)
        self.graphs: DecodeGraphRunner | None = None
        # Penalty counts stay on the device; each step sends only the newest tokens.
        self.penalty_cache = PenaltyCache(self.vocab_size, self.device)

    def capture_cuda_graphs(self, max_batch_size: int) -> None:
        """Capture decode graphs up to ``max_batch_size`` (CUDA with the Triton backend only)."""
        if self.device.type != "cuda" or not isinstance(self.attn, TritonAttentionBackend):
            return
        self.graphs = DecodeGraphRunner(self.model, self.pool, self.attn, max_batch_size,
                                        self.context_length)
        self.graphs.capture()

    def _make_pool(self, cache: CacheConfig) -> KVPool:
        arch = self.model.arch
        tokens = cache.kv_cache_tokens or self._default_kv_tokens(cache)
        num_pages = max(-(-tokens // cache.page_size), 1)
        return KVPool(arch.num_layers, arch.num_kv_heads, arch.head_dim, num_pages,
                      cache.page_size, self.dtype, self.device)

    def _default_kv_tokens(self, cache: CacheConfig) -> int:
        if self.device.type != "cuda":
            return DEFAULT_CPU_KV_TOKENS
        arch = self.model.arch
        free, _ = torch.cuda.mem_get_info(self.device)
        per_token = KVPool.bytes_per_token(arch.num_layers, arch.num_kv_heads, arch.head_dim,
                                           self.dtype)
        return int(free * cache.mem_fraction) // per_token

    @property
    def info(self) -> RunnerInfo:
        return RunnerInfo(
            device=str(self.device), dtype=str(self.dtype).removeprefix("torch."),
            vocab_size=self.vocab_size, context_length=self.context_length,
            kv_capacity_tokens=self.pool.capacity_tokens, page_size=self.pool.page_size)

    @torch.inference_mode()
    def forward(self, batch: ScheduledBatch) -> StepResult:
        """Run one step: the model over the batch, then sampling and logprobs.

        Returns:
            One SeqStepResult per row of ``batch``.
        """
        start = time.perf_counter()
        layout = LogitsLayout.of(batch.seqs)
        fb = ForwardBatch.build(
            [s.new_tokens for s in batch.seqs], [s.slots for s in batch.seqs],
            logits_rows=layout.rows_per_seq, mode=batch.mode, device=self.device,
            prefix_min_shared=self.cascade_min_shared)
        if self.graphs is not None and self.graphs.can_run(fb):
            logits = self.graphs.run(fb)
        else:
            logits = self.model(fb, self.pool, self.attn)
        results = [SeqStepResult() for _ in batch.seqs]
        self._sample(batch, logits, layout, results)
        gather_input_logprobs(batch.seqs, logits, layout, results)
        return StepResult(results, forward_seconds=time.perf_counter() - start)

    def _sample(self, batch: ScheduledBatch, logits: torch.Tensor, layout: LogitsLayout,
                results: list[SeqStepResult]) -> None:
        rows = [i for i, s in enumerate(batch.seqs) if s.sample]
        if not rows:
            return
        seqs = [batch.seqs[i] for i in rows]
        picked = logits[torch.tensor([layout.last_row[i] for i in rows], device=logits.device)]
        if batch.bitmask is not None:
            mask_rows = [batch.seqs[i].bitmask_row for i in rows]
            self._apply_bitmask(picked, batch.bitmask, mask_rows)
        sbatch = SamplingBatch.build(
            params=[s.params for s in seqs], output_token_ids=[s.output_ids for s in seqs],
            prompt_token_ids=[s.prompt_ids for s in seqs], vocab_size=picked.shape[-1],
            device=self.device, eos_token_ids=self.eos_token_ids, generator=self.generator,
            request_ids=[s.rid for s in seqs], penalty_cache=self.penalty_cache)
        top_k = max((s.top_logprobs_num for s in seqs), default=0)
        want_logprob = any(s.return_logprob for s in seqs)
        out = sample(picked, sbatch, top_logprobs_num=top_k, return_logprob=want_logprob)
        self._store_samples(seqs, [results[i] for i in rows], out)

    def _apply_bitmask(self, logits: torch.Tensor, bitmask: torch.Tensor,
                       mask_rows: list[int | None]) -> None:
        rows = torch.tensor([-1 if r is None else r for r in mask_rows], dtype=torch.int32)
        apply_token_bitmask(logits, bitmask.to(logits.device, non_blocking=True),
                            rows.to(logits.device, non_blocking=True))

    @staticmethod
    def _store_samples(seqs: list[ScheduledSeq], results: list[SeqStepResult], out) -> None:
        host = out.to_host()
        for j, (seq, res) in enumerate(zip(seqs, results)):
            res.next_token_id = host.next_token_ids[j]
            res.logprob = host.logprobs[j] if host.logprobs is not None else None
            if seq.top_logprobs_num and host.top_logprob_ids is not None:
                k = seq.top_logprobs_num
                res.top_logprobs = list(zip(host.top_logprob_values[j][:k],
                                            host.top_logprob_ids[j][:k]))
