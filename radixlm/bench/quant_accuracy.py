"""Accuracy of FP8 weights / an FP8 KV cache against the same model in its own dtype.

Both models are loaded from the same checkpoint, one after the other (only one is in memory at
a time). For each of N prompts:

1. Greedy decoding of ``--output-len`` tokens by each model (prompts batched; prefill, then
   decode steps through the same attention backend and KV pool kinds the engine uses). The
   agreement is the share of positions ``i < output-len`` where both picked the same token; the
   common prefix is how many tokens agree before the first difference.
2. Teacher forcing on the reference's continuation: both models score prompt + reference tokens
   in one extend pass, and at every generated position the KL divergence
   KL(reference || candidate) of the next-token distributions is taken (float64), then averaged;
   the share of positions where both distributions have the same top token is reported too
   (free-running agreement compounds: one flipped near-tie changes every later token).

Prompts: for a model with a chat template, 20 fixed instructions rendered with it (more are
cycled); otherwise (random models) random token ids. On CPU the FP8 GEMMs run the reference path,
which rounds activations and weights exactly as the GPU's ``_scaled_mm`` path does.

The reference runs in ``--reference-dtype`` (default: ``--dtype``) without quantization; the
candidate in ``--dtype`` with ``--quantization`` (default fp8) and ``--kv-cache-dtype``. Two
unquantized dtypes measure the model's own rounding noise, the floor any FP8 figure is read
against: ``--reference-dtype float32 --dtype bfloat16 --quantization none``.

``--weight-only`` keeps every FP8 layer's activation exact at every row count (W8A16 in prefill
and in the teacher-forced pass too, not only in decode steps of <= ``--triton-max-m`` rows). It
runs on the CPU reference path only: the GPU has no W8A16 kernel for more than 64 rows, so it
measures what such a kernel would deliver.

Usage: radixlm bench quant-accuracy --model /path/to/model [--quantization fp8]
       [--kv-cache-dtype fp8_e4m3] [--reference-dtype float32] [--weight-only]
       [--num-prompts 20] [--output-len 32] [--out acc.json]
"""

from __future__ import annotations

import argparse
import gc
import math
import random
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from radixlm.batch import ForwardBatch, ForwardMode
from radixlm.bench.common import (
    add_model_args,
    measure_ceilings,
    resolve_model_dir,
    run_header,
    write_json,
)
from radixlm.kvcache.pool import FP8_KV_DTYPE, KVPool, resolve_kv_dtype
from radixlm.model.attention import create_attention_backend
from radixlm.model.layers.fp8 import Fp8Linear, Fp8LinearConfig, fp8_gemm_supported
from radixlm.model.loader import load_model, resolve_device

INSTRUCTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in two sentences.",
    "List three prime numbers greater than 50.",
    "Translate 'good morning' into Spanish.",
    "What does a CPU do?",
    "Give me a tip for learning to cook.",
    "Why is the sky blue?",
    "Summarise the plot of Romeo and Juliet.",
    "How many legs does a spider have?",
    "Suggest a name for a pet turtle.",
    "What is 17 times 23?",
    "Describe a rainy day in one paragraph.",
    "What is the boiling point of water at sea level?",
    "Name a famous painting by Leonardo da Vinci.",
    "How do vaccines work?",
    "Write a short apology for being late.",
    "What are the primary colours?",
    "Explain what a linked list is.",
    "Give two reasons to drink water.",
]


@dataclass
class Run:
    """One model's greedy tokens and teacher-forced log-probabilities."""

    tokens: list[list[int]]
    logprobs: list[torch.Tensor]  # per prompt [output_len, vocab] float32 on the CPU


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="radixlm bench quant-accuracy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(parser)
    parser.add_argument("--num-prompts", type=int, default=20)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument(
        "--random-prompt-len",
        type=int,
        default=64,
        help="prompt length when the model has no chat template",
    )
    parser.add_argument(
        "--triton-max-m",
        type=int,
        default=None,
        help="FP8 layers: most rows that take the W8A16 path (Triton on GPU, emulated on CPU; "
        "<= 64); default Fp8LinearConfig's",
    )
    parser.add_argument(
        "--weight-only",
        action="store_true",
        help="FP8 layers keep the activation exact at every row count (W8A16 throughout; CPU "
        "reference path only)",
    )
    parser.add_argument(
        "--reference-dtype",
        default=None,
        help="the unquantized reference's dtype (default: --dtype); e.g. float32 against "
        "--dtype bfloat16 --quantization none measures bf16's own rounding noise",
    )
    args = parser.parse_args(argv)
    if args.weight_only and args.triton_max_m is not None:
        parser.error("--weight-only and --triton-max-m are exclusive")
    return args


def fp8_linear_config(args: argparse.Namespace, device: torch.device) -> Fp8LinearConfig | None:
    """The FP8 layers' path selection the options ask for.

    Args:
        args: the parsed options (``--weight-only``, ``--triton-max-m``).
        device: where the model runs.

    Returns:
        The config to give every ``Fp8Linear``, or None to keep the layers' default.

    Raises:
        SystemExit: ``--weight-only`` on a device whose FP8 layers do not run the reference path.
    """
    if args.weight_only:
        if fp8_gemm_supported(device):
            raise SystemExit(
                "--weight-only emulates a W8A16 GEMM at every row count, which only the CPU "
                "reference path can do (the GPU's W8A16 kernel takes <= 64 rows)"
            )
        # Every row count at or below triton_max_m keeps the activation exact.
        return Fp8LinearConfig(triton_max_m=sys.maxsize)
    if args.triton_max_m is not None:
        return Fp8LinearConfig(triton_max_m=min(args.triton_max_m, 64))
    return None


def build_prompts(
    model_dir: Path, count: int, length: int, vocab: int, seed: int
) -> list[list[int]]:
    """Chat-templated instructions when the tokenizer has a template, else random ids."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_dir)
        if tok.chat_template:
            out = []
            for i in range(count):
                msgs = [{"role": "user", "content": INSTRUCTIONS[i % len(INSTRUCTIONS)]}]
                text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
                out.append(tok.encode(text, add_special_tokens=False))
            return out
    except (OSError, ValueError):
        pass
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(length)] for _ in range(count)]


class _Slots:
    """Hands out consecutive pool slots (the pool is sized for the whole run)."""

    def __init__(self, first: int):
        self.next = first

    def take(self, n: int) -> list[int]:
        out = list(range(self.next, self.next + n))
        self.next += n
        return out


@torch.inference_mode()
def run_model(
    model_dir: Path,
    args: argparse.Namespace,
    dtype: str,
    quantization: str,
    kv_cache_dtype: str,
    prompts: list[list[int]],
    forced: list[list[int]] | None,
) -> Run:
    """Greedy-decode every prompt, then score prompt + ``forced`` (default: own tokens)."""
    device = resolve_device(args.device)
    model = load_model(model_dir, dtype, device, progress=False, quantization=quantization)
    config = fp8_linear_config(args, device)
    if config is not None:
        for module in model.modules():
            if isinstance(module, Fp8Linear):
                module.config = config
    arch = model.arch
    dtype = model.lm_head.weight.dtype
    kv_dtype = resolve_kv_dtype(kv_cache_dtype, dtype)
    n_out = args.output_len
    tokens_needed = 2 * sum(len(p) + n_out for p in prompts) + 16
    pool = KVPool(
        arch.num_layers,
        arch.num_kv_heads,
        arch.head_dim,
        tokens_needed,
        1,
        kv_dtype,
        device,
        kv_scales=model.kv_scales if kv_dtype == FP8_KV_DTYPE else None,
    )
    attn = create_attention_backend(
        args.attention_backend, device, sliding_window=arch.sliding_window
    )
    slots = _Slots(pool.first_usable_slot)

    seq_slots = [slots.take(len(p)) for p in prompts]
    logits = model(ForwardBatch.build(prompts, seq_slots, device=device), pool, attn)
    outputs = [[t] for t in logits.argmax(-1).tolist()]
    for _ in range(n_out - 1):
        for s in seq_slots:
            s.extend(slots.take(1))
        batch = ForwardBatch.build(
            [[o[-1]] for o in outputs], seq_slots, mode=ForwardMode.DECODE, device=device
        )
        for o, t in zip(outputs, model(batch, pool, attn).argmax(-1).tolist()):
            o.append(t)

    forced = forced if forced is not None else outputs
    # One extend pass over every prompt + continuation; the rows predicting the continuation.
    seqs = [p + c[:-1] for p, c in zip(prompts, forced)]
    rows = [list(range(len(p) - 1, len(s))) for p, s in zip(prompts, seqs)]
    batch = ForwardBatch.build(seqs, [slots.take(len(s)) for s in seqs], logits_rows=rows,
                               device=device)  # fmt: skip
    scored = torch.log_softmax(model(batch, pool, attn).float(), -1).cpu()
    logprobs = list(scored.split(n_out))
    del model, pool, attn
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return Run(outputs, logprobs)


def compare(ref: Run, cand: Run) -> dict[str, Any]:
    """Agreement, common prefix and KL statistics of ``cand`` against ``ref``."""
    agree, prefix, kls, top1 = [], [], [], []
    for r, c, lp_r, lp_c in zip(ref.tokens, cand.tokens, ref.logprobs, cand.logprobs):
        same = [a == b for a, b in zip(r, c)]
        agree.append(sum(same) / len(same))
        prefix.append(next((i for i, s in enumerate(same) if not s), len(same)))
        p = lp_r.double().exp()
        kls.extend((p * (lp_r.double() - lp_c.double())).sum(-1).tolist())
        top1.extend((lp_r.argmax(-1) == lp_c.argmax(-1)).tolist())
    return {
        "prompts": len(agree), "token_agreement": statistics.mean(agree),
        "min_prompt_agreement": min(agree), "mean_common_prefix": statistics.mean(prefix),
        "identical_prompts": sum(a == 1.0 for a in agree), "mean_kl": statistics.mean(kls),
        "max_kl": max(kls), "p99_kl": sorted(kls)[max(0, math.ceil(0.99 * len(kls)) - 1)],
        "teacher_forced_top1": sum(top1) / len(top1),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Run the reference and the candidate; print and (with --out) write the comparison."""
    args = parse_args(argv)
    device = resolve_device(args.device)
    model_dir = resolve_model_dir(args, device)
    from radixlm.model.arch import ModelArch

    arch = ModelArch.from_dir(model_dir)
    prompts = build_prompts(
        model_dir, args.num_prompts, args.random_prompt_len, arch.vocab_size, args.seed
    )
    quantization = args.quantization if args.quantization != "auto" else "fp8"
    fp8_linear_config(args, device)  # refuse --weight-only on the GPU before loading anything
    ref_dtype = args.reference_dtype or args.dtype
    ref = run_model(model_dir, args, ref_dtype, "none", "auto", prompts, None)
    cand = run_model(
        model_dir, args, args.dtype, quantization, args.kv_cache_dtype, prompts, ref.tokens
    )
    result = compare(ref, cand)
    label = f"dtype={args.dtype} quantization={quantization} kv_cache_dtype={args.kv_cache_dtype}"
    if args.weight_only:
        label += " weight_only (W8A16 at every row count)"
    elif args.triton_max_m is not None:
        label += f" triton_max_m={min(args.triton_max_m, 64)}"
    print(f"quant-accuracy on {device}, {model_dir}: {label} vs the {ref_dtype} model")
    print(
        f"  {result['prompts']} prompts x {args.output_len} greedy tokens: agreement "
        f"{result['token_agreement']:.1%} (worst prompt {result['min_prompt_agreement']:.1%}, "
        f"{result['identical_prompts']} identical), mean common prefix "
        f"{result['mean_common_prefix']:.1f} tokens"
    )
    print(
        f"  teacher-forced on the reference's tokens: same top-1 at "
        f"{result['teacher_forced_top1']:.1%} of positions"
    )
    print(
        f"  KL(ref || {quantization}) per next-token distribution: mean "
        f"{result['mean_kl']:.3g}, p99 {result['p99_kl']:.3g}, max {result['max_kl']:.3g}"
    )
    ceil = measure_ceilings(device, 1.0, 1.0)  # run_header wants ceilings; none measured here
    write_json(args.out, {**run_header(device, ceil, model_dir), "options": label,
                          "reference_dtype": ref_dtype, "output_len": args.output_len,
                          **result})  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
