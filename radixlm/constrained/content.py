"""The JSON string-content automaton that walks string *slots* outside the regex DFA.

A slot is free string content (any characters, optionally with a length bound). Spelling it in
the regex would give every string its own copy of a Unicode-wide DFA loop, and a bounded length
one copy per position, each state costing a walk over the whole vocabulary in the token index.
Instead the automaton below walks slot content byte by byte, counting characters, and per-token
tables (computed once per tokenizer, vectorised with numpy) give what a token does from each
phase: where it ends, how many characters it completes, or where it hits the closing quote.

Phases: N (between characters), E (after ``\\``), U4..U1 (hex digits of ``\\uXXXX`` left),
and the UTF-8 continuation phases (how many continuation bytes are left, with the narrower
first-continuation ranges after E0, ED, F0, F4).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PHASES = ("N", "E", "U4", "U3", "U2", "U1", "C1", "C2", "C3", "C2E0", "C2ED", "C3F0", "C3F4")
N, E, U4, U3, U2, U1, C1, C2, C3, C2E0, C2ED, C3F0, C3F4 = range(len(PHASES))
DEAD = -1
EXIT = -2
QUOTE = 0x22


def _transition_tables() -> tuple[np.ndarray, np.ndarray]:
    """``next[phase, byte]`` (a phase, DEAD or EXIT) and ``done[phase, byte]`` (0/1 chars)."""
    nxt = np.full((len(PHASES), 256), DEAD, dtype=np.int8)
    done = np.zeros((len(PHASES), 256), dtype=np.int8)

    def set_range(phase: int, lo: int, hi: int, to: int, completes: int = 0) -> None:
        nxt[phase, lo : hi + 1] = to
        done[phase, lo : hi + 1] = completes

    set_range(N, 0x20, 0x7F, N, 1)
    nxt[N, QUOTE] = EXIT
    done[N, QUOTE] = 0
    nxt[N, 0x5C] = E
    done[N, 0x5C] = 0
    set_range(N, 0xC2, 0xDF, C1)
    set_range(N, 0xE0, 0xE0, C2E0)
    set_range(N, 0xE1, 0xEC, C2)
    set_range(N, 0xED, 0xED, C2ED)
    set_range(N, 0xEE, 0xEF, C2)
    set_range(N, 0xF0, 0xF0, C3F0)
    set_range(N, 0xF1, 0xF3, C3)
    set_range(N, 0xF4, 0xF4, C3F4)
    for byte in b'"\\/bfnrt':
        nxt[E, byte], done[E, byte] = N, 1
    nxt[E, ord("u")] = U4
    for phase, after in ((U4, U3), (U3, U2), (U2, U1), (U1, N)):
        for byte in b"0123456789abcdefABCDEF":
            nxt[phase, byte], done[phase, byte] = after, int(after == N)
    set_range(C1, 0x80, 0xBF, N, 1)
    set_range(C2, 0x80, 0xBF, C1)
    set_range(C3, 0x80, 0xBF, C2)
    set_range(C2E0, 0xA0, 0xBF, C1)
    set_range(C2ED, 0x80, 0x9F, C1)
    set_range(C3F0, 0x90, 0xBF, C2)
    set_range(C3F4, 0x80, 0x8F, C2)
    return nxt, done


NEXT_PHASE, COMPLETES = _transition_tables()


@dataclass(frozen=True)
class ContentTables:
    """What every token does inside string content, from each start phase.

    Attributes:
        end: int8 [phases, V]: the phase after the token (DEAD, or EXIT if it closes the string).
        chars: int32 [phases, V]: characters the token completes inside the string.
        exit_at: int16 [phases, V]: byte offset of the closing quote (EXIT tokens), else -1.
    """

    end: np.ndarray
    chars: np.ndarray
    exit_at: np.ndarray

    @classmethod
    def build(cls, token_bytes: tuple[bytes | None, ...]) -> ContentTables:
        """Run the automaton over every token from every phase (vectorised over tokens)."""
        size = len(token_bytes)
        lengths = np.array([len(b) if b else 0 for b in token_bytes], dtype=np.int32)
        width = int(lengths.max()) if size else 0
        matrix = np.zeros((size, max(width, 1)), dtype=np.uint8)
        for tid, data in enumerate(token_bytes):
            if data:
                matrix[tid, : len(data)] = np.frombuffer(data, dtype=np.uint8)
        phases = len(PHASES)
        end = np.full((phases, size), DEAD, dtype=np.int8)
        chars = np.zeros((phases, size), dtype=np.int32)
        exit_at = np.full((phases, size), -1, dtype=np.int16)
        real = np.nonzero(lengths > 0)[0]
        for phase in range(phases):
            _run_phase(phase, matrix, lengths, real, end[phase], chars[phase], exit_at[phase])
        return cls(end, chars, exit_at)


def _run_phase(phase, matrix, lengths, real, end, chars, exit_at) -> None:
    state = np.full(len(real), phase, dtype=np.int8)
    live = np.arange(len(real))
    col = 0
    while live.size:
        tokens = real[live]
        done_now = lengths[tokens] <= col
        if done_now.any():
            end[tokens[done_now]] = state[live[done_now]]
            live = live[~done_now]
            tokens = real[live]
            if not live.size:
                break
        byte = matrix[tokens, col]
        current = state[live]
        chars[tokens] += COMPLETES[current, byte]
        after = NEXT_PHASE[current, byte]
        state[live] = after
        stopped = after < 0
        if stopped.any():
            end[tokens[stopped]] = after[stopped]
            exit_at[tokens[stopped & (after == EXIT)]] = col
            live = live[~stopped]
        col += 1


def step(phase: int, byte: int) -> tuple[int, int]:
    """One byte of string content: (next phase or DEAD/EXIT, characters completed)."""
    return int(NEXT_PHASE[phase, byte]), int(COMPLETES[phase, byte])
