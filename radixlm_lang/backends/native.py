"""Shared logic of the backends that speak radixlm's native request shape.

The in-process engine and the HTTP server take the same request (``text`` or ``input_ids``,
``sampling_params``, ``return_logprob``, ``logprob_start_len``...) and return the same result
dict, so generation, prefix warming and choice scoring are written once here; subclasses only
move the request (a method call or an HTTP POST) and tokenize.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from radixlm_lang.backends.base import Backend, BackendError, Completion, Messages, StreamDelta
from radixlm_lang.choices import ChoiceLogprobs
from radixlm_lang.sampling import SamplingParams


class NativeBackend(Backend):
    """Base of EngineBackend and RuntimeEndpoint.

    Subclasses implement :meth:`call`, :meth:`call_stream`, :meth:`tokenize`,
    :meth:`token_texts`, :meth:`render_chat` and :attr:`bos_token_id`.
    """

    def call(self, request: dict[str, Any]) -> Any:
        """Send one native request; return its result dict (or list of them for a batch)."""
        raise NotImplementedError

    def call_stream(self, request: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Send one native streaming request; yield its chunk dicts."""
        raise NotImplementedError

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, exactly as a text prompt is tokenized (BOS included)."""
        raise NotImplementedError

    @property
    def bos_token_id(self) -> int | None:
        """The BOS id the tokenizer prepends to prompts, or None."""
        raise NotImplementedError

    # ---- Backend ----

    def generate(
        self, prompt: str, params: SamplingParams, messages: Messages | None = None
    ) -> Completion:
        result = self.call(native_request(prompt, params))
        return Completion(result["text"], result["meta_info"])

    def generate_samples(
        self, prompt: str, params: SamplingParams, messages: Messages | None = None
    ) -> list[Completion]:
        results = self.call(native_request(prompt, params))  # n > 1: one result per sample
        results = results if isinstance(results, list) else [results]
        return [Completion(r["text"], r["meta_info"]) for r in results]

    def generate_stream(
        self, prompt: str, params: SamplingParams, messages: Messages | None = None
    ) -> Iterator[StreamDelta]:
        request = native_request(prompt, params)
        request["stream"] = True
        sent = ""
        # Closing this generator early (a stop_regex matched) closes the request's stream,
        # which aborts it on the engine.
        with contextlib.closing(iter(self.call_stream(request))) as chunks:
            for chunk in chunks:
                delta = chunk.get("delta")
                if delta is None:  # cumulative text only: the new part is past what we sent
                    delta = chunk["text"][len(sent) :]
                sent += delta
                finished = chunk["meta_info"].get("finish_reason") is not None
                yield StreamDelta(delta, chunk["meta_info"] if finished else None)

    def cache_prefix(self, prompt: str) -> dict[str, Any]:
        return self.call(native_request(prompt, SamplingParams(max_new_tokens=0)))["meta_info"]

    def score_choices(
        self, prompt: str, choices: Sequence[str], unconditional: bool = False
    ) -> ChoiceLogprobs:
        prefix_ids, *full_ids = self.tokenize([prompt, *[prompt + c for c in choices]])
        # One request for the shared prefix so the cache holds it, then all choices at once.
        self.call({"input_ids": prefix_ids, "sampling_params": {"max_new_tokens": 0}})
        starts = [choice_start(prefix_ids, ids) for ids in full_ids]
        scored = self._input_logprobs(full_ids, starts)
        tokens = [tuple(ids[s:]) for ids, s in zip(full_ids, starts)]
        texts = iter(self.token_texts([t for row in tokens for t in row]))
        return ChoiceLogprobs(
            choices=tuple(choices),
            token_ids=tuple(tokens),
            token_logprobs=tuple(tuple(_defined(r, c)) for r, c in zip(scored, choices)),
            unconditional_logprobs=self._unconditional(tokens) if unconditional else None,
            token_texts=tuple(tuple(next(texts) for _ in row) for row in tokens),
        )

    # ---- helpers ----

    def _input_logprobs(self, batch: list[list[int]], starts: list[int]) -> list[list[Any]]:
        """Logprobs of positions ``starts[i]:`` of each sequence (one batched request)."""
        first = min(starts)
        results = self.call(
            {
                "input_ids": batch,
                "sampling_params": {"max_new_tokens": 0},
                "return_logprob": True,
                "logprob_start_len": first,
            }
        )
        out = []
        for result, start in zip(results, starts):
            entries = result["meta_info"]["input_token_logprobs"]
            out.append([entry[0] for entry in entries[start - first :]])
        return out

    def _unconditional(self, tokens: list[tuple[int, ...]]) -> tuple[tuple[float | None, ...], ...]:
        bos = self.bos_token_id
        lead = [] if bos is None else [bos]
        rows = self._input_logprobs([lead + list(t) for t in tokens], [len(lead)] * len(tokens))
        return tuple(tuple(row) for row in rows)


def native_request(prompt: str, params: SamplingParams) -> dict[str, Any]:
    """The native API request for continuing ``prompt`` with ``params``."""
    return {"text": prompt, "sampling_params": params.sampling_dict(), **params.request_dict()}


def choice_start(prefix_ids: list[int], full_ids: list[int]) -> int:
    """Where a choice's tokens begin in ``full_ids`` (the tokens of prefix + choice).

    Tokenizing prefix and choice together can merge tokens across the boundary, so the choice
    starts where the two token sequences first differ; at least one token is always scored and
    never the first one (it has no logprob).
    """
    shared = 0
    for a, b in zip(prefix_ids, full_ids):
        if a != b:
            break
        shared += 1
    return max(1, min(shared, len(full_ids) - 1))


def _defined(row: list[Any], choice: str) -> list[float]:
    if any(value is None for value in row):
        raise BackendError(f"the backend returned no logprob for a token of choice {choice!r}")
    return [float(value) for value in row]
