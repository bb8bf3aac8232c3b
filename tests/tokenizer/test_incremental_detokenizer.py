"""IncrementalDetokenizer against tokenizer.decode of the whole sequence, on both tokenizers."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from radixlm.tokenizer import IncrementalDetokenizer

FFFD = "\ufffd"
HYPOTHESIS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

# Scripts that tokenize into multi-byte pieces, byte fallback and odd spacing; some pieces are
# several code points (emoji sequences), so texts are joined from pieces.
PIECES = st.one_of(
    st.sampled_from(list(" \t\n  ")),
    st.characters(min_codepoint=0x20, max_codepoint=0x7E),
    st.sampled_from(list("éüßñçøåœ你好世界日本語한국어Привет مرحبا שלום ▁")),
    st.sampled_from(["😀", "👍🏽", "🇫🇷", "👨‍👩‍👧", "🤖", "𝔘", "\u0301", "\u200d"]),
)
TEXTS = st.lists(PIECES, max_size=40).map("".join)


def stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    """Feed ids one at a time; the flushed remainder is the last delta."""
    return [detok.append([token_id]) for token_id in ids] + [detok.flush()]


def plain_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


@given(text=TEXTS)
@HYPOTHESIS
def test_deltas_concatenate_to_full_decode(tokenizer, text):
    ids = plain_ids(tokenizer, text)
    deltas = stream(IncrementalDetokenizer(tokenizer), ids)
    full = tokenizer.decode(ids, skip_special_tokens=True)
    assert "".join(deltas) == full
    if FFFD not in full:
        assert not any(FFFD in delta for delta in deltas)


@given(text=TEXTS)
@HYPOTHESIS
def test_text_is_released_as_soon_as_it_is_complete(tokenizer, text):
    """After every token, the text so far is the decoded prefix (unless it ends mid-character)."""
    ids = plain_ids(tokenizer, text)
    detok = IncrementalDetokenizer(tokenizer)
    for count, token_id in enumerate(ids, start=1):
        detok.append([token_id])
        prefix = tokenizer.decode(ids[:count], skip_special_tokens=True)
        if not prefix.endswith(FFFD):
            assert detok.text == prefix
    assert detok.num_tokens_consumed == len(ids)


@given(data=st.data())
@HYPOTHESIS
def test_random_token_ids_including_broken_bytes(llama3_tokenizer, data):
    """Arbitrary ids (partial UTF-8 sequences that never complete) still concatenate exactly."""
    tokenizer = llama3_tokenizer
    short_pieces = st.integers(0, 1000)  # many are single bytes, some invalid on their own
    any_token = st.integers(0, len(tokenizer) - 1)
    ids = data.draw(st.lists(st.one_of(short_pieces, any_token), max_size=30))
    deltas = stream(IncrementalDetokenizer(tokenizer), ids)
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)


@given(data=st.data())
@HYPOTHESIS
def test_random_sentencepiece_ids(llama2_tokenizer, data):
    """Arbitrary Llama 2 ids; byte-fallback ids are covered by the text tests and the next one."""
    tokenizer = llama2_tokenizer
    not_a_byte = st.one_of(st.integers(0, 2), st.integers(259, len(tokenizer) - 1))
    ids = data.draw(st.lists(not_a_byte, max_size=30))
    deltas = stream(IncrementalDetokenizer(tokenizer), ids)
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)


def test_invalid_byte_fallback_run_keeps_valid_bytes(llama2_tokenizer):
    """SentencePiece's byte fallback turns a whole invalid run of byte tokens into U+FFFD
    (<0x00><0x80> decodes to two), while streaming has already released the valid NUL: the
    stream reads as each byte decoded on its own, which loses less."""
    ids = llama2_tokenizer.convert_tokens_to_ids(["<0x00>", "<0x80>", "▁ok"])
    streamed = "".join(stream(IncrementalDetokenizer(llama2_tokenizer), ids))
    assert streamed == "".join(llama2_tokenizer.decode([i]) for i in ids[:2]) + " ok"
    assert llama2_tokenizer.decode(ids) == "\ufffd\ufffd ok"


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_skipped_or_kept(tokenizer, skip):
    messages = [{"role": "user", "content": "Grüße 😀"}, {"role": "assistant", "content": "ok"}]
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    ids = list(ids) + [tokenizer.eos_token_id]
    deltas = stream(IncrementalDetokenizer(tokenizer, skip_special_tokens=skip), ids)
    full = tokenizer.decode(ids, skip_special_tokens=skip)
    assert "".join(deltas) == full
    assert (tokenizer.eos_token in full) is not skip


@given(text=TEXTS.filter(lambda t: len(t) > 2), data=st.data())
@HYPOTHESIS
def test_prompt_context_continues_the_prompt(tokenizer, text, data):
    """With the prompt as context, output text is what decoding prompt+output adds to the prompt
    (SentencePiece keeps the first generated word's leading space)."""
    ids = plain_ids(tokenizer, text)
    split = data.draw(st.integers(0, len(ids)))
    prompt, output = ids[:split], ids[split:]
    prompt_text = tokenizer.decode(prompt)
    full = tokenizer.decode(ids)
    if prompt_text.endswith(FFFD) or not full.startswith(prompt_text):
        return  # the prompt ends inside a character: there is no clean continuation to compare
    deltas = stream(IncrementalDetokenizer(tokenizer, prompt_token_ids=prompt), output)
    assert "".join(deltas) == full[len(prompt_text) :]


def test_context_cut_inside_an_emoji_widens_to_its_first_byte(llama2_tokenizer):
    """Found by hypothesis: the last 5 prompt ids start inside a byte-fallback emoji, and a lone
    "▁" output token lost its space when the context was dropped."""
    ids = plain_ids(llama2_tokenizer, "👍🏽 ")
    prompt, output = ids[:-1], ids[-1:]
    assert llama2_tokenizer.convert_ids_to_tokens(output) == ["▁"] and len(prompt) > 5
    deltas = stream(IncrementalDetokenizer(llama2_tokenizer, prompt_token_ids=prompt), output)
    assert "".join(deltas) == " "


def test_first_generated_word_keeps_its_space_with_sentencepiece(llama2_tokenizer):
    ids = llama2_tokenizer.encode("The capital of France is Paris")
    prompt, output = ids[:-1], ids[-1:]
    assert llama2_tokenizer.convert_ids_to_tokens(output) == ["▁Paris"]
    with_context = IncrementalDetokenizer(llama2_tokenizer, prompt_token_ids=prompt)
    without = IncrementalDetokenizer(llama2_tokenizer)
    assert "".join(stream(with_context, output)) == " Paris"
    assert "".join(stream(without, output)) == "Paris"


def reference_cut(decoded: str, stops: list[str]) -> tuple[str, str | None]:
    """Text before the stop string that is complete first (longest on a tie), found by str.find."""
    found = [(decoded.find(s) + len(s), -len(s), s) for s in stops if decoded.find(s) >= 0]
    if not found:
        return decoded, None
    end, _, stop = min(found)
    return decoded[: end - len(stop)], stop


def reference_visible(decoded: str, stops: list[str]) -> str:
    """What may be shown of a partial text: up to a match, else minus a possible stop start."""
    cut, stop = reference_cut(decoded, stops)
    if stop is not None:
        return cut
    for size in range(len(decoded), 0, -1):
        if any(s.startswith(decoded[-size:]) and len(s) > size for s in stops):
            return decoded[:-size]
    return decoded


@st.composite
def text_and_stops(draw):
    text = draw(TEXTS.filter(lambda t: len(t.strip()) > 1))
    stops = []
    for _ in range(draw(st.integers(1, 3))):
        if draw(st.booleans()):
            start = draw(st.integers(0, len(text) - 1))
            stops.append(text[start : start + draw(st.integers(1, 6))])
        else:
            stops.append("".join(draw(st.lists(PIECES, min_size=1, max_size=4))))
    return text, [s for s in stops if s]


@given(case=text_and_stops())
@HYPOTHESIS
def test_stop_strings_cut_exactly_across_token_boundaries(tokenizer, case):
    text, stops = case
    ids = plain_ids(tokenizer, text)
    full = tokenizer.decode(ids, skip_special_tokens=True)
    detok = IncrementalDetokenizer(tokenizer, stop=stops)
    for count, token_id in enumerate(ids, start=1):
        detok.append([token_id])
        partial = tokenizer.decode(ids[:count], skip_special_tokens=True)
        if not partial.endswith(FFFD):
            assert detok.text == reference_visible(partial, stops)
        if detok.stopped:
            break
    detok.flush()
    expected, matched = reference_cut(full, stops)
    assert detok.text == expected
    assert detok.matched_stop == matched
    assert detok.stopped is (matched is not None)


def test_stop_string_spanning_tokens_is_not_returned(tokenizer):
    ids = tokenizer.encode("Answer: 42\n\nQuestion: next", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, stop=["\n\nQuest"])
    deltas = stream(detok, ids)
    assert "".join(deltas) == "Answer: 42"
    assert detok.matched_stop == "\n\nQuest"
    assert detok.num_tokens_consumed < len(ids)
    assert detok.append(ids) == "" and detok.flush() == ""


def test_held_back_stop_prefix_is_released_at_flush(tokenizer):
    ids = tokenizer.encode("value: <|EN", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, stop=["<|END|>"])
    streamed = "".join(detok.append([t]) for t in ids)
    assert streamed == "value: "  # "<|EN" could still become the stop string
    assert detok.flush() == "<|EN"
    assert not detok.stopped and detok.text == "value: <|EN"


def test_stop_string_made_of_special_token_text(llama3_tokenizer):
    ids = llama3_tokenizer.encode("Hi there", add_special_tokens=False)
    ids += [llama3_tokenizer.convert_tokens_to_ids("<|eot_id|>")]
    detok = IncrementalDetokenizer(llama3_tokenizer, skip_special_tokens=False, stop=["<|eot_id|>"])
    assert "".join(stream(detok, ids)) == "Hi there"
    assert detok.matched_stop == "<|eot_id|>"
