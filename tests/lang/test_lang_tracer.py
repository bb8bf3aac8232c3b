"""Tracing programs into request graphs, and compiled runs that hoist shared prefixes."""

from __future__ import annotations

import re

import radixlm_lang as rl


@rl.function
def pipeline(s, question):
    s += rl.system("You answer briefly.")
    s += rl.user("Q: " + question)
    s += rl.assistant(rl.gen("answer", max_tokens=8))
    s += "Summary of " + s["answer"] + ":" + rl.gen("summary", max_tokens=4)
    forks = s.fork(2)
    forks += " Think step by step."
    forks[0] += " A:" + rl.gen("thought", max_tokens=3)
    forks[1] += " B:" + rl.select("thought", ["yes", "no"])
    forks.join("gather")
    s += " Final:" + rl.gen("final", max_tokens=2)


def kinds(graph):
    return [n.kind for n in graph.nodes]


def test_graph_has_every_kind_of_node_and_edge(scripted):
    graph = pipeline.trace(question="Why?", backend=scripted)
    assert graph.error is None
    assert {"text", "role", "gen", "select", "fork", "join"} <= set(kinds(graph))
    assert {e.kind for e in graph.edges} == {"text", "var", "fork", "join"}
    by_name = {n.name: n for n in graph.nodes if n.kind == "gen"}
    # The text that quotes the answer depends on the gen that produced it.
    uses = [e for e in graph.edges if e.kind == "var" and e.src == by_name["answer"].id]
    assert len(uses) == 1 and "{answer}" in graph.nodes[uses[0].dst].label
    fork = next(n for n in graph.nodes if n.kind == "fork")
    join = next(n for n in graph.nodes if n.kind == "join")
    assert len([e for e in graph.edges if e.src == fork.id and e.kind == "fork"]) == 2
    assert len([e for e in graph.edges if e.dst == join.id and e.kind == "join"]) == 2
    # After a gather join, the gathered variable is produced by the join node.
    final_prompt_nodes = graph.stream_nodes(())
    assert final_prompt_nodes[-1].name == "final"


def test_every_edge_points_forward_between_existing_nodes(scripted):
    graph = pipeline.trace(question="Why?", backend=scripted)
    ids = {n.id for n in graph.nodes}
    for edge in graph.edges:
        assert edge.src in ids and edge.dst in ids and edge.src < edge.dst


def test_constant_prefix_is_the_first_prompt_actually_sent(scripted):
    graph = pipeline.trace(question="Why?", backend=scripted)
    state = pipeline.run(question="Why?", backend=scripted)
    assert state.error() is None
    first_prompt = next(p for kind, p, _ in scripted.requests if kind == "generate")
    assert graph.constant_prefix() == first_prompt


def test_fork_prefix_is_the_constant_text_all_branches_begin_with(scripted):
    graph = pipeline.trace(question="Why?", backend=scripted)
    assert graph.fork_prefixes() == {((), 0): " Think step by step."}


def test_exports(scripted):
    graph = pipeline.trace(question="Why?", backend=scripted)
    dot = graph.to_dot()
    assert dot.startswith("digraph") and dot.rstrip().endswith("}")
    assert len(re.findall(r"^\s+n\d+ \[label=", dot, re.M)) == len(graph.nodes)
    assert len(re.findall(r"->", dot)) == len(graph.edges)
    mermaid = graph.to_mermaid().splitlines()
    assert mermaid[0] == "flowchart TD"
    assert len(mermaid) == 1 + len(graph.nodes) + len(graph.edges)
    summary = str(graph)
    assert summary.startswith(f"RequestGraph: {len(graph.nodes)} nodes")
    assert "select" in summary and "fork 2" in summary


def test_roles_stay_symbolic_without_a_backend():
    graph = pipeline.trace(question="Why?")
    roles = [n for n in graph.nodes if n.kind == "role"]
    assert roles and all(n.text is None for n in roles)
    assert graph.constant_prefix() == ""


def test_trace_stops_where_the_program_needs_a_real_value():
    @rl.function
    def counting(s):
        s += "How many? " + rl.gen("n", max_tokens=2)
        for _ in range(int(s["n"])):
            s += rl.gen("item")

    graph = counting.trace()
    assert isinstance(graph.error, TypeError) and "'n'" in str(graph.error)
    assert kinds(graph) == ["text", "gen"]
    assert "tracing stopped" in graph.summary()


def test_compiled_run_sends_fork_prefix_with_the_parent_text(scripted):
    state = pipeline.compile().run(question="Why?", backend=scripted)
    assert state.error() is None
    warmed = [p for kind, p, _ in scripted.requests if kind == "cache_prefix"]
    assert len(warmed) == 1 and warmed[0].endswith(" Think step by step.")
    branch_prompts = [p for kind, p, _ in scripted.requests[-3:-1]]
    assert all(p.startswith(warmed[0]) for p in branch_prompts)


@rl.function
def few_shot(s, question):
    s += "You are a careful assistant. Here are solved examples.\n"
    for i in range(5):
        s += f"Q: example question {i}?\nA: example answer {i}.\n"
    s += "Q: " + question + "\nA:" + rl.gen("answer", max_tokens=4, stop="\n")


def test_compiled_batch_sends_the_shared_prefix_once_first(scripted):
    questions = ["alpha?", "beta?", "gamma?", "a different one?"]
    states = few_shot.compile().run_batch(
        [{"question": q} for q in questions], backend=scripted, progress_bar=False
    )
    assert all(s.error() is None for s in states)
    first_kind, shared, _ = scripted.requests[0]
    prompts = [p for kind, p, _ in scripted.requests if kind == "generate"]
    assert first_kind == "cache_prefix" and len(prompts) == 4
    assert shared.endswith("A: example answer 4.\nQ:")  # cut before the diverging words
    assert all(p.startswith(shared) for p in prompts)
    # The same answers as the uncompiled program.
    plain = few_shot.run_batch([{"question": q} for q in questions], backend=scripted,
                               progress_bar=False)  # fmt: skip
    assert [s["answer"] for s in plain] == [s["answer"] for s in states]


def test_compiled_program_with_data_dependent_control_flow_still_runs(make_scripted):
    backend = make_scripted(complete=lambda prompt, n: "2")

    @rl.function
    def counting(s):
        s += "How many? " + rl.gen("n", max_tokens=2)
        for i in range(int(s["n"])):
            s += f" item{i}:" + rl.gen(f"item{i}", max_tokens=1)

    state = counting.compile().run(backend=backend)
    assert state.error() is None and state["item1"] == "2"


def test_hoistable_prefix_cuts_at_word_boundaries():
    from radixlm_lang.graph import hoistable_prefix

    assert hoistable_prefix(["Q: alpha", "Q: a b"]) == "Q:"
    assert hoistable_prefix(["ab cd", "ab ce"]) == "ab"
    assert hoistable_prefix(["x\ny", "x\nz"]) == "x\n"
    assert hoistable_prefix(["same text", "same text"]) == "same text"
    assert hoistable_prefix(["ab", "ab cd"]) == "ab"
