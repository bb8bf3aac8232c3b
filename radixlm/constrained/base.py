"""The backend protocol: a compiled grammar hands out per-request matchers.

A matcher is the per-request grammar state. The scheduler uses four calls per step:
``fill_bitmask`` (before sampling), ``accept_token`` (after), ``is_terminated`` and
``apply_jump_forward``; ``rollback`` undoes accepted tokens (retraction, jump-forward).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch

from radixlm.constrained.retokenize import Retokenizer


@dataclass(frozen=True)
class JumpForward:
    """A forced continuation spliced in without running the model.

    Attributes:
        text: the forced string the grammar allows as the only continuation.
        rollback: how many of the request's last output tokens to drop before appending
            (1 when the last sampled token merges with the forced text on re-tokenization).
        token_ids: the tokens to append after dropping them; the matcher already accepted them.
    """

    text: str
    rollback: int
    token_ids: tuple[int, ...]


class Grammar(ABC):
    """A compiled constraint; thread-safe to share between requests.

    Attributes:
        vocab_size: width of the masks (the model's logits width).
        relaxed: constraints of the spec the grammar does not enforce (accepts a superset).
        compile_cpu_s: CPU seconds the compilation took on its lane's thread (None when it ran
            in a worker process).
    """

    vocab_size: int
    relaxed: tuple[str, ...] = ()
    compile_cpu_s: float | None = None

    @abstractmethod
    def matcher(self) -> GrammarMatcher:
        """A fresh per-request matcher at the start of the grammar."""


class GrammarMatcher(ABC):
    """Per-request grammar state; not thread-safe (one request, one scheduler thread).

    Attributes:
        vocab_size: width of the masks (the model's logits width).
        retokenizer: re-tokenizes forced text for jump-forward.
    """

    vocab_size: int
    retokenizer: Retokenizer
    # True where fill_bitmasks computes a batch's masks in parallel itself (the caller then
    # hands it the whole batch at once instead of spreading rows over its own threads).
    fills_batches_in_parallel = False

    @classmethod
    def fill_bitmasks(cls, bitmask: torch.Tensor, rows: list[tuple[int, GrammarMatcher]]) -> None:
        """Fill several rows of ``bitmask``, each from its matcher (all of this class).

        Args:
            bitmask: int32 [B, W] contiguous CPU tensor (see :meth:`fill_bitmask`).
            rows: (row, matcher) pairs.
        """
        for row, matcher in rows:
            matcher.fill_bitmask(bitmask, row)

    @abstractmethod
    def accept_token(self, token_id: int) -> bool:
        """Advance by one sampled token.

        Args:
            token_id: the token. EOS is accepted only where the grammar is complete.

        Returns:
            False (and the state unchanged) if the grammar rejects the token.
        """

    @abstractmethod
    def rollback(self, num_tokens: int) -> None:
        """Undo the last ``num_tokens`` accepted tokens (an accepted EOS counts as one)."""

    @abstractmethod
    def is_terminated(self) -> bool:
        """True once EOS was accepted, or when the grammar is complete and allows nothing more."""

    @abstractmethod
    def is_complete(self) -> bool:
        """True where the output so far is a full match (EOS would be accepted)."""

    @abstractmethod
    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write this state's allowed-token mask into ``bitmask[row]``.

        Args:
            bitmask: int32 [B, ceil(vocab_size / 32)] on the CPU; bit ``i % 32`` of word
                ``i // 32`` set means token ``i`` is allowed.
            row: the row to overwrite.
        """

    @abstractmethod
    def jump_forward(self) -> str | None:
        """The longest string the grammar forces next (None if the next byte is not forced)."""

    @property
    @abstractmethod
    def num_accepted(self) -> int:
        """Tokens accepted so far (what ``rollback`` can undo)."""

    def accept_tokens(self, token_ids: list[int]) -> bool:
        """Accept all of ``token_ids`` or none of them (the state is unchanged on failure)."""
        for done, token in enumerate(token_ids):
            if not self.accept_token(token):
                self.rollback(done)
                return False
        return True

    def allowed_token_ids(self) -> list[int]:
        """Ids allowed next (EOS only where the grammar is complete); for tests and debugging."""
        words = -(-self.vocab_size // 32)
        mask = torch.zeros((1, words), dtype=torch.int32)
        self.fill_bitmask(mask, 0)
        bits = mask.view(torch.uint8).numpy().reshape(-1)
        ids = np.nonzero(np.unpackbits(bits, bitorder="little"))[0]
        return [int(i) for i in ids if i < self.vocab_size]

    def apply_jump_forward(self, last_token_id: int | None = None) -> JumpForward | None:
        """Splice the forced continuation in: compute it, re-tokenize, advance the matcher.

        The forced text (minus trailing spaces) is re-tokenized together with the last sampled
        token (the boundary),
        because a tokenizer would often merge them (``{`` + ``"name": "`` -> ``{"`` ...): the
        result is what the model would have seen had it produced the text itself. If the
        re-tokenized ids start with ``last_token_id`` it stays; otherwise the engine drops it
        (``rollback`` 1) and appends ``token_ids``. The matcher has already been rolled back
        and has accepted ``token_ids`` when this returns.

        Args:
            last_token_id: the request's last output token (already accepted), or None.

        Returns:
            The splice, or None when nothing is forced (the matcher is then unchanged).
        """
        # a trailing space is left to the model: tokenizers glue it to the next word (" 12",
        # ' "J'), so splicing it alone would leave an unnatural token boundary
        text = (self.jump_forward() or "").rstrip(" ")
        if not text:
            return None
        for rollback, ids in self.retokenizer.splice_candidates(text, last_token_id,
                                                                self.num_accepted):
            if rollback:
                self.rollback(rollback)
            if ids and self.accept_tokens(list(ids)):
                return JumpForward(text, rollback, tuple(ids))
            if rollback:
                restored = self.accept_token(int(last_token_id))
                assert restored, "re-accepting the rolled-back token must succeed"
        return None

