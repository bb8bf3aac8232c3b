"""Scheduler-side constrained decoding: compile off the loop, fill masks, advance matchers.

Masks are filled after a step is launched, while the device runs its forward pass (see
:mod:`radixlm.engine.overlap`): llguidance takes the whole batch in one call and computes the
rows on its own threads without the GIL; other backends' rows are spread over a small pool.

Jump-forward waits one token: when the grammar forces text after a token, the request first
samples the next token itself under the mask (so the boundary between what it wrote and the
forced text is the model's own), and the rest of the forced text is spliced in when that token
is processed. Under overlap the request sits out the one step scheduled before then, so a splice
never invalidates a row already in flight; serial and overlapped loops splice at the same
tokens.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import torch

from radixlm.batch import ScheduledBatch
from radixlm.constrained import GrammarError
from radixlm.request import FinishKind, FinishReason, Request

# Below this many rows one thread fills the masks: handing rows to the pool costs more.
MIN_ROWS_PER_THREAD = 8
# A forced text this long (without trailing spaces) is worth a splice.
MIN_FORCED_CHARS = 2


class GrammarState:
    """Owns every constrained request's grammar future and matcher.

    Args:
        compiler: a ``radixlm.constrained.GrammarCompiler`` (compiles in its own workers).
        tokenizer: the model's tokenizer (jump-forward re-tokenizes forced text).
        enable_jump_forward: splice forced continuations without running the model.
        mask_threads: threads filling a batch's masks (default: one per core, up to 16).
    """

    def __init__(
        self, compiler, tokenizer, enable_jump_forward: bool = True, mask_threads: int | None = None
    ):
        self.compiler = compiler
        self.tokenizer = tokenizer
        self.enable_jump_forward = enable_jump_forward
        self.mask_threads = mask_threads or min(16, os.cpu_count() or 1)
        self._pool: ThreadPoolExecutor | None = None

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

    def assign_mask_rows(self, batch: ScheduledBatch, reqs: list[Request]) -> None:
        """Give each constrained sampling row its row of the step's bitmask (filled later by
        :meth:`fill_bitmask`); sets ``batch.num_mask_rows``."""
        n = 0
        for seq, req in zip(batch.seqs, reqs):
            if seq.sample and req.matcher is not None:
                seq.bitmask_row = n
                n += 1
        batch.num_mask_rows = n

    def fill_bitmask(self, bitmask: torch.Tensor, rows: list[tuple[int, object | None]]) -> None:
        """Fill mask rows from the matchers' current states, in parallel for large batches.

        Args:
            bitmask: int32 ``[R, W]`` contiguous host tensor.
            rows: (mask row, matcher); a None matcher (the row's result will be dropped: its
                request finished or was retracted after the batch was scheduled) allows all.
        """
        by_kind: dict[type, list] = {}
        for row, matcher in rows:
            if matcher is None:
                bitmask[row].fill_(-1)
            else:
                by_kind.setdefault(type(matcher), []).append((row, matcher))
        for kind, live in by_kind.items():
            threads = min(self.mask_threads, len(live) // MIN_ROWS_PER_THREAD)
            if kind.fills_batches_in_parallel or threads <= 1:
                kind.fill_bitmasks(bitmask, live)
                continue
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.mask_threads,
                                                thread_name_prefix="grammar-mask")  # fmt: skip
            chunks = [live[i::threads] for i in range(threads)]
            for done in [self._pool.submit(kind.fill_bitmasks, bitmask, c) for c in chunks]:
                done.result()

    def accept(self, req: Request, token_id: int) -> FinishReason | None:
        """Feed the sampled token (already appended to ``req.output_ids``) to the matcher.

        Returns:
            STOP when the grammar is complete, ABORT when it rejects the token, else None.
        """
        matcher = req.matcher
        if not matcher.accept_token(token_id):
            return FinishReason(FinishKind.ABORT, message=f"grammar rejected token {token_id}")
        if matcher.is_terminated():
            return FinishReason(FinishKind.STOP)
        return None

    def forces_text(self, req: Request) -> bool:
        """Whether the grammar now forces enough text for jump-forward to splice (after the
        request's next token, see the module docstring)."""
        if not self.enable_jump_forward:
            return False
        text = req.matcher.jump_forward()
        return text is not None and len(text.rstrip(" ")) >= MIN_FORCED_CHARS

    def jump_forward(self, req: Request, token_id: int) -> tuple[FinishReason | None, list[int]]:
        """Splice the forced continuation after ``token_id`` (the newest output token).

        Returns:
            STOP if the splice completed the grammar, else None; and the tokens this step
            appended: ``[token_id]`` plus the forced tokens, or only the forced tokens when
            re-tokenizing the boundary merged ``token_id`` into them (it was dropped).
        """
        new_ids = self._jump_forward(req, token_id)
        if req.matcher.is_terminated():
            return FinishReason(FinishKind.STOP), new_ids
        return None, new_ids

    def advance(self, req: Request, token_id: int) -> tuple[FinishReason | None, list[int]]:
        """:meth:`accept`, then splice whatever the grammar forces at once (for callers that
        do not defer jump-forward by a token).

        Returns:
            The finish reason (grammar complete, or token rejected) or None, and the tokens
            this step appended (see :meth:`jump_forward`).
        """
        finish = self.accept(req, token_id)
        if finish is not None:
            return finish, ([token_id] if finish.kind is FinishKind.STOP else [])
        if not self.enable_jump_forward:
            return None, [token_id]
        return self.jump_forward(req, token_id)

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
            del req.output_ids[-splice.rollback :]
        req.output_ids.extend(forced)
        req.jump_forward_tokens += len(forced)
        return forced if splice.rollback else [token_id, *forced]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
        self.compiler.close()

    def forget(self, req: Request) -> None:
        if req.grammar_future is not None:
            req.grammar_future.cancel()
        req.grammar_future = None
        req.matcher = None
