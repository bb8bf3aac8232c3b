"""The byte string of every token of a Hugging Face tokenizer, as a grammar sees it.

A grammar walks bytes, so each token id is mapped to the exact bytes it adds to the output:
- byte-level BPE (GPT-2, Llama 3): token strings are spelled in the GPT-2 byte alphabet;
- SentencePiece (Llama 2): ``▁`` is a space and ``<0xNN>`` is the raw byte NN (byte fallback);
- special tokens (BOS, EOS, chat markers, reserved ids) have no bytes: a grammar never allows
  them, except EOS, which the matcher handles itself in a final state.
Partial UTF-8 tokens keep their raw bytes, so a character split over two tokens still matches.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_SPIECE_SPACE = "\u2581"


@dataclass(frozen=True)
class TokenVocab:
    """Token bytes and the few facts about the tokenizer that grammars need.

    Attributes:
        token_bytes: bytes per token id, None for special (never grammar-allowed) tokens.
        eos_token_ids: ids that end generation; allowed only where the grammar is complete.
        dummy_prefix: True when the tokenizer prepends a space to encoded text that decoding
            strips again (SentencePiece "▁"); the first generated token may then carry it.
        fingerprint: a stable hash of the token table, used in compile-cache keys.
    """

    token_bytes: tuple[bytes | None, ...]
    eos_token_ids: tuple[int, ...]
    dummy_prefix: bool
    fingerprint: str
    byte_token_ids: tuple[int, ...] = field(repr=False, default=())

    @property
    def size(self) -> int:
        """Number of token ids the tokenizer defines."""
        return len(self.token_bytes)

    def first_bytes(self) -> np.ndarray:
        """int16 array: the first byte of each token, -1 for special or empty tokens."""
        out = np.full(self.size, -1, dtype=np.int16)
        for tid, data in enumerate(self.token_bytes):
            if data:
                out[tid] = data[0]
        return out

    def decode_bytes(self, token_ids: list[int]) -> bytes:
        """Concatenated bytes of ``token_ids`` (special tokens contribute nothing)."""
        return b"".join(self.token_bytes[t] or b"" for t in token_ids)


def build_token_vocab(tokenizer: Any, eos_token_ids: list[int] | None = None) -> TokenVocab:
    """Map every token id of ``tokenizer`` to its bytes.

    Args:
        tokenizer: a Hugging Face tokenizer (fast or slow).
        eos_token_ids: ids that end a sequence; default the tokenizer's ``eos_token_id``.

    Returns:
        The :class:`TokenVocab`.
    """
    vocab: dict[str, int] = tokenizer.get_vocab()
    size = max(len(tokenizer), max(vocab.values()) + 1)
    special = _special_ids(tokenizer)
    spell = _speller(tokenizer, vocab)
    table: list[bytes | None] = [None] * size
    added = _added_contents(tokenizer)
    for text, tid in vocab.items():
        if tid in special:
            continue
        table[tid] = added[tid].encode("utf-8") if tid in added else spell(text)
    eos = _eos_ids(tokenizer, eos_token_ids)
    digest = hashlib.sha1(repr((table, eos)).encode("utf-8", "surrogatepass")).hexdigest()
    return TokenVocab(
        token_bytes=tuple(table),
        eos_token_ids=eos,
        dummy_prefix=_has_dummy_prefix(tokenizer, table),
        fingerprint=digest,
        byte_token_ids=_byte_tokens(table),
    )


def _eos_ids(tokenizer: Any, given: list[int] | None) -> tuple[int, ...]:
    if given is not None:
        return tuple(sorted(set(int(t) for t in given)))
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(sorted(set(eos if isinstance(eos, list) else [eos])))


def _special_ids(tokenizer: Any) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for tid, token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(token, "special", False):
            ids.add(int(tid))
    return ids


def _added_contents(tokenizer: Any) -> dict[int, str]:
    """Non-special added tokens are literal text, not spelled in the model's alphabet."""
    out = {}
    for tid, token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if not getattr(token, "special", False):
            out[int(tid)] = str(getattr(token, "content", token))
    return out


def _speller(tokenizer: Any, vocab: dict[str, int]):
    kind = _decoder_kind(tokenizer, vocab)
    if kind == "bytelevel":
        return _bytelevel_speller()
    if kind == "sentencepiece":
        return _sentencepiece_bytes
    return lambda text: text.encode("utf-8")


def _decoder_kind(tokenizer: Any, vocab: dict[str, int]) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        types = _component_types(spec.get("decoder")) | _component_types(spec.get("pre_tokenizer"))
        if "ByteLevel" in types:
            return "bytelevel"
        if "Metaspace" in types or "ByteFallback" in types or _SPIECE_SPACE in str(
            spec.get("decoder")
        ):
            return "sentencepiece"
        return "plain"
    if any(_SPIECE_SPACE in t for t in vocab):
        return "sentencepiece"
    if "\u0120" in "".join(list(vocab)[:5000]):
        return "bytelevel"
    return "plain"


def _component_types(spec: Any) -> set[str]:
    """Every ``type`` named in a tokenizers decoder/pre-tokenizer spec, recursively."""
    if isinstance(spec, dict):
        found = {spec["type"]} if isinstance(spec.get("type"), str) else set()
        for value in spec.values():
            found |= _component_types(value)
        return found
    if isinstance(spec, list):
        return set().union(*(_component_types(v) for v in spec)) if spec else set()
    return set()


def gpt2_byte_alphabet() -> dict[str, int]:
    """The GPT-2 byte-level alphabet: printable stand-in character -> raw byte."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    codes = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {chr(code): byte for byte, code in zip(printable, codes)}


def _bytelevel_speller():
    alphabet = gpt2_byte_alphabet()

    def spell(text: str) -> bytes:
        try:
            return bytes(alphabet[ch] for ch in text)
        except KeyError:
            return text.encode("utf-8")

    return spell


def _sentencepiece_bytes(text: str) -> bytes:
    match = _BYTE_FALLBACK.match(text)
    if match:
        return bytes([int(match.group(1), 16)])
    return text.replace(_SPIECE_SPACE, " ").encode("utf-8")


def _has_dummy_prefix(tokenizer: Any, table: list[bytes | None]) -> bool:
    try:
        ids = tokenizer.encode("a", add_special_tokens=False)
    except Exception:
        return False
    spelled = b"".join(table[t] or b"" for t in ids if t < len(table))
    return spelled == b" a"


def _byte_tokens(table: list[bytes | None]) -> tuple[int, ...]:
    """For each byte value, a token whose bytes are exactly that byte (-1 if none)."""
    out = [-1] * 256
    for tid, data in enumerate(table):
        if data is not None and len(data) == 1 and out[data[0]] < 0:
            out[data[0]] = tid
    return tuple(out)
