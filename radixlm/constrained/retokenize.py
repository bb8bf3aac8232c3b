"""Exact re-tokenization of forced text for jump-forward.

``tokenizer.encode(text)`` is not always the bytes of ``text``: SentencePiece prepends a dummy
``▁`` (a space) and special-token strings inside ``text`` become special ids. The encoder below
checks the bytes and falls back, so the spliced tokens always spell exactly the forced text.

Splices keep token boundaries: the forced text is followed by text the model has not written
yet, and a tokenizer often merges the forced text's last token with it (Llama 3 spells
``"colours": ["red"`` with `` ["``, not `` [`` then ``"``). Splicing `` [`` would take the natural
token away from the model, which then writes something it would not have. So the splice backs
off (token healing): trailing tokens that a longer vocabulary token could extend across the
boundary are left for the model to write under the grammar.
"""

from __future__ import annotations

import bisect
from typing import Any

from radixlm.constrained.vocab import TokenVocab

_PREFIXES = (b"\n", b" \n")
# Splices memoized per retokenizer: a schema forces the same few texts after the same few
# tokens in every request, and re-deriving one costs a tokenizer call and vocabulary searches.
_SPLICE_CACHE_SIZE = 4096


class Retokenizer:
    """Encodes text to token ids whose bytes are exactly the text.

    Args:
        tokenizer: the Hugging Face tokenizer.
        vocab: its :class:`TokenVocab`.
    """

    def __init__(self, tokenizer: Any, vocab: TokenVocab):
        self.tokenizer = tokenizer
        self.vocab = vocab
        self._sorted_spellings: list[bytes] | None = None
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        self._splices: dict[tuple[str, int | None], tuple[tuple[int, tuple[int, ...]], ...]] = {}

    def encode(self, text: str) -> list[int] | None:
        """Token ids spelling exactly ``text``, the way the tokenizer splits it where possible.

        Returns:
            The ids, or None if no spelling exists (a byte without a single-byte token).
        """
        target = text.encode("utf-8")
        ids = self._encode(text)
        if self.vocab.decode_bytes(ids) == target and self._all_plain(ids):
            return ids
        shifted = self._after_newline(text, target)
        if shifted is not None:
            return shifted
        return self._bytewise(target)

    def splice_candidates(
        self, forced: str, last_token_id: int | None, accepted: int
    ) -> list[tuple[int, list[int]]]:
        """Ways to append ``forced``: (tokens to drop from the output end, ids to append).

        The first candidate re-tokenizes the last token together with the forced text; the
        second appends the forced text on its own (used if the first does not parse). Both
        end at a safe token boundary (:meth:`heal`); candidates left with nothing to append
        are dropped.
        """
        key = (forced, last_token_id if accepted > 0 else None)
        found = self._splices.get(key)
        if found is None:
            found = tuple((rollback, tuple(ids)) for rollback, ids in self._splice_candidates(*key))
            if len(self._splices) >= _SPLICE_CACHE_SIZE:
                self._splices.clear()
            self._splices[key] = found
        return [(rollback, list(ids)) for rollback, ids in found]

    def _splice_candidates(
        self, forced: str, last_token_id: int | None
    ) -> list[tuple[int, list[int]]]:
        out: list[tuple[int, list[int]]] = []
        last = self._token_bytes(last_token_id)
        if last:
            combined = last + forced.encode("utf-8")
            try:
                ids = self.encode(combined.decode("utf-8"))
            except UnicodeDecodeError:
                ids = None
            if ids:
                out.append((0, ids[1:]) if ids[0] == last_token_id else (1, ids))
        alone = self.encode(forced)
        if alone:
            out.append((0, alone))
        return [(rollback, healed) for rollback, ids in out if (healed := self.heal(ids))]

    def heal(self, ids: list[int]) -> list[int]:
        """``ids`` without the trailing tokens the model's own tokenization could merge with
        the text that follows them.

        The last token goes when a longer vocabulary token starts with it (the model may
        write that one instead); each token before goes while a vocabulary token starts with
        its bytes followed by the first byte already given back (a token spanning the new
        boundary). Tokens of the text the model writes instead are always allowed by the
        grammar, which still forces the given-back bytes.

        Returns:
            The leading part of ``ids`` to splice (maybe empty).
        """
        kept = list(ids)
        given_back = b""
        while kept:
            spelled = self._token_bytes(kept[-1])
            if not spelled:
                break
            if given_back:
                crosses = self._some_token_starts_with(spelled + given_back[:1], proper=False)
            else:
                crosses = self._some_token_starts_with(spelled, proper=True)
            if not crosses:
                break
            given_back = spelled + given_back
            kept.pop()
        return kept

    def _some_token_starts_with(self, prefix: bytes, proper: bool) -> bool:
        """Whether a vocabulary token starts with ``prefix`` (and is longer, if ``proper``)."""
        spellings = self._spellings()
        i = bisect.bisect_left(spellings, prefix)
        while i < len(spellings) and spellings[i].startswith(prefix):
            if not proper or len(spellings[i]) > len(prefix):
                return True
            i += 1
        return False

    def _spellings(self) -> list[bytes]:
        if self._sorted_spellings is None:
            self._sorted_spellings = sorted({b for b in self.vocab.token_bytes if b})
        return self._sorted_spellings

    def _token_bytes(self, token_id: int | None) -> bytes | None:
        if token_id is None or not 0 <= token_id < self.vocab.size:
            return None
        return self.vocab.token_bytes[token_id]

    def _encode(self, text: str) -> list[int]:
        try:
            if self._backend is not None:  # the Rust tokenizer itself: ~10x less overhead
                return self._backend.encode(text, add_special_tokens=False).ids
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        except Exception:
            return []

    def _all_plain(self, ids: list[int]) -> bool:
        return all(0 <= t < self.vocab.size and self.vocab.token_bytes[t] for t in ids)

    def _after_newline(self, text: str, target: bytes) -> list[int] | None:
        """Encode after a newline, then drop it: defeats a SentencePiece dummy prefix."""
        ids = self._encode("\n" + text)
        spelled = b""
        for cut, token in enumerate(ids):
            if spelled in _PREFIXES:
                rest = ids[cut:]
                if self.vocab.decode_bytes(rest) == target and self._all_plain(rest):
                    return rest
            spelled += self._token_bytes(token) or b"\0"
            if len(spelled) > 2:
                break
        return None

    def _bytewise(self, target: bytes) -> list[int] | None:
        ids = [self.vocab.byte_token_ids[b] for b in target]
        return None if any(t < 0 for t in ids) else ids
