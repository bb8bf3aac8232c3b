"""Scheduler-side constrained decoding: compile off the loop, build masks, advance matchers."""

from __future__ import annotations

import torch

from radixlm.batch import ScheduledBatch
from radixlm.constrained import GrammarError, allocate_token_bitmask
from radixlm.request import FinishKind, FinishReason, Request


class GrammarState:
    """Owns every constrained request's grammar future and matcher.

    Args:
        compiler: a ``radixlm.constrained.GrammarCompiler`` (compiles in its own workers).
        tokenizer: the model's tokenizer (jump-forward re-tokenizes forced text).
        enable_jump_forward: splice forced continuations without running the model.
    """

    def __init__(self, compiler, tokenizer, enable_jump_forward: bool = True):
        self.compiler = compiler
        self.tokenizer = tokenizer
        self.enable_jump_forward = enable_jump_forward

    def submit(self, req: Request) -> None:
        """Start compiling the request's constraint, if it has one."""
        constraint = req.params.constraint
        if constraint is not None:
            req.grammar_future = self.compiler.submit(*constraint)

    def poll(self, req: Request) -> str | None:
        """Install the matcher once compiled. Returns an error message if compilation failed."""
        future = req.grammar_future
        if future is None or not future.done():
            return None
        req.grammar_future = None
        try:
            req.matcher = future.result().matcher()
        except GrammarError as exc:
            return f"invalid constraint: {exc}"
        except Exception as exc:  # a compile worker crash fails this request only
            return f"constraint compilation failed: {exc!r}"
        return None

    def build_bitmask(self, batch: ScheduledBatch, reqs: list[Request]) -> torch.Tensor | None:
        """One packed int32 row per constrained sampling row; sets each row's bitmask_row."""
        rows = [(seq, req) for seq, req in zip(batch.seqs, reqs)
                if seq.sample and req.matcher is not None]
        if not rows:
            return None
        bitmask = allocate_token_bitmask(len(rows), self.compiler.vocab_size)
        for i, (seq, req) in enumerate(rows):
            req.matcher.fill_bitmask(bitmask, i)
            seq.bitmask_row = i
        return bitmask

    def advance(self, req: Request, token_id: int) -> tuple[FinishReason | None, list[int]]:
        """Feed the sampled token (already appended to ``req.output_ids``) to the matcher.

        Returns:
            The finish reason (grammar complete, or token rejected) or None, and the tokens
            this step appended: ``[token_id]``, plus any jump-forward tokens (which may replace
            ``token_id`` when re-tokenizing the boundary merged it with the forced text).
        """
        matcher = req.matcher
        if not matcher.accept_token(token_id):
            return FinishReason(FinishKind.ABORT, message=f"grammar rejected token {token_id}"), []
        if matcher.is_terminated():
            return FinishReason(FinishKind.STOP), [token_id]
        new_ids = self._jump_forward(req, token_id) if self.enable_jump_forward else [token_id]
        if matcher.is_terminated():
            return FinishReason(FinishKind.STOP), new_ids
        return None, new_ids

    def _jump_forward(self, req: Request, token_id: int) -> list[int]:
        splice = req.matcher.apply_jump_forward(token_id)
        if splice is None:
            return [token_id]
        room = req.params.max_new_tokens - (len(req.output_ids) - splice.rollback)
        forced = list(splice.token_ids)
        if len(forced) > room:
            req.matcher.rollback(len(forced) - room)
            forced = forced[:room]
        if splice.rollback:
            del req.output_ids[-splice.rollback:]
        req.output_ids.extend(forced)
        req.jump_forward_tokens += len(forced)
        return forced if splice.rollback else [token_id, *forced]

    def close(self) -> None:
        self.compiler.close()

    def forget(self, req: Request) -> None:
        if req.grammar_future is not None:
            req.grammar_future.cancel()
        req.grammar_future = None
        req.matcher = None
