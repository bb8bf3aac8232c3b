"""The HF transformers baseline: ``generate`` on the same weights and the same token ids.

Two variants, as the issue compares them:
- ``default``: ``generate`` with its default dynamic KV cache, eager PyTorch;
- ``static-compile``: ``cache_implementation="static"``, which on CUDA makes ``generate``
  compile the decoding forward with ``torch.compile`` (mode reduce-overhead: CUDA graphs).
  On CPU the static cache runs uncompiled (compiling there only slows a test down).

Every request generates exactly its output length (``min_new_tokens`` = ``max_new_tokens``, so
random weights cannot stop early on EOS). Prompts of different lengths in one batch are padded
on the left with an attention mask; outputs of different lengths are generated to the batch's
longest and only the requested tokens are counted.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from radixlm.bench.common import synchronize

HF_VARIANTS = ("default", "static-compile")


@dataclass
class HFTiming:
    """One HF ``generate`` measurement.

    Attributes:
        variant: ``default`` or ``static-compile``.
        batch: prompts per ``generate`` call.
        prefill_s: a ``generate`` of one new token (prompt processing plus one sample).
        total_s: the whole ``generate``.
        output_tokens: requested output tokens of the batch.
    """

    variant: str
    batch: int
    prefill_s: float
    total_s: float
    output_tokens: int

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.total_s

    def decode_step_s(self, output_len: int) -> float:
        """Mean time of the decode steps after the first token."""
        return (self.total_s - self.prefill_s) / max(output_len - 1, 1)


def load_hf_model(path: str | Path, dtype: torch.dtype, device: torch.device):
    """``AutoModelForCausalLM`` from the model directory, on ``device``, in eval mode."""
    from transformers import AutoModelForCausalLM

    kwargs = {"device_map": {"": str(device)}} if device.type == "cuda" else {}
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **kwargs)
    return model.to(device).eval()


def release(model) -> None:
    """Drop a model and give its GPU memory back before the next one loads."""
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _inputs(prompts: Sequence[Sequence[int]], device: torch.device, pad_id: int = 0):
    """Left-padded input ids and their attention mask."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def generate(model, prompts: Sequence[Sequence[int]], new_tokens: int, variant: str
             ) -> torch.Tensor:
    """One greedy ``generate`` of exactly ``new_tokens`` tokens per prompt.

    Returns:
        The generated ids, [batch, new_tokens].
    """
    if variant not in HF_VARIANTS:
        raise ValueError(f"unknown HF variant {variant!r}; use one of {HF_VARIANTS}")
    device = model.device
    ids, mask = _inputs(prompts, device)
    kwargs = {}
    if variant == "static-compile":
        kwargs["cache_implementation"] = "static"
        kwargs["disable_compile"] = device.type != "cuda"
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                         **kwargs)
    return out[:, ids.shape[1]:]


def _timed(model, prompts: Sequence[Sequence[int]], new_tokens: int, variant: str) -> float:
    synchronize(model.device)
    start = time.perf_counter()
    generate(model, prompts, new_tokens, variant)
    synchronize(model.device)
    return time.perf_counter() - start


def time_static_batch(model, prompts: Sequence[Sequence[int]], output_len: int, variant: str,
                      warmup: bool = True) -> HFTiming:
    """Time one batch: a warm-up ``generate`` of the same shape (it triggers compilation for
    ``static-compile``), a prefill-only ``generate`` and the full one.

    Args:
        model: from :func:`load_hf_model`.
        prompts: token ids per row.
        output_len: tokens to generate per row.
        variant: one of HF_VARIANTS.
        warmup: run the warm-up call first.

    Returns:
        The timing.
    """
    if warmup:
        generate(model, prompts, output_len if variant == "static-compile" else 2, variant)
    prefill = _timed(model, prompts, 1, variant)
    total = _timed(model, prompts, output_len, variant)
    return HFTiming(variant, len(prompts), prefill, total, len(prompts) * output_len)


def time_workload(model, requests: Sequence[tuple[Sequence[int], int]], batch_size: int,
                  variant: str) -> HFTiming:
    """Run every request in batches of ``batch_size`` (sorted by length so that batches pad
    little) after one warm-up batch; the time is the sum of the batches' ``generate`` calls.

    Args:
        model: from :func:`load_hf_model`.
        requests: (prompt ids, output length) pairs.
        batch_size: prompts per ``generate`` call.
        variant: one of HF_VARIANTS.

    Returns:
        The timing (``prefill_s`` is not measured here and is 0).
    """
    ordered = sorted(requests, key=lambda r: (r[1], len(r[0])))
    batches = [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]
    first = batches[0]
    generate(model, [p for p, _ in first], max(n for _, n in first), variant)
    total = 0.0
    for batch in batches:
        total += _timed(model, [p for p, _ in batch], max(n for _, n in batch), variant)
    return HFTiming(variant, batch_size, 0.0, total, sum(n for _, n in requests))
