"""A pushdown walker for *any* JSON value: the value slot, kept out of the regex DFA.

A value the schema does not describe (``additionalProperties`` by default, ``{}``, ``true``,
``json_object`` mode) would otherwise be a depth-bounded copy of the whole JSON grammar in the
DFA, hundreds of states per use, each costing a pass over the vocabulary in the token index.
Walking it here costs nothing at compile time and bounds no depth.

A state is ``(stack, mode, sub)``: ``stack`` the open containers (``"o"``/``"a"``, innermost
last), ``mode`` what is expected next, ``sub`` the position inside it (string-content phase,
number phase, literal progress, separator progress). The serialization is canonical: the same
item and key separators as the schema compiler, no other whitespace.
"""

from __future__ import annotations

from radixlm.constrained import content

DEAD = -1
DONE_AFTER = -2
"""The value ended with this byte."""
DONE_BEFORE = -3
"""The value ended just before this byte (a number); the byte belongs to what follows."""

VALUE, VALUE_OR_CLOSE, KEY, KEY_OR_CLOSE, STRING, KEY_STRING, COLON, AFTER, NUMBER, LITERAL = (
    range(10))
_LITERALS = (b"true", b"false", b"null")
_LITERAL_START = {word[0]: i for i, word in enumerate(_LITERALS)}

# number phases: after "-", after a leading "0", integer digits, ".", fraction digits, "e",
# exponent sign, exponent digits
MINUS, ZERO, INT, DOT, FRAC, EXP, EXP_SIGN, EXP_DIGITS = range(8)
_COMPLETE_NUMBER = {ZERO, INT, FRAC, EXP_DIGITS}
_DIGITS = frozenset(b"0123456789")


def _number_next(phase: int, byte: int) -> int | None:
    digit = byte in _DIGITS
    if phase == MINUS:
        return ZERO if byte == 0x30 else INT if digit else None
    if phase in (ZERO, INT):
        if digit and phase == INT:
            return INT
        return DOT if byte == 0x2E else EXP if byte in (0x65, 0x45) else None
    if phase in (DOT, FRAC):
        if digit:
            return FRAC
        return EXP if phase == FRAC and byte in (0x65, 0x45) else None
    if phase in (EXP, EXP_SIGN):
        if digit:
            return EXP_DIGITS
        return EXP_SIGN if phase == EXP and byte in (0x2B, 0x2D) else None
    return EXP_DIGITS if digit else None


State = tuple[str, int, int]
START: State = ("", VALUE, 0)


class JsonValueWalker:
    """Steps the any-JSON-value automaton one byte at a time.

    Args:
        item_separator: bytes between array items / object members (``b", "``).
        key_separator: bytes between a key and its value (``b": "``).
    """

    def __init__(self, item_separator: bytes, key_separator: bytes):
        self.item_sep = item_separator
        self.key_sep = key_separator

    def step(self, state: State, byte: int) -> State | int:
        """The state after ``byte``, or DEAD, DONE_AFTER, DONE_BEFORE."""
        stack, mode, sub = state
        if mode in (VALUE, VALUE_OR_CLOSE):
            if mode == VALUE_OR_CLOSE and byte == 0x5D:
                return self._finish(stack[:-1])
            return self._start_value(stack, byte)
        if mode in (KEY, KEY_OR_CLOSE):
            if mode == KEY_OR_CLOSE and byte == 0x7D:
                return self._finish(stack[:-1])
            return (stack, KEY_STRING, content.N) if byte == 0x22 else DEAD
        if mode in (STRING, KEY_STRING):
            return self._string(stack, mode, sub, byte)
        if mode == COLON:
            return self._literal_step(stack, mode, sub, byte, self.key_sep, (stack, VALUE, 0))
        if mode == AFTER:
            return self._after(stack, sub, byte)
        if mode == NUMBER:
            return self._number(stack, sub, byte)
        return self._literal(stack, sub, byte)

    def _start_value(self, stack: str, byte: int) -> State | int:
        if byte == 0x22:
            return (stack, STRING, content.N)
        if byte == 0x7B:
            return (stack + "o", KEY_OR_CLOSE, 0)
        if byte == 0x5B:
            return (stack + "a", VALUE_OR_CLOSE, 0)
        if byte == 0x2D:
            return (stack, NUMBER, MINUS)
        if byte in _DIGITS:
            return (stack, NUMBER, ZERO if byte == 0x30 else INT)
        if byte in _LITERAL_START:
            return (stack, LITERAL, _LITERAL_START[byte] * 8 + 1)
        return DEAD

    def _string(self, stack: str, mode: int, phase: int, byte: int) -> State | int:
        after, _ = content.step(phase, byte)
        if after == content.EXIT:
            return (stack, COLON, 0) if mode == KEY_STRING else self._finish(stack)
        return DEAD if after < 0 else (stack, mode, after)

    def _literal_step(self, stack, mode, sub, byte, text: bytes, done: State) -> State | int:
        if byte != text[sub]:
            return DEAD
        return done if sub + 1 == len(text) else (stack, mode, sub + 1)

    def _after(self, stack: str, sub: int, byte: int) -> State | int:
        closer = 0x7D if stack[-1] == "o" else 0x5D
        if sub == 0 and byte == closer:
            return self._finish(stack[:-1])
        following = (stack, VALUE, 0) if stack[-1] == "a" else (stack, KEY, 0)
        return self._literal_step(stack, AFTER, sub, byte, self.item_sep, following)

    def _number(self, stack: str, phase: int, byte: int) -> State | int:
        nxt = _number_next(phase, byte)
        if nxt is not None:
            return (stack, NUMBER, nxt)
        if phase not in _COMPLETE_NUMBER:
            return DEAD
        if not stack:
            return DONE_BEFORE
        return self._after(stack, 0, byte)

    def _literal(self, stack: str, sub: int, byte: int) -> State | int:
        word = _LITERALS[sub // 8]
        position = sub % 8
        if byte != word[position]:
            return DEAD
        return self._finish(stack) if position + 1 == len(word) else (stack, LITERAL, sub + 1)

    @staticmethod
    def _finish(stack: str) -> State | int:
        return DONE_AFTER if not stack else (stack, AFTER, 0)

    @staticmethod
    def in_string(state: State) -> int | None:
        """The string-content phase if ``state`` is inside a string, else None."""
        return state[2] if state[1] in (STRING, KEY_STRING) else None
