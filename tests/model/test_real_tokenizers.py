"""End to end with the real Llama 3 (128,256 ids) and Llama 2 (32,000 ids) tokenizers:
text in, radixlm greedy tokens, text out, equal to transformers' generate."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from radixlm.model.loader import load_model
from radixlm.model.random_model import make_random_model_dir

TEXTS = ["The quick brown fox", "Hello world! Ünïcödé and emoji 🙂 ok", "def f(x):\n    return"]


def transformers_texts(path, tokenizer, prompts: list[list[int]], new_tokens: int) -> list[str]:
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    texts = []
    for ids in prompts:
        with torch.no_grad():
            out = hf.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                do_sample=False,
                max_new_tokens=new_tokens,
            )
        texts.append(tokenizer.decode(out[0, len(ids) :]))
    return texts


@pytest.mark.slow
@pytest.mark.parametrize(
    "tokenizer_fixture, vocab", [("llama3_tokenizer_dir", 128256), ("llama2_tokenizer_dir", 32000)]
)
def test_text_in_text_out_matches_transformers(
    tokenizer_fixture, vocab, request, tmp_path, runner_cls
):
    tokenizer_dir = request.getfixturevalue(tokenizer_fixture)
    path = make_random_model_dir(
        tmp_path / "m", arch="llama", tokenizer_dir=tokenizer_dir, tie_word_embeddings=True
    )
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = load_model(path, "float32", "cpu", progress=False)
    assert model.arch.vocab_size == vocab
    prompts = [tokenizer(text)["input_ids"] for text in TEXTS]
    assert all(p[0] == tokenizer.bos_token_id for p in prompts)
    outputs = runner_cls(model).greedy(prompts, max_new_tokens=16)
    ours = [tokenizer.decode(ids) for ids in outputs]
    assert ours == transformers_texts(path, tokenizer, prompts, 16)
    assert all(text for text in ours)
