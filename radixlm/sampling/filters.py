"""Truncation of the sampling distribution: top-k, then top-p (nucleus), then min-p.

The order and the tie rules follow Hugging Face's warpers (TopK keeps every token tied with the
k-th, TopP keeps the smallest set of most likely tokens whose mass reaches top_p and at least one
token, MinP drops tokens below ``min_p * max_prob``), applied to temperature-scaled logits. Every
function works on all rows at once with per-row parameters; a row whose parameter disables the
filter is left untouched. Removed tokens get -inf.
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def top_k_mask(logits: torch.Tensor, top_k: torch.Tensor, k_max: int) -> torch.Tensor:
    """Tokens to remove: those strictly below each row's k-th largest logit.

    Args:
        logits: [B, V] float32.
        top_k: [B] int64, each row's k; rows with k >= V keep everything.
        k_max: the largest k of a row that filters (bounds the topk call).

    Returns:
        [B, V] bool mask of removed tokens.
    """
    vocab = logits.shape[-1]
    k_max = max(1, min(k_max, vocab))
    kth_index = (top_k.clamp(1, k_max) - 1)[:, None]
    kth_value = logits.topk(k_max, dim=-1).values.gather(1, kth_index)
    filters = (top_k < vocab)[:, None]
    return filters & (logits < kth_value)


def top_p_mask(logits: torch.Tensor, tail_mass: torch.Tensor) -> torch.Tensor:
    """Tokens to remove: outside the smallest most-likely set with probability mass >= top_p.

    Args:
        logits: [B, V] float32 (removed tokens already -inf).
        tail_mass: [B] float32 ``1 - top_p`` computed in float64 (as HF does), or a negative
            number in rows that keep everything.

    Returns:
        [B, V] bool mask of removed tokens; the most likely token is never removed.
    """
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    ascending_mass = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    # Ascending cumulative mass <= 1 - top_p is exactly the tail outside the nucleus.
    remove_sorted = ascending_mass <= tail_mass[:, None]
    remove_sorted[:, -1] = False
    return remove_sorted.scatter(1, order, remove_sorted)


def min_p_mask(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Tokens to remove: probability below ``min_p`` times the row's highest probability.

    Args:
        logits: [B, V] float32.
        min_p: [B] float32; rows with 0 keep everything.

    Returns:
        [B, V] bool mask of removed tokens; the most likely token is never removed.
    """
    probs = logits.softmax(dim=-1)
    threshold = min_p[:, None] * probs.amax(dim=-1, keepdim=True)
    return probs < threshold
