"""The scheduler: turns the waiting queue and the running set into one batch per step.

Each step is either an EXTEND (new requests and prefill chunks, reusing cached prefixes) or a
DECODE (one token for every running request). When both kinds of work exist they alternate, so
long prefills never starve decoding. Results come back through :meth:`Scheduler.process`.

With overlap scheduling (:mod:`radixlm.engine.overlap`) the next batch is built while a DECODE
batch is still in flight: ``schedule(in_flight=batch)``. A request with a row in that batch is
one token ahead of its ``output_ids``: its K/V slot for that token is already allocated, and its
next row feeds a placeholder (:func:`radixlm.batch.future_token`) that the executor replaces with
the token the in-flight row samples. Each row carries the request's ``epoch``; finishing,
aborting or retracting a request bumps it, so a result for a row scheduled before is dropped.

Constrained rows do not hold the next batch back: the batch's mask rows are assigned when it is
scheduled and filled (:meth:`Scheduler.bitmask_job`) after it is launched and the step before
it is processed. A request whose grammar forces text samples one more token, sits out the step
scheduled before that token is processed, then gets the forced text spliced in
(:mod:`radixlm.sched.grammar_state`). Its next decode row then feeds all the spliced tokens.
The batch stays a DECODE (the executor gives each spliced token a decode row of its own, see
:class:`radixlm.batch.ForwardBatch`), so jump-forward costs neither a prefill step nor the CUDA
graph; only a splice longer than ``MAX_DECODE_SPLICE_TOKENS`` makes the batch an EXTEND.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from radixlm.batch import ForwardMode, ScheduledBatch, ScheduledSeq, future_token
from radixlm.config import SchedulerConfig, prefill_budget
from radixlm.outputs import StepResult, TokenOutput
from radixlm.request import FinishKind, FinishReason, Request, RequestStatus
from radixlm.sched.kv_manager import KVManager
from radixlm.sched.policy import make_policy
from radixlm.sched.stop import check_finish
from radixlm.sched.telemetry import Telemetry

# A request deferred because it shares this many uncached tokens with a request already in the
# batch waits one step and then hits the cache instead of recomputing the shared part.
MIN_SHARED_TO_DEFER = 32
# Longest jump-forward splice a DECODE batch carries: each spliced token becomes a decode row
# that re-reads its sequence's K/V, which stays cheaper than an eager EXTEND step up to here.
MAX_DECODE_SPLICE_TOKENS = 32


@dataclass(frozen=True)
class SchedulerLimits:
    """Limits derived from the model and the pool, fixed at start-up."""

    max_running_requests: int
    context_length: int
    eos_token_ids: frozenset[int]


class Scheduler:
    """Continuous batching over a KV manager.

    Args:
        config: scheduling options.
        limits: capacity and model limits.
        kv: the KV manager (allocator + radix tree).
        grammar: constrained-decoding state (builds bitmasks, advances matchers), or None.
        make_stop_checker: returns a stop-string checker for a request, or None.
    """

    def __init__(
        self,
        config: SchedulerConfig,
        limits: SchedulerLimits,
        kv: KVManager,
        grammar=None,
        make_stop_checker: Callable[[Request], object] | None = None,
        seed: int = 0,
        telemetry: Telemetry | None = None,
    ):
        self.config = config
        self.limits = limits
        self.kv = kv
        self.grammar = grammar
        self.make_stop_checker = make_stop_checker
        self.order = make_policy(config.schedule_policy, seed)
        self.waiting: list[Request] = []
        self.prefilling: list[Request] = []
        self.running: list[Request] = []
        self.last_mode: ForwardMode | None = None
        self._pending_outputs: list[TokenOutput] = []
        # rids whose next processed token is followed by a jump-forward splice
        self._jump_after: set[str] = set()
        self.stats = {"prompt_tokens": 0, "cached_tokens": 0, "generated_tokens": 0,
                      "retractions": 0}
        self.telemetry = telemetry if telemetry is not None else Telemetry()

    # ---- queue ----------------------------------------------------------------------------

    def add(self, req: Request) -> None:
        if req.stop_checker is None and self.make_stop_checker is not None:
            req.stop_checker = self.make_stop_checker(req)
        if req.grammar_future is not None:
            req.status = RequestStatus.WAITING_GRAMMAR
            self.telemetry.on_compile_started(req.rid, req.params.constraint[0])
        self.waiting.append(req)

    def abort(self, rid: str, message: str = "aborted") -> TokenOutput | None:
        """Finish request ``rid`` wherever it is. Returns its final output, or None if unknown."""
        for queue in (self.waiting, self.prefilling, self.running):
            for req in queue:
                if req.rid == rid:
                    queue.remove(req)
                    return self._finish(req, FinishReason(FinishKind.ABORT, message=message))
        return None

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    def all_requests(self) -> list[Request]:
        return self.waiting + self.prefilling + self.running

    # ---- scheduling -----------------------------------------------------------------------

    def schedule(self, in_flight: ScheduledBatch | None = None) -> ScheduledBatch | None:
        """Build the next batch, or None when nothing can run now.

        Args:
            in_flight: a DECODE batch that was launched but not processed yet (overlap
                scheduling); its requests decode from placeholders for the tokens it samples.
                None when every launched batch has been processed.

        Returns:
            The batch, its KV slots allocated.
        """
        if in_flight is not None and not self._only_running_rows(in_flight):
            raise ValueError("only a batch of running requests can be in flight while scheduling")
        self._pending_outputs.extend(self._poll_grammars())
        want_extend = bool(self.prefilling or self._admissible())
        if want_extend and (not self.running or self.last_mode is not ForwardMode.EXTEND):
            batch = self._schedule_extend()
            if batch is not None:
                return self._finalize(batch)
        if self.running:
            batch = self._schedule_decode(self._future_rows(in_flight))
            if batch is None and (self.prefilling or self._admissible()):
                batch = self._schedule_extend()  # decode retracted everyone: prefill instead
            return self._finalize(batch)
        return None

    def take_pending_outputs(self) -> list[TokenOutput]:
        """Outputs produced outside a forward pass (failed grammar compiles)."""
        out, self._pending_outputs = self._pending_outputs, []
        return out

    def needs_results_before_next(self, batch: ScheduledBatch) -> bool:
        """Whether the batch after ``batch`` can only be built once ``batch`` is processed.

        True after an EXTEND with prefill rows (finished prefills move to the running set only
        when processed; an EXTEND of decodes carrying jump-forward tokens needs no drain),
        after a penalised row (its token counts need the sampled token) and when the next
        decode could only fit by retracting a request. Constrained rows need no drain: their
        masks are filled after the next batch is launched, and a jump-forward splice waits for
        a step its request sits out.
        """
        if batch.mode is not ForwardMode.DECODE and not self._only_running_rows(batch):
            return True
        if any(seq.params.has_penalties for seq in batch.seqs):
            return True
        spliced = sum(r.seq_len - r.num_computed - 1 for r in self.running)  # jump-forward
        if self.kv.page_size * len(self.running) + spliced <= self.kv.available_tokens():
            return False  # a page for every running request fits: no retraction (the usual case)
        future_rows = self._future_rows(batch)
        return self._decode_needs_retraction(self._decoders(future_rows), future_rows)

    def _only_running_rows(self, batch: ScheduledBatch) -> bool:
        """True for a DECODE batch, and for an EXTEND batch with no prefill row (decodes with
        jump-forward tokens): processing it moves no request to the running set."""
        if batch.mode is ForwardMode.DECODE:
            return True
        prefilling = {r.rid for r in self.prefilling}
        return not any(seq.rid in prefilling for seq in batch.seqs)

    def _finalize(self, batch: ScheduledBatch | None) -> ScheduledBatch | None:
        if batch is not None:
            self.last_mode = batch.mode
            self._record(batch)
            if self.grammar is not None:
                self.grammar.assign_mask_rows(batch, self._by_rid(batch))
        return batch

    def bitmask_job(self, batch: ScheduledBatch, bitmask) -> Callable[[], None]:
        """The fill of ``batch``'s constrained rows' masks (``bitmask_row``) from the grammars'
        current states, which must have taken every token sampled before the batch's.

        The rows' matchers are looked up now (from the scheduler's own lists); the returned
        call fills the masks from them. It touches only those matchers and ``bitmask``, so it
        may run on another thread while this one schedules, as long as no step is processed
        before it returns.

        Args:
            batch: a launched batch with ``num_mask_rows``.
            bitmask: the step's int32 ``[num_mask_rows, W]`` host buffer.

        Returns:
            The call that fills ``bitmask``.
        """
        index = self._active_by_rid()
        rows = []
        for seq in batch.seqs:
            if seq.bitmask_row is None:
                continue
            req = index.get(seq.rid)
            live = req is not None and req.epoch == seq.epoch and req.matcher is not None
            rows.append((seq.bitmask_row, req.matcher if live else None))
        grammar = self.grammar
        return lambda: grammar.fill_bitmask(bitmask, rows)

    def _record(self, batch: ScheduledBatch) -> None:
        tokens = prefills = 0
        for seq in batch.seqs:  # one pass: this runs every step
            n = len(seq.new_tokens)
            tokens += n
            # a row prefills when it runs several tokens or its request has produced nothing yet
            prefills += n > 1 or (not seq.output_ids and not seq.future_tokens)
        self.telemetry.on_batch(len(batch.seqs), tokens, prefills)

    def _admissible(self) -> bool:
        return any(r.status is RequestStatus.WAITING for r in self.waiting)

    def _poll_grammars(self) -> list[TokenOutput]:
        outputs = []
        for req in [r for r in self.waiting if r.status is RequestStatus.WAITING_GRAMMAR]:
            error = self.grammar.poll(req)
            if error is not None:
                self.telemetry.on_compile_finished(req.rid, ok=False)
                self.waiting.remove(req)
                outputs.append(self._finish(req, FinishReason(FinishKind.ABORT, message=error)))
            elif req.matcher is not None:
                self.telemetry.on_compile_finished(req.rid, ok=True)
                req.status = RequestStatus.WAITING
        return outputs

    def _active_count(self) -> int:
        return len(self.running) + len(self.prefilling)

    def _reserved_for_decode(self) -> int:
        """Slots admitted requests will still need: unprefilled chunks plus a share of output."""
        ratio = self.config.init_new_token_ratio
        output = sum(r.remaining_new_tokens for r in self.running + self.prefilling) * ratio
        chunks = sum(r.seq_len - r.num_computed for r in self.prefilling)
        return int(output) + chunks

    def _schedule_extend(self) -> ScheduledBatch | None:
        budget = prefill_budget(self.config)
        rows: list[ScheduledSeq] = []
        for req in list(self.prefilling):
            row = self._extend_row(req, budget)
            if row is None:
                break
            rows.append(row)
            budget -= len(row.new_tokens)
        admitted = self._admit(budget, rows)
        self.prefilling.extend(admitted)
        if not rows and self.prefilling and not self.running:
            # Partial prefills hold the pool and none can go on: requeue the newest (its
            # computed prefix stays cached) so the others can finish.
            self._requeue(max(self.prefilling, key=lambda r: r.arrival), self.prefilling)
            return self._schedule_extend()
        return ScheduledBatch(ForwardMode.EXTEND, rows) if rows else None

    def _admit(self, budget: int, rows: list[ScheduledSeq]) -> list[Request]:
        ready = [r for r in self.waiting if r.status is RequestStatus.WAITING]
        admitted: list[Request] = []
        for req in self.order(ready, self.kv.peek_prefix_len):
            full = self._active_count() + len(admitted) >= self.limits.max_running_requests
            if budget <= 0 or full:
                break
            prefix = self.kv.match(req)
            if self._shares_uncached(req, prefix, admitted):
                self._unmatch(req)
                continue
            nothing_running = not (self.running or self.prefilling or admitted)
            row = self._extend_row(req, budget, reserve=not nothing_running)
            if row is None:
                self._unmatch(req)
                break
            self._on_admitted(req, prefix)
            admitted.append(req)
            rows.append(row)
            budget -= len(row.new_tokens)
            if req.num_computed + len(row.new_tokens) < req.seq_len:
                break  # one request mid-prefill at a time keeps chunks from starving each other
        return admitted

    def _on_admitted(self, req: Request, prefix: int) -> None:
        self.waiting.remove(req)
        req.status = RequestStatus.RUNNING
        if req.cached_tokens is None:
            req.cached_tokens = prefix
            self.stats["prompt_tokens"] += len(req.input_ids)
            self.stats["cached_tokens"] += prefix
            self.telemetry.on_admitted(req.rid, req.input_ids, prefix, req.tree_node)

    def _unmatch(self, req: Request) -> None:
        self.kv.release(req)

    def _shares_uncached(self, req: Request, prefix: int, admitted: list[Request]) -> bool:
        """True when ``req`` would recompute a prefix another admitted request computes now."""
        if not self.kv.enabled or not admitted:
            return False
        seq = req.seq
        for other in admitted:
            shared = len(os.path.commonprefix([seq, other.seq]))
            if shared - prefix >= MIN_SHARED_TO_DEFER:
                return True
        return False

    def _extend_row(self, req: Request, budget: int, reserve: bool = False) -> ScheduledSeq | None:
        todo = req.seq_len - req.num_computed
        chunk = self.config.chunked_prefill_size or todo
        num_new = min(todo, chunk, budget)
        if num_new <= 0:
            return None
        need = self.kv.pages_for(req, num_new)
        extra = self._reserved_for_decode() + int(
            req.remaining_new_tokens * self.config.init_new_token_ratio) if reserve else 0
        if need + extra > self.kv.available_tokens() and need > 0:
            return None
        start = req.num_computed
        slots = self.kv.allocate(req, num_new)
        if slots is None:
            return None
        return self._row(req, req.seq[start : start + num_new], start)

    def _row(self, req: Request, new_tokens: list[int], start: int,
             future_tokens: int = 0) -> ScheduledSeq:
        end = start + len(new_tokens)
        completes = end == req.seq_len + future_tokens
        logits_from = None
        if req.logprob.wants_input_logprobs and not req.output_ids:
            first_row = max(req.logprob.logprob_start_len, 1) - 1
            if end - 1 >= first_row and first_row < len(req.input_ids) - 1:
                logits_from = max(first_row - start, 0)
        return ScheduledSeq(
            rid=req.rid,
            new_tokens=new_tokens,
            slots=req.kv_slots_until(end),
            sample=completes and req.remaining_new_tokens > future_tokens,
            params=req.params,
            prompt_ids=req.input_ids,
            output_ids=req.output_ids,
            logits_from=logits_from,
            return_logprob=req.logprob.return_logprob,
            top_logprobs_num=req.logprob.top_logprobs_num,
            future_tokens=future_tokens,
            epoch=req.epoch,
        )

    @staticmethod
    def _future_rows(in_flight: ScheduledBatch | None) -> dict[str, tuple[int, int, int]]:
        """rid -> (row, epoch, tokens the row computes) of the in-flight batch's sampling rows."""
        if in_flight is None:
            return {}
        return {s.rid: (i, s.epoch, len(s.new_tokens))
                for i, s in enumerate(in_flight.seqs) if s.sample}

    def _in_flight_row(self, req: Request, future_rows: dict[str, tuple[int, int, int]]
                       ) -> tuple[int, int] | None:
        """(row, tokens it computes) of the request's row in the in-flight batch, if that row
        will give it a token."""
        found = future_rows.get(req.rid)
        if found is None or found[1] != req.epoch:
            return None
        return found[0], found[2]

    def _decoders(self, future_rows: dict[str, tuple[int, int, int]]) -> list[Request]:
        """Running requests that take part in the next decode.

        A request whose in-flight token certainly ends it (its last allowed token, or the
        context is full) sits out: processing that token will finish it. So does one whose
        in-flight token is followed by a jump-forward splice.
        """
        out = []
        for req in self.running:
            if self._in_flight_row(req, future_rows) is not None and (
                    req.remaining_new_tokens <= 1
                    or req.seq_len + 1 >= self.limits.context_length
                    or req.rid in self._jump_after):
                continue
            out.append(req)
        return out

    def _schedule_decode(self, future_rows: dict[str, tuple[int, int, int]]
                         ) -> ScheduledBatch | None:
        """One row per decoder: the newest token, a placeholder for the in-flight one, or
        (after a jump-forward splice) every token not computed yet. A DECODE batch either way
        (no separate prefill step, no drain), unless a splice is too long to run as decode rows
        (see the module docstring)."""
        decoders = self._retract_until_fits(future_rows)
        spliced = [r for r in decoders if self._new_token_count(r, future_rows) > 1]
        for req in spliced:
            if self.kv.allocate(req, req.seq_len - req.num_computed) is None:
                raise RuntimeError("decode allocation failed after retraction made room")
        single = [r for r in decoders if r not in spliced] if spliced else decoders
        if not self.kv.allocate_decode(single):
            raise RuntimeError("decode allocation failed after retraction made room")
        rows = [self._decode_row(req, self._in_flight_row(req, future_rows)) for req in decoders]
        if not rows:
            return None
        too_long = any(self._new_token_count(r, future_rows) > MAX_DECODE_SPLICE_TOKENS
                       for r in spliced)  # fmt: skip
        return ScheduledBatch(ForwardMode.EXTEND if too_long else ForwardMode.DECODE, rows)

    def _new_token_count(self, req: Request, future_rows: dict[str, tuple[int, int, int]]
                         ) -> int:
        """Tokens the request's next decode row feeds."""
        if self._in_flight_row(req, future_rows) is not None:
            return 1
        return req.seq_len - req.num_computed

    def _decode_row(self, req: Request, in_flight: tuple[int, int] | None) -> ScheduledSeq:
        if in_flight is None:
            pending = req.seq_len - req.num_computed
            return self._row(req, req.output_ids[-pending:], req.num_computed)
        # The in-flight row computes the K/V of its tokens from position num_computed on and
        # samples the token that this row feeds right after them.
        row, computes = in_flight
        return self._row(req, [future_token(row)], req.num_computed + computes, future_tokens=1)

    def _decode_needs_retraction(self, decoders: list[Request],
                                 future_rows: dict[str, tuple[int, int, int]] | None = None
                                 ) -> bool:
        need = 0
        for req in decoders:
            count = self._new_token_count(req, future_rows or {})
            need += self.kv.pages_for(req, count)
        return need > self.kv.available_tokens()

    def _retract_until_fits(self, future_rows: dict[str, tuple[int, int, int]]) -> list[Request]:
        """Retract the newest requests until every remaining one has room for one token.

        A retracted request whose row is in flight loses that row's token (its epoch changes,
        so the result is dropped) and samples it again after its re-prefill.

        Returns:
            The requests of the next decode (:meth:`_decoders`), all of which fit.
        """
        decoders = self._decoders(future_rows)
        while decoders and self._decode_needs_retraction(decoders, future_rows):
            # Partial prefills hold slots too; the newest request goes first, whatever it does.
            victim = max(self.running + self.prefilling, key=lambda r: r.arrival)
            self._requeue(victim, self.running if victim in self.running else self.prefilling)
            decoders = self._decoders(future_rows)
        return decoders

    def _requeue(self, victim: Request, queue: list[Request]) -> None:
        """Retract: cache what ``victim`` computed, free the rest, put it first in line."""
        queue.remove(victim)
        self.kv.release(victim)
        victim.epoch += 1
        victim.status = RequestStatus.WAITING
        victim.num_retractions += 1
        self.stats["retractions"] += 1
        self.waiting.insert(0, victim)

    # ---- results --------------------------------------------------------------------------

    def _active_by_rid(self) -> dict[str, Request]:
        return {r.rid: r for r in self.prefilling + self.running}

    def _by_rid(self, batch: ScheduledBatch) -> list[Request]:
        index = self._active_by_rid()
        return [index[s.rid] for s in batch.seqs]

    def _live_rows(self, batch: ScheduledBatch):
        """(row index, request, row) of each row whose request still runs in the epoch it was
        scheduled in.

        Rows of requests that finished, were aborted or retracted after the batch was
        scheduled (possible while it was in flight) are skipped: their slots are already freed.
        """
        index = self._active_by_rid()
        for i, row in enumerate(batch.seqs):
            req = index.get(row.rid)
            if req is not None and req.epoch == row.epoch:
                yield i, req, row

    def process(self, batch: ScheduledBatch, result: StepResult) -> list[TokenOutput]:
        """Apply one step's results: advance requests, finish some, cache what they computed.

        Returns:
            One output per request that produced tokens or finished this step.
        """
        outputs = self.take_pending_outputs()
        for i, req, row in list(self._live_rows(batch)):
            res = result.seqs[i]
            req.num_computed += len(row.new_tokens)
            if res.input_logprobs:
                req.input_logprobs.extend(res.input_logprobs)
                req.input_top_logprobs.extend(res.input_top_logprobs)
            out = self._advance(req, row, res)
            if out is not None:
                outputs.append(out)
        return outputs

    def _advance(self, req: Request, row: ScheduledSeq, res) -> TokenOutput | None:
        in_prefill = req in self.prefilling
        if req.num_computed < req.seq_len:
            self.kv.cache_partial(req)
            return None
        if in_prefill:
            # Cache the prefill now, not at finish, so requests sharing it hit it next step.
            self.kv.cache_partial(req)
            self.prefilling.remove(req)
            self.running.append(req)
        if res.next_token_id is None:
            self.running.remove(req)
            out = self._finish(req, FinishReason(FinishKind.LENGTH))
            if req.logprob.wants_input_logprobs:
                out.input_logprobs, out.input_top_logprobs = self._input_logprobs(req)
            return out
        new_ids = [res.next_token_id]
        req.output_ids.append(res.next_token_id)
        self.stats["generated_tokens"] += 1
        finish = check_finish(req, res.next_token_id, self.limits)
        if finish is None and self.grammar is not None and req.matcher is not None:
            finish, new_ids = self._advance_grammar(req, res.next_token_id)
        out = self._output(req, new_ids, res)
        if finish is not None:
            self.running.remove(req)
            self._release(req, finish)
            out.finish = finish
        return out

    def _advance_grammar(self, req: Request, token: int) -> tuple[FinishReason | None, list[int]]:
        """Feed ``token`` to the request's grammar; splice forced text if this token was the
        one sampled after the grammar started forcing it. Returns (finish, appended ids)."""
        finish = self.grammar.accept(req, token)
        if finish is not None:
            self._jump_after.discard(req.rid)
            return finish, ([token] if finish.kind is FinishKind.STOP else [])
        new_ids = [token]
        if req.rid in self._jump_after:
            self._jump_after.discard(req.rid)
            finish, new_ids = self.grammar.jump_forward(req, token)
            if finish is None and new_ids != [token]:
                finish = self._stop_in_forced_text(req)
        if finish is None and len(req.output_ids) >= req.params.max_new_tokens:
            finish = FinishReason(FinishKind.LENGTH)
        if finish is None and self.grammar.forces_text(req):
            self._jump_after.add(req.rid)
        return finish, new_ids

    def _stop_in_forced_text(self, req: Request) -> FinishReason | None:
        """Stop strings inside jump-forward text, which the per-token check never saw.

        Jump-forward may also have rewritten the sampled token, so the checker restarts from
        the request's current output rather than appending to what it had seen.
        """
        if req.stop_checker is None or self.make_stop_checker is None:
            return None
        req.stop_checker = self.make_stop_checker(req)
        req.stop_checker.append(list(req.output_ids))
        if req.stop_checker.stopped:
            return FinishReason(FinishKind.STOP, matched=req.stop_checker.matched_stop)
        return None

    def _output(self, req: Request, new_ids: list[int], res) -> TokenOutput:
        out = TokenOutput(
            rid=req.rid, new_token_ids=new_ids, prompt_tokens=len(req.input_ids),
            cached_tokens=req.cached_tokens or 0, jump_forward_tokens=req.jump_forward_tokens)
        if req.logprob.return_logprob:
            # Tokens jump-forward spliced in were not sampled: they carry no logprob.
            sampled = bool(new_ids) and new_ids[0] == res.next_token_id
            out.output_logprobs = [(res.logprob if sampled and i == 0 else None, t)
                                   for i, t in enumerate(new_ids)]
            if req.logprob.top_logprobs_num:
                out.output_top_logprobs = [res.top_logprobs if sampled and i == 0 else []
                                           for i in range(len(new_ids))]
            if len(req.output_ids) == len(new_ids) and req.logprob.wants_input_logprobs:
                out.input_logprobs, out.input_top_logprobs = self._input_logprobs(req)
        return out

    def _input_logprobs(self, req: Request):
        start = max(req.logprob.logprob_start_len, 0)
        ids = req.input_ids[start:]
        values = list(req.input_logprobs)
        tops = list(req.input_top_logprobs) if req.logprob.top_logprobs_num else None
        if start == 0:
            values = [None] + values
            tops = [None] + tops if tops is not None else None
        pairs = list(zip(values, ids))
        return pairs, tops

    def _finish(self, req: Request, finish: FinishReason) -> TokenOutput:
        self._release(req, finish)
        return TokenOutput(rid=req.rid, new_token_ids=[], finish=finish,
                           prompt_tokens=len(req.input_ids), cached_tokens=req.cached_tokens or 0,
                           jump_forward_tokens=req.jump_forward_tokens)

    def _release(self, req: Request, finish: FinishReason) -> None:
        req.finish = finish
        self.telemetry.on_request_gone(req.rid)
        req.epoch += 1
        req.status = RequestStatus.FINISHED
        if req.tree_node is not None or req.num_computed or len(req.spare_slots):
            self.kv.release(req)
        if self.grammar is not None:
            self._jump_after.discard(req.rid)
            self.grammar.forget(req)
