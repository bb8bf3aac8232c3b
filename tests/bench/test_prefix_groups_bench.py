"""The prefix-group host benchmark at a small size: it finds the groups it built and reports."""

from __future__ import annotations

from radixlm.bench import prefix_groups as bench


def test_benchmark_finds_the_groups_it_built(capsys):
    code = bench.main(["--groups", "3", "--group-size", "4", "--shared-len", "40", "--own-len",
                       "5", "--min-shared", "16", "--repeats", "3"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "groups found as built: True" in out
    assert out.count("us median of 3") == 5


def test_slots_share_exactly_their_group_prefix():
    slots = bench.make_slots(2, 3, 10, 4, seed=1)
    assert len(slots) == 6 and all(len(s) == 14 for s in slots)
    assert all(slots[0][:10].equal(s[:10]) for s in slots[:3])
    assert not slots[0][:10].equal(slots[3][:10])
    assert len(set(slots[0][10:].tolist()) & set(slots[1][10:].tolist())) == 0
