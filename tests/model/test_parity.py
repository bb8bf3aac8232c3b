"""radixlm against transformers on tiny random models saved to disk and loaded back."""

from __future__ import annotations

import pytest
import torch

from radixlm.batch import ForwardMode

LENGTHS = [5, 17, 1, 9, 12]
FEATURE_VARIANTS = [
    "llama_tied",
    "llama3_rope",
    "llama_linear_rope",
    "llama_bias",
    "mistral_window",
    "llama_mha_wide_head",
]


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest reference magnitude."""
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def hf_logits(hf, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([prompt])).logits[0].float()


def hf_greedy(hf, prompt: list[int], max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=max_new_tokens,
        )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("variant", ["llama", "mistral", "qwen2", "qwen3", *FEATURE_VARIANTS])
def test_ragged_extend_logits_match_transformers(
    variant, model_dir, hf_model, loaded, runner_cls, make_prompts
):
    path = model_dir(variant)
    model, hf = loaded(path), hf_model(path)
    prompts = make_prompts(model.arch.vocab_size, LENGTHS)
    runner = runner_cls(model)
    logits = runner.forward(prompts, [runner.take(len(p)) for p in prompts], all_rows=True)
    expected = torch.cat([hf_logits(hf, p) for p in prompts])
    assert logits.dtype == torch.float32 and logits.shape == expected.shape
    assert rel_err(logits, expected) < 1e-4


@pytest.mark.parametrize("variant", ["llama", "qwen3", "mistral_window"])
def test_extend_with_cached_prefix_equals_full_pass(variant, model_dir, loaded, runner_cls):
    model = loaded(model_dir(variant))
    prompts = [[5 + (7 * i + 3 * s) % 400 for i in range(n)] for s, n in enumerate([20, 13, 6])]
    split = [11, 1, 5]
    full = runner_cls(model, seed=1)
    expected = full.forward(prompts, [full.take(len(p)) for p in prompts], all_rows=True)

    cached = runner_cls(model, seed=2)
    slots = [cached.take(len(p)) for p in prompts]
    prefixes = [p[:k] for p, k in zip(prompts, split)]
    first = cached.forward(prefixes, [s[:k] for s, k in zip(slots, split)], all_rows=True)
    rests = [p[k:] for p, k in zip(prompts, split)]
    second = cached.forward(rests, slots, all_rows=True, mode=ForwardMode.EXTEND)

    rows = [(r, k, len(p)) for r, (p, k) in enumerate(zip(prompts, split))]
    offsets = [0]
    for p in prompts:
        offsets.append(offsets[-1] + len(p))
    want_first = torch.cat([expected[offsets[r] : offsets[r] + k] for r, k, _ in rows])
    want_second = torch.cat([expected[offsets[r] + k : offsets[r] + n] for r, k, n in rows])
    assert rel_err(first, want_first) < 1e-5
    assert rel_err(second, want_second) < 1e-5


def test_shared_prefix_slots_serve_two_sequences(model_dir, loaded, runner_cls):
    """Two sequences read the same prefix slots (the radix cache's sharing) in one batch."""
    model = loaded(model_dir("llama"))
    prefix, tails = [9, 8, 7, 6, 5, 4, 3], [[100, 101], [200, 201, 202]]
    full = runner_cls(model, seed=3)
    expected = torch.cat(
        [full.forward([prefix + t], [full.take(len(prefix) + len(t))]) for t in tails]
    )
    shared = runner_cls(model, seed=4)
    prefix_slots = shared.take(len(prefix))
    shared.forward([prefix], [prefix_slots])
    got = shared.forward(tails, [prefix_slots + shared.take(len(t)) for t in tails])
    assert rel_err(got, expected) < 1e-5


@pytest.mark.parametrize("variant", ["llama", "mistral", "qwen2", "qwen3", "mistral_window"])
def test_greedy_32_tokens_match_transformers_generate(
    variant, model_dir, hf_model, loaded, runner_cls, make_prompts
):
    path = model_dir(variant)
    model, hf = loaded(path), hf_model(path)
    prompts = make_prompts(model.arch.vocab_size, [6, 11, 3], seed=7)
    got = runner_cls(model).greedy(prompts, max_new_tokens=32)
    expected = [hf_greedy(hf, p, 32) for p in prompts]
    assert got == expected


@pytest.mark.parametrize("variant", ["llama", "qwen3"])
def test_bfloat16_logits_close_to_transformers_float32(
    variant, model_dir, hf_model, runner_cls, make_prompts
):
    from radixlm.model.loader import load_model

    path = model_dir(variant)
    model = load_model(path, torch.bfloat16, "cpu", progress=False)
    hf = hf_model(path)
    prompts = make_prompts(model.arch.vocab_size, [9, 4], seed=11)
    runner = runner_cls(model)
    assert runner.pool.dtype == torch.bfloat16
    logits = runner.forward(prompts, [runner.take(len(p)) for p in prompts], all_rows=True)
    expected = torch.cat([hf_logits(hf, p) for p in prompts])
    assert logits.dtype == torch.float32
    # bf16 keeps 8 mantissa bits; measured ~0.8% of the logit range after 2 layers.
    assert rel_err(logits, expected) < 2e-2


def test_too_long_sequences_are_refused(model_dir, loaded, runner_cls):
    from radixlm.model.attention.torch_backend import TorchAttentionBackend

    windowed = loaded(model_dir("mistral_window"))
    runner = runner_cls(windowed)
    runner.attn = TorchAttentionBackend()  # a backend that ignores the window
    runner.forward([[5] * 8], [runner.take(8)])  # within the window: fine
    with pytest.raises(ValueError, match="sliding_window=8"):
        runner.forward([[5] * 9], [runner.take(9)])
    model = loaded(model_dir("llama"))
    runner = runner_cls(model, capacity=4096)
    too_long = model.arch.max_position_embeddings + 1
    with pytest.raises(ValueError, match="max_position_embeddings"):
        runner.forward([[5] * too_long], [runner.take(too_long)])
