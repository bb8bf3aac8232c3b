"""Log-probabilities of raw model logits (before temperature, penalties and filters)."""

from __future__ import annotations

import torch


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits)[i, token_ids[i]]``.

    Args:
        logits: [N, V] logits (any float dtype; computed in float32).
        token_ids: [N] int64 token ids.

    Returns:
        [N] float32 log-probabilities.
    """
    # One fused log_softmax kernel launches far fewer kernels than logsumexp (host-bound here).
    all_logprobs = torch.log_softmax(logits.float(), dim=-1)
    return all_logprobs.gather(1, token_ids.long()[:, None])[:, 0]


def input_token_logprobs(logits: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
    """Prompt logprobs: row ``i`` of ``logits`` scored against the token that followed it.

    Args:
        logits: [N, V] logits of N prompt positions.
        next_ids: [N] the prompt token at the following position of each row.

    Returns:
        [N] float32 log-probabilities.
    """
    return token_logprobs(logits, next_ids)


def top_logprobs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most likely tokens of every row and their log-probabilities.

    Args:
        logits: [N, V] logits.
        k: how many per row (clamped to V).

    Returns:
        (values [N, k] float32 in descending order, ids [N, k] int64).
    """
    all_logprobs = torch.log_softmax(logits.float(), dim=-1)
    return all_logprobs.topk(min(k, logits.shape[-1]), dim=-1)
