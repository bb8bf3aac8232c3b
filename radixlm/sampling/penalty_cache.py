"""Per-request penalty state kept on the device between steps.

Without it, every step re-sends each penalised request's whole prompt and output to the device
(one pass over every id in Python: milliseconds per step at batch 64 with long contexts). With
it, a request's prompt is sent once and each step adds only the tokens generated since the last
one. The executor owns one cache; nothing else holds per-request device state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from radixlm.transfer import int_tensor


@dataclass
class _Slot:
    index: int  # row of the cache tensors
    counted: int  # output tokens already added to the counts
    prompt_marked: bool  # prompt tokens already set in prompt_seen
    last_used: int  # build tick


class PenaltyCache:
    """Output-token counts and prompt-token presence per request, one cache row each.

    Rows idle for ``max_idle_steps`` gathers are recycled, so finished requests need no explicit
    release; a request whose output got shorter (it restarted) is recounted from scratch.
    """

    def __init__(self, vocab_size: int, device: torch.device | str, max_idle_steps: int = 64):
        """
        Args:
            vocab_size: logits width.
            device: where the logits live.
            max_idle_steps: gathers a request may miss before its row is recycled.
        """
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.max_idle_steps = max_idle_steps
        self._counts = torch.zeros(0, vocab_size, dtype=torch.float32, device=self.device)
        self._prompt_seen = torch.zeros(0, vocab_size, dtype=torch.bool, device=self.device)
        self._slots: dict[str, _Slot] = {}
        self._free: list[int] = []
        self._tick = 0

    def __len__(self) -> int:
        return len(self._slots)

    def gather(
        self,
        request_ids: Sequence[str],
        prompt_token_ids: Sequence[Sequence[int]],
        output_token_ids: Sequence[Sequence[int]],
        with_prompt: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Bring the requests' rows up to date and return them.

        Args:
            request_ids: one id per row (distinct).
            prompt_token_ids: each row's prompt (read once per request, if ``with_prompt``).
            output_token_ids: each row's generated tokens so far (append-only).
            with_prompt: also return prompt-or-output presence (for the repetition penalty).

        Returns:
            (counts [P, V] float32 of output tokens, seen [P, V] bool or None).
        """
        self._tick += 1
        pairs = zip(request_ids, output_token_ids, strict=True)
        slots = [self._slot(rid, len(output)) for rid, output in pairs]
        self._add_outputs(slots, output_token_ids)
        if with_prompt:
            self._mark_prompts(slots, prompt_token_ids)
        index = int_tensor([slot.index for slot in slots], self.device)
        counts = self._counts.index_select(0, index)
        seen = self._prompt_seen.index_select(0, index) | (counts > 0) if with_prompt else None
        self._recycle_idle()
        return counts, seen

    def _slot(self, rid: str, output_len: int) -> _Slot:
        slot = self._slots.get(rid)
        if slot is None or output_len < slot.counted:
            if slot is not None:
                self._free.append(slot.index)
            slot = _Slot(self._take_row(), counted=0, prompt_marked=False, last_used=self._tick)
            self._slots[rid] = slot
        slot.last_used = self._tick
        return slot

    def _take_row(self) -> int:
        """A zeroed cache row, growing the tensors (doubling) when none is free."""
        if not self._free:
            old = self._counts.shape[0]
            new = max(8, 2 * old)
            self._counts = _grown(self._counts, new)
            self._prompt_seen = _grown(self._prompt_seen, new)
            self._free.extend(range(new - 1, old - 1, -1))
        index = self._free.pop()
        self._counts[index].zero_()
        self._prompt_seen[index].zero_()
        return index

    def _add_outputs(self, slots: list[_Slot], outputs: Sequence[Sequence[int]]) -> None:
        rows, cols = [], []
        for slot, output in zip(slots, outputs, strict=True):
            new_tokens = output[slot.counted :]
            rows.extend([slot.index] * len(new_tokens))
            cols.extend(new_tokens)
            slot.counted = len(output)
        self._scatter(self._counts, rows, cols, accumulate=True)

    def _mark_prompts(self, slots: list[_Slot], prompts: Sequence[Sequence[int]]) -> None:
        rows, cols = [], []
        for slot, prompt in zip(slots, prompts, strict=True):
            if not slot.prompt_marked:
                rows.extend([slot.index] * len(prompt))
                cols.extend(prompt)
                slot.prompt_marked = True
        self._scatter(self._prompt_seen, rows, cols, accumulate=False)

    def _scatter(
        self, target: torch.Tensor, rows: list[int], cols: list[int], accumulate: bool
    ) -> None:
        kept = [(r, c) for r, c in zip(rows, cols, strict=True) if 0 <= c < self.vocab_size]
        if not kept:
            return
        rows_t = int_tensor([r for r, _ in kept], self.device)
        cols_t = int_tensor([c for _, c in kept], self.device)
        values = torch.ones(len(kept), dtype=target.dtype, device=self.device)
        target.index_put_((rows_t, cols_t), values, accumulate=accumulate)

    def _recycle_idle(self) -> None:
        oldest = self._tick - self.max_idle_steps
        idle = [rid for rid, slot in self._slots.items() if slot.last_used < oldest]
        for rid in idle:
            self._free.append(self._slots.pop(rid).index)


def _grown(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    bigger = torch.zeros(rows, tensor.shape[1], dtype=tensor.dtype, device=tensor.device)
    bigger[: tensor.shape[0]] = tensor
    return bigger
