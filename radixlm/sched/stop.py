"""When a request stops: EOS, stop tokens, stop strings, length limits."""

from __future__ import annotations

from radixlm.request import FinishKind, FinishReason, Request


def check_finish(req: Request, token_id: int, limits) -> FinishReason | None:
    """The finish reason after ``token_id`` was appended to ``req.output_ids``, or None.

    Args:
        req: the request, its new token already appended.
        token_id: the token just sampled.
        limits: ``SchedulerLimits`` (eos ids, context length).
    """
    params = req.params
    if not params.ignore_eos and token_id in limits.eos_token_ids:
        return FinishReason(FinishKind.STOP, matched=token_id)
    if token_id in params.stop_token_ids:
        return FinishReason(FinishKind.STOP, matched=token_id)
    if req.stop_checker is not None:
        req.stop_checker.append([token_id])
        if req.stop_checker.stopped:
            return FinishReason(FinishKind.STOP, matched=req.stop_checker.matched_stop)
    if len(req.output_ids) >= params.max_new_tokens:
        return FinishReason(FinishKind.LENGTH)
    if req.seq_len >= limits.context_length:
        return FinishReason(FinishKind.LENGTH)
    return None
