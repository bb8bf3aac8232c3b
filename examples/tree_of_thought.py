"""Tree of thought with nested forks: propose thoughts, expand each, judge, and gather.

Every fork first sends the shared text once, so all branches reuse it from the radix cache;
the branches of a fork run concurrently.

    radixlm serve --port 30000
    python examples/tree_of_thought.py --url http://127.0.0.1:30000
"""

from __future__ import annotations

import argparse

import radixlm_lang as rl

WIDTH, DEPTH_WIDTH = 3, 2


@rl.function
def tree_of_thought(s, problem):
    s += f"Problem: {problem}\nLet us think about it in several ways.\n"
    thoughts = s.fork(WIDTH)
    for i, thought in enumerate(thoughts):
        # Sampled, with a seed of its own per branch: one shared seed would make every branch
        # draw the same tokens from the same prefix (three identical approaches).
        thought += f"Approach {i + 1}:" + rl.gen("plan", max_tokens=24, stop="\n", seed=11 + i)
        thought += "\n"
        steps = thought.fork(DEPTH_WIDTH)  # a nested fork per approach
        for j, step in enumerate(steps):
            seed = 101 + 10 * i + j
            step += f"Step {j + 1}:" + rl.gen("step", max_tokens=16, stop="\n", seed=seed) + "\n"
            step += "Is this step sound? " + rl.select("sound", ["yes", "no"])
        steps.join("gather")
    thoughts.join("gather")
    s += "Best approach number: " + rl.select("best", [str(i + 1) for i in range(WIDTH)])


def main(url: str) -> dict:
    """Run the tree; return the gathered structure."""
    backend = rl.RuntimeEndpoint(url)
    state = tree_of_thought.run(problem="Plan a picnic for 20 people on a budget.",
                                backend=backend, temperature=0.8)
    if state.error() is not None:
        raise SystemExit(f"failed: {state.error()}")
    for i, (plan, steps, sound) in enumerate(zip(state["plan"], state["step"], state["sound"])):
        print(f"approach {i + 1}: {plan!r}")
        for step, verdict in zip(steps, sound):
            print(f"    step {step!r} sound={verdict}")
    print("best:", state["best"], state.get_meta_info("best")["scores"])
    print(tree_of_thought.trace(problem="...", backend=backend).to_mermaid())
    backend.shutdown()
    return {"plan": state["plan"], "step": state["step"], "best": state["best"]}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:30000")
    main(parser.parse_args().url)
