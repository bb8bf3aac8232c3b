"""load_tokenizer, eos_token_ids, apply_chat_template and encode on the real tokenizers."""

from __future__ import annotations

import json

import pytest

from radixlm.tokenizer import (
    TokenizerError,
    apply_chat_template,
    encode,
    eos_token_ids,
    load_tokenizer,
)

MESSAGES = [{"role": "user", "content": "  hi there "}]


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")


def test_directory_without_tokenizer_files_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TokenizerError, match="no tokenizer files"):
        load_tokenizer(tmp_path)


def test_loads_both_shared_tokenizers(llama3_tokenizer, llama2_tokenizer):
    assert len(llama3_tokenizer) == 128256 and llama3_tokenizer.bos_token == "<|begin_of_text|>"
    assert len(llama2_tokenizer) == 32000 and llama2_tokenizer.bos_token == "<s>"


def test_eos_ids_merge_generation_config(llama3_tokenizer, tmp_path):
    eot, end_of_text = 128009, 128001  # <|eot_id|>, <|end_of_text|>
    assert llama3_tokenizer.convert_ids_to_tokens([eot, end_of_text]) == [
        "<|eot_id|>",
        "<|end_of_text|>",
    ]
    assert eos_token_ids(llama3_tokenizer) == {eot}
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [end_of_text]}))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 128008}))
    assert eos_token_ids(llama3_tokenizer, tmp_path) == {eot, end_of_text, 128008}


def test_eos_ids_ignore_unreadable_config(llama2_tokenizer, tmp_path):
    (tmp_path / "generation_config.json").write_text("not json")
    assert eos_token_ids(llama2_tokenizer, tmp_path) == {2}


def test_llama3_chat_template_renders_the_jinja_file(llama3_tokenizer):
    text = apply_chat_template(llama3_tokenizer, MESSAGES)
    # Expected string written from chat_template.jinja by hand (content is trimmed).
    assert text == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    no_prompt = apply_chat_template(llama3_tokenizer, MESSAGES, add_generation_prompt=False)
    assert no_prompt == text[: -len("<|start_header_id|>assistant<|end_header_id|>\n\n")]


def test_llama2_chat_template_renders_system_prompt(llama2_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, *MESSAGES]
    text = apply_chat_template(llama2_tokenizer, messages)
    assert text == "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nhi there [/INST]"


def test_missing_chat_template_is_a_clear_error(llama2_tokenizer_dir, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        (tmp_path / name).symlink_to(llama2_tokenizer_dir / name)
    tokenizer = load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="no chat template"):
        apply_chat_template(tokenizer, MESSAGES)


def test_encode_adds_bos_once(tokenizer):
    assert encode(tokenizer, "Hello") == tokenizer.encode("Hello")
    assert encode(tokenizer, "Hello")[0] == tokenizer.bos_token_id
    ids = encode(tokenizer, apply_chat_template(tokenizer, MESSAGES))
    assert ids[0] == tokenizer.bos_token_id and ids[1] != tokenizer.bos_token_id
    assert tokenizer.decode(ids) == apply_chat_template(tokenizer, MESSAGES)
