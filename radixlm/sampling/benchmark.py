"""Time SamplingBatch.build + sample per step for typical parameter mixes.

``python -m radixlm.sampling.benchmark --device cuda`` prints a markdown table: host time to
build and launch one step (no synchronisation) and wall time per step (synchronised after many
steps), at Llama 3's vocabulary size. Rows carry a 512-token prompt and 256+ generated tokens
(one more per step), the context that penalties without a PenaltyCache re-send every step.
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass

import torch

from radixlm.sampling.penalty_cache import PenaltyCache
from radixlm.sampling.sampler import SamplingBatch, sample
from radixlm.sampling_params import SamplingParams

MIXES = {
    "greedy": lambda i: SamplingParams(temperature=0.0),
    "top_p": lambda i: SamplingParams(temperature=0.8, top_p=0.9),
    "top_k+top_p+min_p": lambda i: SamplingParams(temperature=0.8, top_k=40, top_p=0.9, min_p=0.05),
    "top_p+seed": lambda i: SamplingParams(temperature=0.8, top_p=0.9, seed=i),
    "penalties": lambda i: SamplingParams(repetition_penalty=1.1, frequency_penalty=0.5),
    "penalties+cache": lambda i: SamplingParams(repetition_penalty=1.1, frequency_penalty=0.5),
}


def time_step(step, device: torch.device, iters: int) -> tuple[float, float]:
    """(host ms per step without waiting for the device, wall ms per step)."""
    for _ in range(3):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    host = (time.perf_counter() - start) / iters * 1e3
    _sync(device)
    return host, (time.perf_counter() - start) / iters * 1e3


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(device: torch.device, batch_sizes: list[int], vocab: int, iters: int) -> list[str]:
    """Benchmark every mix at every batch size; returns markdown table rows."""
    rng = random.Random(0)
    generator = torch.Generator(device=device).manual_seed(0)
    rows = []
    for size in batch_sizes:
        logits = torch.randn(size, vocab, device=device, generator=generator) * 3
        context = DecodeContext(
            rids=[f"req{i}" for i in range(size)],
            prompts=[[rng.randrange(vocab) for _ in range(512)] for _ in range(size)],
            outputs=[[rng.randrange(vocab) for _ in range(256)] for _ in range(size)],
            rng=rng,
        )
        for name, make in MIXES.items():
            params = [make(i) for i in range(size)]
            cache = PenaltyCache(vocab, device) if name.endswith("cache") else None

            def step(params=params, logits=logits, cache=cache, context=context):
                context.advance(vocab)
                batch = SamplingBatch.build(
                    params, context.outputs, context.prompts, vocab_size=vocab, device=device,
                    eos_token_ids={2}, generator=generator, request_ids=context.rids,
                    penalty_cache=cache,
                )  # fmt: skip
                return sample(logits, batch)

            host, wall = time_step(step, device, iters)
            rows.append(f"| {size} | {name} | {host:.3f} | {wall:.3f} |")
    return rows


@dataclass
class DecodeContext:
    """Requests in decode: every step appends one token to each output."""

    rids: list[str]
    prompts: list[list[int]]
    outputs: list[list[int]]
    rng: random.Random

    def advance(self, vocab: int) -> None:
        for output in self.outputs:
            output.append(self.rng.randrange(vocab))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-sizes", default="1,64,256")
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    device = torch.device(args.device)
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"sampler, {name}, vocab {args.vocab}, torch {torch.__version__}")
    print("| batch | params | host ms/step | wall ms/step |\n|---|---|---|---|")
    print("\n".join(run(device, sizes, args.vocab, args.iters)))


if __name__ == "__main__":
    main()
