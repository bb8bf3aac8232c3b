"""Incremental detokenization: generated token ids in, finished text out, one request at a time.

Decoding each token on its own is wrong twice over: a UTF-8 character may span several tokens
(byte-level BPE, SentencePiece byte fallback), and SentencePiece drops the "▁" space of the first
token it decodes. So every step decodes a short window ``ids[prefix_offset:]`` and compares it with
the decoding of ``ids[prefix_offset:read_offset]`` (tokens already turned into text): both start at
the same token, so the first-token rule cancels out and the difference is exactly the new text.
While the window's text ends in U+FFFD the character is incomplete and nothing is released.

Stop strings are matched on the released text, so a stop string spanning token boundaries is
found; text that could still become the start of a stop string is held back until it cannot.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from transformers import PreTrainedTokenizerBase

REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens decoded in front of the first generated token, so that token keeps its leading
# space under SentencePiece and an emoji split across the prompt boundary is not broken.
DEFAULT_CONTEXT_TOKENS = 5
# A UTF-8 character is at most 4 bytes, so at most 3 more ids reach its first byte; the rest is
# room for tokenizers that split a character's bytes unevenly.
MAX_CONTEXT_WIDEN = 8


class IncrementalDetokenizer:
    """Turns one request's generated tokens into text as they arrive.

    Example::

        detok = IncrementalDetokenizer(tokenizer, stop=["\\n\\n"], prompt_token_ids=prompt_ids)
        for ids in step_outputs:
            send(detok.append(ids))
            if detok.stopped:
                break
        send(detok.flush())
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        prompt_token_ids: Sequence[int] = (),
        context_tokens: int = DEFAULT_CONTEXT_TOKENS,
    ):
        """
        Args:
            tokenizer: the request's tokenizer.
            skip_special_tokens: leave special tokens (BOS, EOS, <|eot_id|>) out of the text.
            stop: strings that end the output; the matched string is not part of the text.
            prompt_token_ids: the prompt; its last ``context_tokens`` ids are decoded as context
                only (never returned), so the output reads as a continuation of the prompt.
                Without it the text equals ``tokenizer.decode(output_ids)``.
            context_tokens: how many prompt ids to use as context.
        """
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._stops = tuple(s for s in stop if s)
        self._ids: list[int] = self._context(prompt_token_ids, context_tokens)
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._prefix_text: str | None = None  # decode(ids[prefix:read]), cached between steps
        self._released = ""  # text finalised by the decoder (before stop-string hold-back)
        self._emitted = 0  # characters of _released already returned
        self._consumed = 0
        self.stopped = False
        self.matched_stop: str | None = None

    @property
    def text(self) -> str:
        """All text returned so far (by :meth:`append` and :meth:`flush`)."""
        return self._released[: self._emitted]

    @property
    def num_tokens_consumed(self) -> int:
        """Generated tokens taken in; tokens appended after a stop string matched are not."""
        return self._consumed

    def append(self, token_ids: Iterable[int]) -> str:
        """Take newly generated tokens.

        Args:
            token_ids: the tokens generated since the last call (one per decode step, or more
                after a jump-forward).

        Returns:
            Text that is now final: whole characters only, no partial stop string, nothing after
            a matched stop string. Empty once :attr:`stopped`.
        """
        for token_id in token_ids:
            if self.stopped:
                break
            self._consumed += 1
            self._ids.append(int(token_id))
            self._release(self._decode_new(final=False))
        return self._take()

    def flush(self) -> str:
        """End of the request: release everything held back.

        Returns:
            The rest of the text, including an incomplete trailing character (as U+FFFD) and
            text that was held back as a possible stop-string start.
        """
        if not self.stopped and self._read_offset < len(self._ids):
            self._release(self._decode_new(final=True))
        return self._take(hold_back=False)

    # -- decoding ---------------------------------------------------------------------------

    def _context(self, prompt_token_ids: Sequence[int], count: int) -> list[int]:
        """The last ``count`` prompt ids, widened back to a character boundary.

        A window that starts inside a character (byte-fallback or byte-level pieces) decodes to
        U+FFFD, which would also swallow SentencePiece's leading space of the first output
        token; starting up to MAX_CONTEXT_WIDEN ids earlier finds the character's first byte.
        A prompt that ends inside a character gives no clean context at all: decode without.
        """
        if count <= 0 or not prompt_token_ids:
            return []
        first = max(0, len(prompt_token_ids) - count)
        for start in range(first, max(0, first - MAX_CONTEXT_WIDEN) - 1, -1):
            context = [int(t) for t in prompt_token_ids[start:]]
            text = self._decode(context)
            # Some decoders turn a whole run of bytes after a stray one into U+FFFD: both ends.
            if not text.startswith(REPLACEMENT_CHAR) and not text.endswith(REPLACEMENT_CHAR):
                return context
        return []

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)

    def _decode_new(self, final: bool) -> str:
        """Text added by ids[read_offset:], or "" while it ends inside a character."""
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        window_text = self._decode(self._ids[self._prefix_offset :])
        incomplete = window_text.endswith(REPLACEMENT_CHAR) and not final
        if len(window_text) <= len(self._prefix_text) or incomplete:
            return ""
        new_text = window_text[len(self._prefix_text) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._prefix_text = None
        return new_text

    # -- stop strings -----------------------------------------------------------------------

    def _release(self, new_text: str) -> None:
        if not new_text:
            return
        searched_from = len(self._released)
        self._released += new_text
        if self._stops:
            self._match_stop(searched_from)

    def _match_stop(self, old_length: int) -> None:
        """Find the stop string that completes first in the text released since old_length.

        Matches ending inside older text were looked for earlier, so only a match that ends
        after old_length can be new. Among matches ending at the same place the longest wins,
        which cuts the most.
        """
        best: tuple[int, int, str] | None = None  # (end, -length, stop)
        for stop in self._stops:
            start = self._released.find(stop, max(0, old_length - len(stop) + 1))
            if start >= 0:
                candidate = (start + len(stop), -len(stop), stop)
                best = candidate if best is None else min(best, candidate)
        if best is not None:
            end, _, stop = best
            self._released = self._released[: end - len(stop)]
            self.stopped, self.matched_stop = True, stop

    def _take(self, hold_back: bool = True) -> str:
        """Return the releasable text not returned yet."""
        end = len(self._released)
        if hold_back and not self.stopped:
            end -= self._held_back()
        delta = self._released[self._emitted : end]
        self._emitted = max(self._emitted, end)
        return delta

    def _held_back(self) -> int:
        """Length of the longest unreturned suffix that is a proper prefix of a stop string."""
        pending = len(self._released) - self._emitted
        longest = min(pending, max((len(s) - 1 for s in self._stops), default=0))
        for size in range(longest, 0, -1):
            tail = self._released[-size:]
            if any(stop.startswith(tail) for stop in self._stops):
                return size
        return 0
