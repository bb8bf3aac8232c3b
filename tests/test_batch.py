"""ForwardBatch.build against a per-sequence reference, whatever form the slots come in."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from radixlm.batch import ForwardBatch, ForwardMode


def reference(new_tokens, seq_slots, logits_rows):
    """Every field of the batch, computed one sequence and one token at a time."""
    positions, out_loc, rows, qo, kv, flat = [], [], [], [0], [0], []
    for toks, slots, want in zip(new_tokens, seq_slots, logits_rows):
        n, total = len(toks), len(slots)
        positions += list(range(total - n, total))
        out_loc += list(slots[total - n :])
        rows += [qo[-1] + r for r in want]
        qo.append(qo[-1] + n)
        kv.append(kv[-1] + total)
        flat += list(slots)
    return {
        "input_ids": ([t for toks in new_tokens for t in toks], torch.int64),
        "positions": (positions, torch.int64),
        "out_cache_loc": (out_loc, torch.int64),
        "seq_lens": ([len(s) for s in seq_slots], torch.int32),
        "extend_lens": ([len(t) for t in new_tokens], torch.int32),
        "qo_indptr": (qo, torch.int32),
        "kv_indptr": (kv, torch.int32),
        "kv_indices": (flat, torch.int64),
        "logits_indices": (rows, torch.int64),
    }


@st.composite
def ragged_batches(draw):
    seqs = draw(st.lists(st.tuples(st.integers(1, 6), st.integers(0, 9)), min_size=1, max_size=6))
    new_tokens, seq_slots, logits_rows = [], [], []
    for new, cached in seqs:
        new_tokens.append(draw(st.lists(st.integers(-3, 999), min_size=new, max_size=new)))
        seq_slots.append(draw(st.lists(st.integers(1, 10**6), min_size=new + cached,
                                       max_size=new + cached)))
        logits_rows.append(sorted(draw(st.sets(st.integers(0, new - 1), min_size=1))))
    return new_tokens, seq_slots, logits_rows


@pytest.mark.parametrize("form", ["list", "numpy", "tensor"])
@settings(max_examples=40, deadline=None)
@given(batch=ragged_batches(), default_rows=st.booleans())
def test_build_matches_the_per_sequence_reference(form, batch, default_rows):
    new_tokens, seq_slots, logits_rows = batch
    if default_rows:
        logits_rows = [[len(t) - 1] for t in new_tokens]
    convert = {"list": list, "numpy": lambda s: np.array(s, dtype=np.int64),
               "tensor": lambda s: torch.tensor(s, dtype=torch.int64)}[form]
    built = ForwardBatch.build(new_tokens, [convert(s) for s in seq_slots],
                               logits_rows=None if default_rows else logits_rows)
    for name, (values, dtype) in reference(new_tokens, seq_slots, logits_rows).items():
        tensor = getattr(built, name)
        assert tensor.dtype == dtype, name
        assert tensor.tolist() == values, name
    assert built.seq_lens_cpu == [len(s) for s in seq_slots]
    assert built.extend_lens_cpu == [len(t) for t in new_tokens]
    decode = all(len(t) == 1 for t in new_tokens)
    assert built.mode is (ForwardMode.DECODE if decode else ForwardMode.EXTEND)


def test_build_never_aliases_the_callers_slots():
    slots = np.arange(10, 20, dtype=np.int64)
    built = ForwardBatch.build([[1]], [slots])
    built.kv_indices.fill_(0)
    built.out_cache_loc.fill_(0)
    assert slots.tolist() == list(range(10, 20))


def test_empty_batch():
    built = ForwardBatch.build([], [])
    assert built.batch_size == 0 and built.num_tokens == 0
    assert built.kv_indptr.tolist() == [0] and built.kv_indices.numel() == 0


@settings(max_examples=40, deadline=None)
@given(batch=ragged_batches())
def test_decode_mode_gives_each_new_token_a_row(batch):
    """DECODE with multi-token sequences: per-token arrays as in EXTEND, and row j of a
    sequence with p cached tokens lists that sequence's first p + j + 1 slots."""
    new_tokens, seq_slots, logits_rows = batch
    built = ForwardBatch.build(new_tokens, seq_slots, logits_rows=logits_rows,
                               mode=ForwardMode.DECODE)
    ref = reference(new_tokens, seq_slots, logits_rows)
    for name in ("input_ids", "positions", "out_cache_loc", "logits_indices"):
        assert getattr(built, name).tolist() == ref[name][0], name
    row_slots = [list(slots[: len(slots) - len(toks) + j + 1])
                 for toks, slots in zip(new_tokens, seq_slots) for j in range(len(toks))]
    kv_indptr = built.kv_indptr.tolist()
    assert built.kv_indices.tolist() == [s for row in row_slots for s in row]
    assert [b - a for a, b in zip(kv_indptr, kv_indptr[1:])] == [len(r) for r in row_slots]
    assert built.seq_lens.tolist() == built.seq_lens_cpu == [len(r) for r in row_slots]
    assert built.extend_lens_cpu == [1] * len(row_slots)
    assert built.qo_indptr.tolist() == list(range(len(row_slots) + 1))
    assert built.batch_size == built.num_tokens == len(row_slots)
