"""The embedded demo model: deterministic, cached, loadable by transformers, sane tokenizer."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from radixlm.model import demo


def _digests(directory: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.iterdir())
        if p.is_file()
    }


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    return demo.ensure_demo_model(tmp_path_factory.mktemp("cache"))


def test_build_is_deterministic(demo_dir, tmp_path):
    again = demo.build_demo_model(tmp_path)
    assert _digests(again) == _digests(demo_dir)


def test_cached_build_is_reused(demo_dir):
    before = {p.name: p.stat().st_mtime_ns for p in demo_dir.iterdir()}
    assert demo.ensure_demo_model(demo_dir.parent) == demo_dir
    assert {p.name: p.stat().st_mtime_ns for p in demo_dir.iterdir()} == before


def test_concurrent_builders_leave_one_complete_model(tmp_path, demo_dir):
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(demo.ensure_demo_model(tmp_path)))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [tmp_path / demo.DEMO_VERSION] * 2
    assert _digests(results[0]) == _digests(demo_dir)
    assert [p.name for p in tmp_path.iterdir()] == [demo.DEMO_VERSION]  # no staging left over


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("RADIXLM_CACHE", str(tmp_path))
    assert demo.default_cache_dir() == tmp_path


def test_tokenizer_round_trips_any_text(demo_dir):
    tokenizer = AutoTokenizer.from_pretrained(demo_dir)
    samples = [
        "The lighthouse keeper wrote in her ledger.",
        "日本語のテキスト 🚀 émigré",
        '{"a": [1, 2.5e-3, null]}\n\tdef f(x): return x ** 2',
        " leading  spaces ",
    ]
    for text in samples:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text
    assert tokenizer.encode("hi")[0] == tokenizer.bos_token_id
    assert len(tokenizer) == demo.VOCAB_SIZE


def test_tokenizer_compresses_the_corpus(demo_dir):
    tokenizer = AutoTokenizer.from_pretrained(demo_dir)
    text = demo.corpus_files()[0].read_text(encoding="utf-8")[:4000]
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) < len(text.encode("utf-8")) / 2.5  # merges learned, not bytes


def test_chat_template_marks_roles_with_special_tokens(demo_dir):
    tokenizer = AutoTokenizer.from_pretrained(demo_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<s><|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\n"
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    role_ids = [tokenizer.convert_tokens_to_ids(t) for t in demo.ROLE_TOKENS]
    assert ids[0] == tokenizer.bos_token_id
    assert [i for i in ids if i in role_ids] == [role_ids[0], role_ids[1], role_ids[2]]
    with pytest.raises(Exception, match="roles"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_model_loads_in_transformers_with_the_demo_shape(demo_dir):
    tokenizer = AutoTokenizer.from_pretrained(demo_dir)
    model = AutoModelForCausalLM.from_pretrained(demo_dir)
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads) == (256, 4, 2)
    assert cfg.vocab_size == len(tokenizer)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    ids = torch.tensor([tokenizer.encode("Once upon a time")])
    logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()
    # random weights: the next-token distribution is close to uniform (gibberish by design)
    probs = logits[0, -1].softmax(-1)
    assert probs.max() < 0.05
