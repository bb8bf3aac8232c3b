"""The default backend: outlines-core ``Index`` for structure, our own walker for strings.

A grammar state is a small set of *configurations* (usually one):

- ``(s, -1, 0, 0)``: structural, at DFA state ``s`` of the token index;
- ``(s, k, phase, chars)``: inside the content of string slot ``k`` that starts at ``s``, at a
  phase of the string-content automaton, ``chars`` characters in (saturated at the bound that
  still matters);
- ``(s, k, (phase, node), chars)``: inside key slot ``k``, ``node`` tracking which declared
  names the key still spells (the closing quote is refused on a declared name);
- ``(s, k, jstate, 0)``: inside value slot ``k`` (any JSON value), at pushdown state ``jstate``.

Tokens that stay within one regime are one table lookup (the index's token transition, or the
content tables); only tokens that cross a string boundary mid-token (``", "a``) are walked byte by
byte. The allowed-token mask is computed once per configuration and once per state and cached as
a packed int32 tensor, so the hot path copies a cached row.
"""

from __future__ import annotations

import json
import pickle
import threading
from typing import Any

import numpy as np
import torch

from radixlm.constrained import jsonvalue
from radixlm.constrained.base import Grammar, GrammarMatcher
from radixlm.constrained.content import EXIT, QUOTE, ContentTables, N, step
from radixlm.constrained.index_build import FakeIds, IndexPayload
from radixlm.constrained.json_schema import SLOT_BASE, SLOT_RADIX
from radixlm.constrained.retokenize import Retokenizer
from radixlm.constrained.vocab import TokenVocab, build_token_vocab

STRUCT = -1
EOS_MARK = -1
_MAX_CACHED_MASKS = 8192
_MAX_FORCED_BYTES = 256

Config = tuple[int, int, int, int]


class TokenizerInfo:
    """Per-tokenizer tables shared by every grammar one compiler builds.

    Args:
        tokenizer: the Hugging Face tokenizer.
        vocab_size: the model's logits width (>= the tokenizer's size); masks are this wide.
        eos_token_ids: ids allowed where a grammar is complete; default the tokenizer's EOS.
    """

    def __init__(self, tokenizer: Any, vocab_size: int | None = None,
                 eos_token_ids: list[int] | None = None):
        self.tokenizer = tokenizer
        self.vocab: TokenVocab = build_token_vocab(tokenizer, eos_token_ids)
        self.vocab_size = max(vocab_size or 0, self.vocab.size)
        self.words = -(-self.vocab_size // 32)
        self.fake = FakeIds(self.vocab_size)
        self.retokenizer = Retokenizer(tokenizer, self.vocab)
        self.byte_token = np.array(self.vocab.byte_token_ids, dtype=np.int64)
        self.first_byte = self.vocab.first_bytes()
        self.second_byte = np.array([b[1] if b and len(b) > 1 else -1
                                     for b in self.vocab.token_bytes], dtype=np.int16)
        self.eos_ids = frozenset(t for t in self.vocab.eos_token_ids if t < self.vocab_size)
        self._eos_bits = self.pack_ids(np.array(sorted(self.eos_ids), dtype=np.int64))
        has_quote = np.array([bool(b) and QUOTE in b for b in self.vocab.token_bytes])
        self.has_quote = has_quote
        self.crossing = np.array([bool(b) and QUOTE in b[:-1] for b in self.vocab.token_bytes])
        self.crossing_ids = np.nonzero(self.crossing)[0]
        self._content: ContentTables | None = None
        self._value_entries: dict[tuple[str, str], np.ndarray] = {}
        self._exit_rests: dict[int, tuple] = {}
        self._lock = threading.RLock()

    @property
    def content(self) -> ContentTables:
        """Per-token string-content tables (built on first use, ~0.3 s for 128k tokens)."""
        with self._lock:
            if self._content is None:
                self._content = ContentTables.build(self.vocab.token_bytes)
            return self._content

    def exit_rests(self, phase: int) -> tuple[np.ndarray, np.ndarray, list[bytes]]:
        """Tokens that close a string from content ``phase``: (ids, index of what follows the
        content -- the quote and after -- in ``rests``, rests)."""
        with self._lock:
            found = self._exit_rests.get(phase)
            if found is None:
                found = self._build_exit_rests(phase)
                self._exit_rests[phase] = found
            return found

    def _build_exit_rests(self, phase: int) -> tuple[np.ndarray, np.ndarray, list[bytes]]:
        tables = self.content
        ids = np.nonzero(tables.end[phase] == EXIT)[0]
        index: dict[bytes, int] = {}
        rest_of = np.array([index.setdefault(self.vocab.token_bytes[t][tables.exit_at[phase, t]:],
                                             len(index)) for t in ids], dtype=np.int64)
        return ids, rest_of, list(index)

    def value_entry_tokens(self, separators: tuple[str, str]) -> np.ndarray:
        """Tokens that may enter a value slot mid-token: a byte that can precede a value slot
        (the end of a separator, or ``[``) before their last byte."""
        with self._lock:
            found = self._value_entries.get(separators)
            if found is None:
                entry = {sep.encode()[-1] for sep in separators if sep} | {ord("[")}
                found = np.array([bool(b) and bool(entry.intersection(b[:-1]))
                                  for b in self.vocab.token_bytes])
                self._value_entries[separators] = found
            return found

    @property
    def eos_bits(self) -> torch.Tensor:
        return self._eos_bits

    def pack_bool(self, allowed: np.ndarray) -> torch.Tensor:
        """Packed int32 [words] from a bool array over (a prefix of) the token ids."""
        bits = np.zeros(self.words * 32, dtype=bool)
        bits[: allowed.shape[0]] = allowed
        return torch.from_numpy(np.packbits(bits, bitorder="little").view("<i4").copy())

    def pack_ids(self, ids: np.ndarray) -> torch.Tensor:
        """Packed int32 [words] with the bits of ``ids`` set."""
        bits = np.zeros(self.words * 32, dtype=bool)
        ids = ids[(ids >= 0) & (ids < self.vocab.size)]
        bits[ids] = True
        return torch.from_numpy(np.packbits(bits, bitorder="little").view("<i4").copy())


class _State:
    """One interned grammar state and its lazily computed facts."""

    __slots__ = ("configs", "final", "mask", "forced", "more")

    def __init__(self, configs: frozenset, final: bool):
        self.configs = configs
        self.final = final
        self.mask: torch.Tensor | None = None
        self.forced: int | None | bool = False  # False = not computed yet
        self.more: bool | None = None


class _KeyTrie:
    """The canonical spellings of declared property names, for key slots to avoid."""

    def __init__(self, names: tuple[str, ...]):
        self.children: list[dict[int, int]] = [{}]
        self.terminal: list[bool] = [False]
        for name in names:
            node = 0
            for byte in json.dumps(name, ensure_ascii=False)[1:-1].encode():
                nxt = self.children[node].get(byte)
                if nxt is None:
                    nxt = len(self.children)
                    self.children[node][byte] = nxt
                    self.children.append({})
                    self.terminal.append(False)
                node = nxt
            self.terminal[node] = True

    def step(self, node: int, byte: int) -> int:
        """The node after ``byte`` (-1 once the key left every declared name)."""
        return -1 if node < 0 else self.children[node].get(byte, -1)

    def walk(self, node: int, data: bytes) -> int:
        for byte in data:
            node = self.step(node, byte)
            if node < 0:
                return -1
        return node

    def excluded(self, node: int) -> bool:
        return node >= 0 and self.terminal[node]


class OutlinesGrammar(Grammar):
    """A compiled constraint over an outlines-core index plus slots.

    Args:
        info: the compiler's per-tokenizer tables.
        payload: the worker's output (regex, slots, pickled index).
    """

    def __init__(self, info: TokenizerInfo, payload: IndexPayload):
        self.info = info
        self.kind = payload.kind
        self.regex = payload.regex
        self.relaxed = payload.relaxed
        self.slots = payload.slots
        self.has_value_slots = any(slot[0] == "value" for slot in self.slots)
        self._tries = {k: _KeyTrie(slot[3]) for k, slot in enumerate(self.slots)
                       if slot[0] == "key"}
        item_sep, key_sep = payload.separators
        self._walker = jsonvalue.JsonValueWalker(item_sep.encode(), key_sep.encode())
        self._enters_value = info.value_entry_tokens(payload.separators) \
            if self.has_value_slots else None
        self.vocab_size = info.vocab_size
        self.index = pickle.loads(payload.index_bytes)
        self._lock = threading.RLock()
        self._state_ids: dict[frozenset, int] = {}
        self._states: list[_State] = []
        self._slot_starts: dict[int, tuple[tuple[int, int], ...]] = {}
        self._slot_exits: dict[tuple[int, int], int] = {}
        self._config_masks: dict[tuple, torch.Tensor] = {}
        self._cached_states: list[_State] = []
        self._quote_token = int(info.byte_token[QUOTE])
        first = self.index.get_next_state(self.index.get_initial_state(), info.fake.start)
        if first is None:
            raise ValueError("index has no start transition")
        self.initial_state = self._intern(frozenset(self._canonical(first)))

    def matcher(self) -> OutlinesMatcher:
        return OutlinesMatcher(self)

    @property
    def num_states(self) -> int:
        """States interned so far (each has at most one cached mask)."""
        return len(self._states)

    # ---- states ----

    def _intern(self, configs: frozenset) -> int:
        with self._lock:
            sid = self._state_ids.get(configs)
            if sid is None:
                final = any(k == STRUCT and self.index.get_next_state(s, self.info.fake.end)
                            is not None for s, k, _, _ in configs)
                sid = len(self._states)
                self._states.append(_State(configs, final))
                self._state_ids[configs] = sid
            return sid

    def _canonical(self, s: int) -> list[Config]:
        out: list[Config] = [(s, STRUCT, 0, 0)]
        for k, _after in self._slots_at(s):
            kind = self.slots[k][0]
            start = jsonvalue.START if kind == "value" else (N, 0) if kind == "key" else N
            out.append((s, k, start, 0))
        return out

    def _slots_at(self, s: int) -> tuple[tuple[int, int], ...]:
        """(slot, state after the slot) for every slot that may start at ``s``."""
        found = self._slot_starts.get(s)
        if found is None:
            fake = self.info.fake
            entries = []
            for first in range(SLOT_RADIX):
                mid = self.index.get_next_state(s, fake.byte(SLOT_BASE + first))
                if mid is None:
                    continue
                for second in range(SLOT_RADIX):
                    after = self.index.get_next_state(mid, fake.byte(SLOT_BASE + second))
                    if after is not None:
                        k = first * SLOT_RADIX + second
                        entries.append((k, after))
                        self._slot_exits[(s, k)] = after
            found = tuple(entries)
            self._slot_starts[s] = found
        return found

    def is_final(self, sid: int) -> bool:
        return self._states[sid].final

    def advance(self, sid: int, token_id: int) -> int | None:
        """The state after ``token_id`` (not EOS), or None if the grammar rejects it."""
        if not 0 <= token_id < self.info.vocab.size or not self.info.vocab.token_bytes[token_id]:
            return None
        result: set[Config] = set()
        for config in self._states[sid].configs:
            result.update(self._step_token(config, token_id))
        return self._intern(frozenset(result)) if result else None

    def advance_bytes(self, sid: int, data: bytes) -> int | None:
        """The state after raw bytes (jump-forward walks forced bytes this way)."""
        configs = self._walk(self._states[sid].configs, data)
        return self._intern(configs) if configs else None

    # ---- transitions ----

    def _step_token(self, config: Config, tid: int) -> list[Config] | frozenset:
        s, k, phase, chars = config
        info = self.info
        if k == STRUCT:
            if info.crossing[tid] or self.has_value_slots:
                return self._walk((config,), info.vocab.token_bytes[tid])
            nxt = self.index.get_next_state(s, tid)
            return self._canonical(nxt) if nxt is not None else []
        kind = self.slots[k][0]
        if kind == "value":
            return self._walk((config,), info.vocab.token_bytes[tid])
        tables = info.content
        content_phase = phase[0] if kind == "key" else phase
        end = int(tables.end[content_phase, tid])
        if end >= 0:
            counted = self._count(k, chars + int(tables.chars[content_phase, tid]), end)
            if counted is None:
                return []
            if kind == "key":
                node = self._tries[k].walk(phase[1], info.vocab.token_bytes[tid])
                return [(s, k, (end, node), counted)]
            return [(s, k, end, counted)]
        if end == EXIT:
            return self._walk((config,), info.vocab.token_bytes[tid])
        return []

    def _count(self, k: int, chars: int, phase: int) -> int | None:
        """Characters so far, or None past the bound. A phase other than N is inside a
        character (an escape or a UTF-8 sequence) that counts once complete, so it must fit
        too: otherwise the walk reaches a state where nothing at all is allowed."""
        _kind, low, high, _names = self.slots[k]
        if high is not None:
            return chars if chars + int(phase != N) <= high else None
        return min(chars, low)

    def _walk(self, configs, data: bytes) -> frozenset:
        current = set(configs)
        for byte in data:
            following: set[Config] = set()
            for config in current:
                following.update(self._step_byte(config, byte))
            if not following:
                return frozenset()
            current = following
        return frozenset(current)

    def _step_byte(self, config: Config, byte: int) -> list[Config]:
        s, k, phase, chars = config
        if k == STRUCT:
            token = int(self.info.byte_token[byte])
            nxt = self.index.get_next_state(s, token) if token >= 0 else None
            return self._canonical(nxt) if nxt is not None else []
        kind = self.slots[k][0]
        if kind == "value":
            return self._step_value(s, k, phase, byte)
        content_phase = phase[0] if kind == "key" else phase
        after, completed = step(content_phase, byte)
        if after == EXIT:
            if kind == "key" and self._tries[k].excluded(phase[1]):
                return []
            return self._close_slot(s, k, chars)
        if after < 0:
            return []
        counted = self._count(k, chars + completed, after)
        if counted is None:
            return []
        if kind == "key":
            return [(s, k, (after, self._tries[k].step(phase[1], byte)), counted)]
        return [(s, k, after, counted)]

    def _close_slot(self, s: int, k: int, chars: int) -> list[Config]:
        if chars < self.slots[k][1]:
            return []
        past = self._slot_exits.get((s, k))
        closed = None if past is None else self.index.get_next_state(past, self._quote_token)
        return self._canonical(closed) if closed is not None else []

    def _step_value(self, s: int, k: int, jstate, byte: int) -> list[Config]:
        after = self._walker.step(jstate, byte)
        if isinstance(after, tuple):
            return [(s, k, after, 0)]
        if after == jsonvalue.DEAD:
            return []
        past = self._slot_exits.get((s, k))
        if past is None:
            return []
        if after == jsonvalue.DONE_AFTER:
            return self._canonical(past)
        out: list[Config] = []
        for config in self._canonical(past):
            out.extend(self._step_byte(config, byte))
        return out

    # ---- masks ----

    def mask(self, sid: int) -> torch.Tensor:
        """The packed allowed-token mask of state ``sid`` (computed once, then cached)."""
        state = self._states[sid]
        if state.mask is None:
            with self._lock:
                if state.mask is None:
                    self._bound_cache()
                    parts = [self._config_mask(c) for c in state.configs]
                    if len(parts) == 1 and not state.final:
                        state.mask = parts[0]  # share the configuration's tensor
                    else:
                        packed = torch.zeros(self.info.words, dtype=torch.int32)
                        for part in parts:
                            packed |= part
                        if state.final:
                            packed |= self.info.eos_bits
                        state.mask = packed
                    self._cached_states.append(state)
        return state.mask

    def _bound_cache(self) -> None:
        """Forget every cached mask once too many are held (16 KB each at 128k tokens)."""
        if len(self._cached_states) + len(self._config_masks) < _MAX_CACHED_MASKS:
            return
        for state in self._cached_states:
            state.mask = None
        self._cached_states.clear()
        self._config_masks.clear()

    def _config_mask(self, config: Config) -> torch.Tensor:
        s, k, phase, chars = config
        kind = "struct" if k == STRUCT else self.slots[k][0]
        if kind == "struct":
            key: tuple = (s,)
        elif kind in ("value", "key"):
            key = (s, k, phase)
        else:
            _kind, low, high, _names = self.slots[k]
            budget = None if high is None else min(high - chars, 1 << 16)
            key = (s, k, phase, min(chars, low), budget)
        cached = self._config_masks.get(key)
        if cached is None:
            if kind == "struct":
                allowed = self._structural(config)
            elif kind == "value":
                allowed = self._in_value(config)
            else:
                allowed = self._in_content(config)
            cached = self.info.pack_bool(allowed)
            self._config_masks[key] = cached
        return cached

    def _structural(self, config: Config) -> np.ndarray:
        info = self.info
        allowed = np.zeros(info.vocab.size, dtype=bool)
        ids = np.fromiter(self.index.get_allowed_tokens(config[0]) or (), dtype=np.int64)
        allowed[ids[ids < info.vocab.size]] = True
        crossing = info.crossing
        if self.has_value_slots:
            crossing = crossing | self._enters_value
        crossing = crossing & ~allowed
        candidates = np.nonzero(crossing & self._prefix_filter(config))[0]
        self._walk_candidates(config, candidates, allowed)
        return allowed

    def _prefix_filter(self, config: Config) -> np.ndarray:
        """Tokens whose first two bytes the grammar allows from ``config`` (a cheap pre-filter
        before walking tokens one by one)."""
        info = self.info
        pairs = np.zeros((256, 257), dtype=bool)
        for first in range(256):
            after = self._step_byte(config, first)
            if not after:
                continue
            pairs[first, 256] = True
            for second in range(256):
                pairs[first, second] = any(self._step_byte(c, second) for c in after)
        first, second = info.first_byte, info.second_byte
        ok = first >= 0
        return ok & pairs[np.where(ok, first, 0), np.where(second >= 0, second, 256)]

    def _walk_candidates(self, config: Config, candidates: np.ndarray, allowed: np.ndarray
                         ) -> None:
        token_bytes = self.info.vocab.token_bytes
        for tid in candidates:
            if self._walk((config,), token_bytes[tid]):
                allowed[tid] = True

    def _in_value(self, config: Config) -> np.ndarray:
        info = self.info
        phase = self._walker.in_string(config[2])
        if phase is None:
            allowed = np.zeros(info.vocab.size, dtype=bool)
            self._walk_candidates(config, np.nonzero(self._prefix_filter(config))[0], allowed)
            return allowed
        allowed = info.content.end[phase] >= 0
        ids, rest_of, rests = info.exit_rests(phase)
        # every closing token hits the quote at phase N: walk each distinct "quote + rest" once
        s, k, (stack, mode, _phase), chars = config
        start = ((s, k, (stack, mode, N), chars),)
        rest_ok = np.array([bool(self._walk(start, rest)) for rest in rests], dtype=bool)
        allowed[ids[rest_ok[rest_of]]] = True
        return allowed

    def _in_content(self, config: Config) -> np.ndarray:
        _s, k, phase, chars = config
        kind, low, high, _names = self.slots[k]
        if kind == "key":
            phase = phase[0]
        tables = self.info.content
        end, added = tables.end[phase], tables.chars[phase]
        allowed = end >= 0
        if high is not None:
            unfinished = (end > N).astype(added.dtype)  # a character still being spelled
            allowed = allowed & (added + unfinished <= high - chars)
        allowed = allowed.copy()
        ids, rest_of, rests = self.info.exit_rests(phase)
        total = chars + added[ids]
        ok = (total >= low) & ((total <= high) if high is not None else True)
        if kind == "key":
            ok &= self._key_exit_ok(config, ids)
        after = self._slot_exits.get((_s, k))
        if after is None or not ok.any():
            return allowed
        # tokens closing the string differ only in what follows the quote: walk each distinct
        # continuation once from the state after the slot
        start = self._canonical(after)
        rest_ok = np.zeros(len(rests), dtype=bool)
        for r in np.unique(rest_of[ok]):
            rest_ok[r] = bool(self._walk(start, rests[r]))
        allowed[ids[ok & rest_ok[rest_of]]] = True
        return allowed

    def _key_exit_ok(self, config: Config, ids: np.ndarray) -> np.ndarray:
        """Exit tokens whose key text before the quote does not complete a declared name."""
        trie = self._tries[config[1]]
        node = config[2][1]
        token_bytes = self.info.vocab.token_bytes
        exit_at = self.info.content.exit_at[config[2][0]]
        return np.array([not trie.excluded(trie.walk(node, token_bytes[t][: exit_at[t]]))
                         for t in ids], dtype=bool)

    # ---- jump-forward ----

    def forced_byte(self, sid: int) -> int | None:
        """The only byte the grammar allows next from ``sid``, if exactly one (not at an end)."""
        state = self._states[sid]
        if state.forced is False:
            state.forced = None if state.final else self._single_next_byte(sid)
        return state.forced

    def _single_next_byte(self, sid: int) -> int | None:
        tokens = self.info.byte_token
        bits = np.unpackbits(self.mask(sid).numpy().view(np.uint8), bitorder="little")
        valid = [b for b in range(256) if tokens[b] >= 0 and bits[tokens[b]]]
        return valid[0] if len(valid) == 1 else None

    def has_continuation(self, sid: int) -> bool:
        """Whether any token other than EOS is allowed at ``sid``."""
        state = self._states[sid]
        if state.more is None:
            packed = self.mask(sid).clone()
            packed &= ~self.info.eos_bits
            state.more = bool(packed.any())
        return state.more


class OutlinesMatcher(GrammarMatcher):
    """Per-request state over an :class:`OutlinesGrammar`: a stack of state ids."""

    def __init__(self, grammar: OutlinesGrammar):
        self.grammar = grammar
        self.vocab_size = grammar.vocab_size
        self.retokenizer: Retokenizer = grammar.info.retokenizer
        self._history: list[int] = [grammar.initial_state]

    @property
    def num_accepted(self) -> int:
        return len(self._history) - 1

    @property
    def state_id(self) -> int:
        """The current grammar state id (masks are cached per (grammar, state id))."""
        return self._history[-1]

    def accept_token(self, token_id: int) -> bool:
        current = self._history[-1]
        if current == EOS_MARK:
            return False
        if token_id in self.grammar.info.eos_ids:
            if not self.grammar.is_final(current):
                return False
            self._history.append(EOS_MARK)
            return True
        nxt = self.grammar.advance(current, int(token_id))
        if nxt is None:
            return False
        self._history.append(nxt)
        return True

    def rollback(self, num_tokens: int) -> None:
        if num_tokens < 0 or num_tokens > self.num_accepted:
            raise ValueError(f"cannot roll back {num_tokens} of {self.num_accepted} tokens")
        if num_tokens:
            del self._history[-num_tokens:]

    def is_terminated(self) -> bool:
        current = self._history[-1]
        if current == EOS_MARK:
            return True
        return self.grammar.is_final(current) and not self.grammar.has_continuation(current)

    def is_complete(self) -> bool:
        current = self._history[-1]
        return current == EOS_MARK or self.grammar.is_final(current)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        current = self._history[-1]
        mask = self.grammar.info.eos_bits if current == EOS_MARK else self.grammar.mask(current)
        bitmask[row, : mask.shape[0]].copy_(mask)

    def jump_forward(self) -> str | None:
        current = self._history[-1]
        if current == EOS_MARK:
            return None
        forced = bytearray()
        while len(forced) < _MAX_FORCED_BYTES:
            byte = self.grammar.forced_byte(current)
            if byte is None:
                break
            forced.append(byte)
            nxt = self.grammar.advance_bytes(current, bytes([byte]))
            if nxt is None:
                break
            current = nxt
        return complete_utf8(bytes(forced))


def complete_utf8(data: bytes) -> str | None:
    """The longest prefix of ``data`` that is whole UTF-8 characters (None if empty or if
    ``data`` starts inside a character)."""
    for cut in range(len(data), max(len(data) - 4, -1), -1):
        try:
            text = data[:cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
        return text or None
    return None
