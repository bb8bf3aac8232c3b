"""How ``select`` turns the logprobs of each choice into a decision.

A backend scores every choice given the prefix and hands over, per choice, the logprob of each of
the choice's tokens (and, when the method asks for it, the same tokens scored without the prefix).
A method is a pure function of those numbers, so a test can recompute its pick independently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ChoiceLogprobs:
    """The scored tokens of every choice of one select.

    Attributes:
        choices: the choices, in order.
        token_ids: per choice, the token ids that were scored.
        token_logprobs: per choice, logprob of each token given the prefix (same length as ids).
        unconditional_logprobs: per choice, the same tokens scored without the prefix
            (None when the method did not ask for them; an entry is None where undefined,
            e.g. the first token of a model without a BOS token).
        token_texts: per choice, the text of each scored token (None if the backend has none).
    """

    choices: tuple[str, ...]
    token_ids: tuple[tuple[int, ...], ...]
    token_logprobs: tuple[tuple[float, ...], ...]
    unconditional_logprobs: tuple[tuple[float | None, ...], ...] | None = None
    token_texts: tuple[tuple[str, ...], ...] | None = None


@dataclass(frozen=True)
class ChoiceDecision:
    """The picked choice and the score each choice got."""

    index: int
    scores: tuple[float, ...]


class ChoicesMethod:
    """Base: subclasses implement :meth:`decide`."""

    name = "base"
    needs_unconditional = False

    def decide(self, scored: ChoiceLogprobs) -> ChoiceDecision:
        """Pick one choice.

        Args:
            scored: the logprobs of every choice's tokens.

        Returns:
            The index picked and one score per choice (higher is better).
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.name


class TokenLengthNormalized(ChoicesMethod):
    """Highest mean token logprob given the prefix (ties go to the earlier choice)."""

    name = "token_length_normalized"

    def decide(self, scored: ChoiceLogprobs) -> ChoiceDecision:
        scores = tuple(_mean(lps) for lps in scored.token_logprobs)
        return ChoiceDecision(_argmax(scores), scores)


class GreedyTokenSelection(ChoicesMethod):
    """The choice a greedy decoder would follow token by token.

    At each token position the remaining choices whose token there has the highest logprob
    survive; a choice that has run out of tokens competes with its mean logprob. Ties left at the
    end go to the earlier choice. The reported score of a choice is its mean logprob.
    """

    name = "greedy_token_selection"

    def decide(self, scored: ChoiceLogprobs) -> ChoiceDecision:
        rows = scored.token_logprobs
        alive = list(range(len(rows)))
        longest = max(len(r) for r in rows)
        for position in range(longest):
            values = {i: _value_at(rows[i], position) for i in alive}
            best = max(values.values())
            alive = [i for i in alive if values[i] == best]
            if len(alive) == 1:
                break
        scores = tuple(_mean(r) for r in rows)
        return ChoiceDecision(alive[0], scores)


class UnconditionalLikelihoodNormalized(ChoicesMethod):
    """Highest mean of (logprob given the prefix - logprob without it) over the choice's tokens.

    This discounts choices that are likely whatever the prefix says (a common word beats a rare
    one less easily). Tokens whose unconditional logprob is undefined count with their
    conditional logprob alone.
    """

    name = "unconditional_likelihood_normalized"
    needs_unconditional = True

    def decide(self, scored: ChoiceLogprobs) -> ChoiceDecision:
        if scored.unconditional_logprobs is None:
            raise ValueError(f"{self.name} needs the unconditional logprobs of the choices")
        scores = tuple(
            _mean([c - (u or 0.0) for c, u in zip(cond, uncond)])
            for cond, uncond in zip(scored.token_logprobs, scored.unconditional_logprobs)
        )
        return ChoiceDecision(_argmax(scores), scores)


token_length_normalized = TokenLengthNormalized()
greedy_token_selection = GreedyTokenSelection()
unconditional_likelihood_normalized = UnconditionalLikelihoodNormalized()


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else -math.inf


def _argmax(scores: tuple[float, ...]) -> int:
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def _value_at(row: tuple[float, ...], position: int) -> float:
    return row[position] if position < len(row) else _mean(row)
