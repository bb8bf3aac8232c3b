"""The model runner: ScheduledBatch in, StepResult out (forward, mask, sample, logprobs)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial

import torch

from radixlm.batch import ForwardBatch, ScheduledBatch, ScheduledSeq
from radixlm.config import CacheConfig, ModelConfig
from radixlm.constrained.bitmask import apply_token_bitmask
from radixlm.executor.cuda_graph import DecodeGraphRunner
from radixlm.executor.logits import (
    InputLogprobs,
    LogitsLayout,
    input_logprobs_on_device,
    store_input_logprobs,
)
from radixlm.executor.memory import cpu_kv_tokens
from radixlm.executor.pending import HostMaskBuffers, HostTransfer, LaunchedStep, PendingStep
from radixlm.kvcache.pool import FP8_KV_DTYPE, KVPool, resolve_kv_dtype
from radixlm.model.attention import TritonAttentionBackend, create_attention_backend
from radixlm.model.loader import load_model, resolve_device
from radixlm.model.parallel import TensorParallel
from radixlm.outputs import SeqStepResult, StepResult
from radixlm.sampling.penalty_cache import PenaltyCache
from radixlm.sampling.sampler import SampleOutput, SamplingBatch, sample
from radixlm.transfer import int_tensor, to_device


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
        tp: this rank's tensor-parallel group (a worker of
            :mod:`radixlm.executor.tp_worker`): the model and the KV pool hold the rank's heads,
            and the ranks agree on one pool capacity. None: the whole model on one device.
    """

    def __init__(
        self,
        model_path: str,
        model_config: ModelConfig,
        cache_config: CacheConfig,
        eos_token_ids: frozenset[int] = frozenset(),
        progress: bool = True,
        tp: TensorParallel | None = None,
    ):
        self.device = resolve_device(model_config.device)
        self.tp = tp
        self.model = load_model(model_path, model_config.dtype, self.device, progress=progress,
                                tp=tp, quantization=model_config.quantization,
                                load_format=model_config.load_format)
        arch = self.model.arch
        self.dtype = self.model.lm_head.weight.dtype  # FP8 projections excepted, the model dtype
        self.kv_dtype = resolve_kv_dtype(cache_config.kv_cache_dtype, self.dtype)
        self.vocab_size = arch.vocab_size
        self.context_length = model_config.context_length or arch.max_position_embeddings
        self.eos_token_ids = eos_token_ids
        self.pool = self._make_pool(cache_config)
        self.attn = create_attention_backend(model_config.attention_backend, self.device,
                                             sliding_window=arch.sliding_window)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(model_config.random_seed)
        self.graphs: DecodeGraphRunner | None = None
        # Penalty counts stay on the device; each step sends only the newest tokens.
        self.penalty_cache = PenaltyCache(self.vocab_size, self.device)
        self._mask_buffers = HostMaskBuffers(pinned=self.device.type == "cuda")

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
        if self.tp is not None:  # one scheduler indexes every rank's pool with the same slots
            tokens = self.tp.min_int(tokens)
        num_pages = max(-(-tokens // cache.page_size), 1)
        kv_heads = self.model.layout.num_kv_heads
        return KVPool(arch.num_layers, kv_heads, arch.head_dim, num_pages,
                      cache.page_size, self.kv_dtype, self.device,
                      kv_scales=self.model.kv_scales if self.kv_dtype == FP8_KV_DTYPE else None)

    def _default_kv_tokens(self, cache: CacheConfig) -> int:
        arch = self.model.arch
        per_token = KVPool.bytes_per_token(arch.num_layers, self.model.layout.num_kv_heads,
                                           arch.head_dim, self.kv_dtype)
        if self.device.type != "cuda":
            return cpu_kv_tokens(per_token)
        free, _ = torch.cuda.mem_get_info(self.device)
        return int(free * cache.mem_fraction) // per_token

    @property
    def info(self) -> RunnerInfo:
        return RunnerInfo(
            device=str(self.device), dtype=str(self.dtype).removeprefix("torch."),
            vocab_size=self.vocab_size, context_length=self.context_length,
            kv_capacity_tokens=self.pool.capacity_tokens, page_size=self.pool.page_size)

    @property
    def rank_infos(self) -> list[RunnerInfo]:
        """One entry per tensor-parallel rank (here: just this runner)."""
        return [self.info]

    def close(self) -> None:
        """Nothing to stop: the model runs in this process (a TP runner stops its workers)."""

    def forward(self, batch: ScheduledBatch) -> StepResult:
        """Run one step and wait for it (``launch(batch).result()``).

        Returns:
            One SeqStepResult per row of ``batch``.
        """
        return self.launch(batch).result()

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, futures: PendingStep | None = None) -> PendingStep:
        """Enqueue one step: the model over the batch, then (maybe later) mask, sampling, logprobs.

        Nothing here waits for the device: inputs go up from pinned memory, placeholders are
        resolved on the device, and the sampled ids and logprobs start their way to pinned host
        memory behind an event that ``result()`` waits on. Everything that reads the logits
        buffer (which a CUDA graph's next replay overwrites) is enqueued here: the sampling
        rows are gathered into a tensor of their own, so a batch with constrained rows can
        queue its sampling later, in ``commit_mask()``, once the host has filled the step's
        bitmask while the device ran the forward pass.

        Args:
            batch: the scheduled rows.
            futures: the step still in flight whose sampled ids the batch's placeholders
                (:func:`radixlm.batch.future_token`) point into; needed iff it has any.

        Returns:
            The pending step; its ``token_ids`` feed the next step's placeholders.
        """
        started = time.perf_counter()
        layout = LogitsLayout.of(batch.seqs)
        fb = ForwardBatch.build(
            [s.new_tokens for s in batch.seqs], [s.slots for s in batch.seqs],
            logits_rows=layout.rows_per_seq, mode=batch.mode, device=self.device)
        if batch.has_future_tokens:
            if futures is None:
                raise ValueError("the batch has placeholder tokens but no step in flight")
            fb.input_ids = resolve_future_tokens(fb.input_ids, futures.token_ids)
        if self.graphs is not None and self.graphs.can_run(fb):
            logits = self.graphs.run(fb)
        else:
            logits = self.model(fb, self.pool, self.attn)
        rows = [i for i, s in enumerate(batch.seqs) if s.sample]
        inputs = input_logprobs_on_device(batch.seqs, logits, layout)
        prepared = self._prepare_sampling(batch, logits, layout, rows)
        bitmask = None
        if batch.num_mask_rows and prepared is not None:
            bitmask = self._mask_buffers.take(batch.num_mask_rows, -(-self.vocab_size // 32))
        sample = partial(self._sample_and_copy, batch, rows, prepared, inputs)
        build = partial(_build_result, batch.seqs, rows, inputs)
        return LaunchedStep(sample, build, started, bitmask)

    def _prepare_sampling(self, batch: ScheduledBatch, logits: torch.Tensor,
                          layout: LogitsLayout, rows: list[int]
                          ) -> tuple[torch.Tensor, SamplingBatch] | None:
        """The sampling rows' logits (a copy) and their sampling parameters, built at launch:
        ``output_ids`` are read before the step in flight appends its token to them."""
        if not rows:
            return None
        seqs = [batch.seqs[i] for i in rows]
        picked = logits[int_tensor([layout.last_row[i] for i in rows], logits.device)]
        sbatch = SamplingBatch.build(
            params=[s.params for s in seqs], output_token_ids=[s.output_ids for s in seqs],
            prompt_token_ids=[s.prompt_ids for s in seqs],
            steps=[s.sample_step for s in seqs], vocab_size=picked.shape[-1],
            device=self.device, eos_token_ids=self.eos_token_ids, generator=self.generator,
            request_ids=[s.rid for s in seqs], penalty_cache=self.penalty_cache)
        return picked, sbatch

    @torch.inference_mode()
    def _sample_and_copy(self, batch: ScheduledBatch, rows: list[int],
                         prepared: tuple[torch.Tensor, SamplingBatch] | None,
                         inputs: list[InputLogprobs], bitmask: torch.Tensor | None
                         ) -> tuple[torch.Tensor, HostTransfer]:
        sampled = None
        if prepared is not None:
            picked, sbatch = prepared
            if bitmask is not None:
                mask_rows = [batch.seqs[i].bitmask_row for i in rows]
                self._apply_bitmask(picked, bitmask, mask_rows)
            seqs = [batch.seqs[i] for i in rows]
            top_k = max((s.top_logprobs_num for s in seqs), default=0)
            want_logprob = any(s.return_logprob for s in seqs)
            sampled = sample(picked, sbatch, top_logprobs_num=top_k, return_logprob=want_logprob)
        token_ids = self._row_token_ids(len(batch.seqs), rows, sampled)
        tensors = [token_ids, sampled.logprobs, sampled.top_logprob_ids,
                   sampled.top_logprob_values] if sampled is not None else [token_ids] + [None] * 3
        for item in inputs:
            tensors.extend([item.values, item.top_values, item.top_ids])
        return token_ids, HostTransfer(tensors)

    def _row_token_ids(self, num_rows: int, rows: list[int],
                       sampled: SampleOutput | None) -> torch.Tensor:
        """[num_rows] sampled id per batch row (0 where a row does not sample), on the device."""
        if sampled is not None and len(rows) == num_rows:
            return sampled.next_token_ids
        token_ids = torch.zeros(num_rows, dtype=torch.int64, device=self.device)
        if sampled is not None:
            token_ids.index_copy_(0, int_tensor(rows, self.device), sampled.next_token_ids)
        return token_ids

    def _apply_bitmask(self, logits: torch.Tensor, bitmask: torch.Tensor,
                       mask_rows: list[int | None]) -> None:
        rows = torch.tensor([-1 if r is None else r for r in mask_rows], dtype=torch.int32)
        # the host buffer is pinned on CUDA already: a non-blocking upload, no extra copy
        mask = bitmask.to(logits.device, non_blocking=True)
        apply_token_bitmask(logits, mask, to_device(rows, logits.device))


def resolve_future_tokens(input_ids: torch.Tensor, sampled: torch.Tensor) -> torch.Tensor:
    """Replace each placeholder ``-(row + 1)`` in ``input_ids`` by ``sampled[row]``, on the device.

    Args:
        input_ids: [T] int64 token ids, some of them placeholders.
        sampled: [B] int64 sampled ids of the step in flight, one per row of its batch.

    Returns:
        [T] int64 real token ids (no host synchronisation: a gather and a select).
    """
    rows = (-input_ids - 1).clamp_(min=0)
    return torch.where(input_ids < 0, sampled[rows], input_ids)


def _build_result(seqs: list[ScheduledSeq], rows: list[int], inputs: list[InputLogprobs],
                  host: list[list | None]) -> StepResult:
    """The StepResult from the host copies made by ``ModelRunner.launch`` (in its order)."""
    token_ids, logprobs, top_ids, top_values = host[:4]
    results = [SeqStepResult() for _ in seqs]
    for j, i in enumerate(rows):
        res, seq = results[i], seqs[i]
        res.next_token_id = token_ids[i]
        res.logprob = logprobs[j] if logprobs is not None else None
        if seq.top_logprobs_num and top_ids is not None:
            k = seq.top_logprobs_num
            res.top_logprobs = list(zip(top_values[j][:k], top_ids[j][:k]))
    store_input_logprobs(inputs, host[4:], results)
    return StepResult(results)
