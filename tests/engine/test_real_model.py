"""radixlm on the real default model (SmolLM2-135M-Instruct, Q4_1 GGUF, fp32 on CPU) against
transformers running the same GGUF weights: greedy tokens, prompt and output logprobs, the
prefix cache on real weights, and concurrency.

The transformers reference is loaded and run once per session (``smollm2_hf`` and the module
fixture ``reference`` below); the engine is the session's shared one (``smollm2_engine``).
"""

from __future__ import annotations

import threading

import pytest
import torch

# The session's transformers reference and engine load inside the first test's setup.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

MAX_NEW = 48
LOGPROB_TOL = 1e-3

CHATS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
    "List three fruits that are red.",
    "What is 17 plus 25?",
    "Give me a short tip for learning to cook.",
    "Translate 'good morning' into Spanish.",
    "Write a Python function that reverses a string.",
    "Quelle est la plus grande ville du Canada ?",
    "¿Cuántos días tiene una semana?",
    "Wie heißt die Hauptstadt von Deutschland?",
    "用一句话介绍一下太阳。",
    "日本の首都はどこですか？",
    "Что такое фотосинтез?",
    "Describe this mood in words: 🎉🥳🎂",
    "Reply with three emojis that describe winter ❄️.",
]
COMPLETIONS = [
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "#include <stdio.h>\n\nint main(void) {\n",
    "SELECT name, COUNT(*) FROM orders WHERE",
    "Once upon a time, in a small village by the mountains,",
    "The three laws of thermodynamics are",
    "<html>\n  <head>\n    <title>",
]
FACTS = [
    "The Nile flows north through eleven countries before reaching the Mediterranean Sea.",
    "Honey found in ancient Egyptian tombs was still edible thousands of years later.",
    "Octopuses have three hearts and blue blood rich in hemocyanin.",
    "The Eiffel Tower grows slightly taller in summer as its iron expands in the heat.",
    "Bananas are botanically berries, while strawberries are not.",
    "Venus rotates so slowly that its day is longer than its year.",
    "The first computer programmer is often said to be Ada Lovelace.",
    "Mount Everest rises a few millimetres every year as tectonic plates collide.",
    "A group of flamingos is called a flamboyance.",
    "Sound travels about four times faster in water than in air.",
]


def long_prompt() -> str:
    """About 1,500 tokens of numbered notes, then a question about one of them."""
    notes = []
    for i in range(75):
        fact = FACTS[(7 * i) % len(FACTS)]
        notes.append(f"Note {i + 1}: {fact}")
    body = "\n".join(notes)
    question = "Which note mentions flamingos, and what does it say?"
    return f"Read these notes carefully.\n{body}\n\n{question}"


def chat_ids(tokenizer, text: str) -> list[int]:
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer.encode(rendered, add_special_tokens=False)


@pytest.fixture(scope="module")
def prompts(smollm2_hf_tokenizer) -> list[list[int]]:
    """Token ids of every parity prompt (the HF tokenizer's: chat template or plain text)."""
    tokenizer = smollm2_hf_tokenizer
    ids = [chat_ids(tokenizer, text) for text in CHATS]
    ids += [tokenizer.encode(text, add_special_tokens=False) for text in COMPLETIONS]
    ids.append(chat_ids(tokenizer, long_prompt()))
    return ids


def hf_generate(model, prompt: list[int]) -> tuple[list[int], list[float], list[float]]:
    """Greedy tokens from ``generate``, then every logprob from one forward over it all."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=MAX_NEW,
            pad_token_id=model.generation_config.eos_token_id,
        )
        tokens = out[0, len(prompt) :].tolist()
        full = torch.tensor([prompt + tokens])
        logprobs = torch.log_softmax(model(full).logits[0].float(), dim=-1)
        picked = logprobs[:-1].gather(1, full[0, 1:, None])[:, 0].tolist()
    return tokens, picked[: len(prompt) - 1], picked[len(prompt) - 1 :]


@pytest.fixture(scope="module")
def reference(smollm2_hf, prompts):
    """transformers' greedy continuation and logprobs of every prompt (batch 1, no padding)."""
    model, _ = smollm2_hf
    return [hf_generate(model, p) for p in prompts]


def greedy(max_new_tokens: int = MAX_NEW) -> dict:
    return {"max_new_tokens": max_new_tokens, "temperature": 0.0}


def test_prompt_set_covers_the_cases(prompts):
    assert len(prompts) >= 20
    assert max(len(p) for p in prompts) >= 1400  # the long-context prompt


def test_greedy_tokens_and_logprobs_match_transformers(smollm2_engine, prompts, reference):
    outs = smollm2_engine.generate(
        input_ids=prompts, sampling_params=greedy(), return_logprob=True, logprob_start_len=0
    )
    for i, (out, (tokens, prompt_lp, output_lp)) in enumerate(zip(outs, reference)):
        assert out["output_ids"] == tokens, (
            f"prompt {i}: radixlm {out['output_ids']} != transformers {tokens}"
        )
        meta = out["meta_info"]
        ours_prompt = [lp for lp, _, _ in meta["input_token_logprobs"][1:]]
        ours_output = [lp for lp, _, _ in meta["output_token_logprobs"]]
        assert len(ours_prompt) == len(prompt_lp) and len(ours_output) == len(output_lp)
        assert max(abs(a - b) for a, b in zip(ours_prompt, prompt_lp)) < LOGPROB_TOL, i
        assert max(abs(a - b) for a, b in zip(ours_output, output_lp)) < LOGPROB_TOL, i


def test_answers_are_sensible(smollm2_engine, prompts):
    """Beyond parity: a 135M model still gets these right (checked by hand, then pinned)."""
    out = smollm2_engine.generate(input_ids=prompts[0], sampling_params=greedy(16))
    assert "Paris" in out["text"]
    out = smollm2_engine.generate(input_ids=prompts[7], sampling_params=greedy(64))
    assert "def " in out["text"] and "[::-1]" in out["text"]


def test_prefix_cache_cold_warm_and_disabled_agree(smollm2_engine, smollm2_gguf, prompts):
    from radixlm import Engine

    picked = [prompts[0], prompts[8], prompts[-1]]
    # Shared system prompt + different questions: the warm pass reuses the template prefix.
    smollm2_engine.flush_cache()
    cold = smollm2_engine.generate(input_ids=picked, sampling_params=greedy(24))
    warm = smollm2_engine.generate(input_ids=picked, sampling_params=greedy(24))
    assert [o["output_ids"] for o in warm] == [o["output_ids"] for o in cold]
    assert all(o["meta_info"]["cached_tokens"] >= len(p) - 1 for o, p in zip(warm, picked))
    with Engine(
        model=str(smollm2_gguf),
        device="cpu",
        dtype="float32",
        kv_cache_tokens=8192,
        enable_radix_cache=False,
    ) as uncached:
        off = uncached.generate(input_ids=picked, sampling_params=greedy(24))
    assert [o["output_ids"] for o in off] == [o["output_ids"] for o in cold]
    assert all(o["meta_info"]["cached_tokens"] == 0 for o in off)


def test_sixteen_concurrent_requests_equal_one_at_a_time(smollm2_engine, prompts):
    picked = (prompts[:16] * 2)[:16]
    params = greedy(32)
    alone = [smollm2_engine.generate(input_ids=p, sampling_params=params) for p in picked]
    results: list[dict | None] = [None] * len(picked)

    def run(i: int) -> None:
        results[i] = smollm2_engine.generate(input_ids=picked[i], sampling_params=params)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(picked))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert [r["output_ids"] for r in results] == [a["output_ids"] for a in alone]
