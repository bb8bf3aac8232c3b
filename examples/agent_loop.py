"""An agent loop with tool calls: the model picks a tool, writes its input under a grammar,
the program runs the tool in Python and feeds the observation back, until the model says done.

    radixlm serve --port 30000
    python examples/agent_loop.py --url http://127.0.0.1:30000
"""

from __future__ import annotations

import argparse
import ast
import operator

import radixlm_lang as rl

FACTS = {
    "speed of light": "299792 km/s",
    "height of Everest": "8849 m",
    "boiling point of water": "100 C",
}
# Up to three integers joined by + - *: the grammar guarantees the calculator can parse it.
EXPRESSION = r"[1-9][0-9]{0,2}( [-+*] [1-9][0-9]{0,2}){1,2}"
MAX_STEPS = 3


def calculator(expression: str) -> str:
    """Evaluate integer + - * arithmetic without eval()."""
    ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}

    def value(node):
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            return ops[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        raise ValueError(f"unsupported expression {expression!r}")

    return str(value(ast.parse(expression, mode="eval").body))


@rl.function
def agent(s, task):
    s += rl.system("You solve tasks with tools: calculator (arithmetic) and lookup (facts).")
    s += rl.user(task)
    for step in range(MAX_STEPS):
        with s.assistant():
            s += "Thought:" + rl.gen(f"thought{step}", max_tokens=16, stop="\n") + "\n"
            s += "Tool: " + rl.select(f"tool{step}", ["calculator", "lookup"]) + "\n"
            if s[f"tool{step}"] == "calculator":
                s += "Input: " + rl.gen(f"input{step}", regex=EXPRESSION, max_tokens=24)
                observation = calculator(s[f"input{step}"])
            else:
                s += "Input: " + rl.select(f"input{step}", list(FACTS))
                observation = FACTS[s[f"input{step}"]]
        s += rl.user(f"Observation: {observation}\nAre you done?")
        s += rl.assistant(rl.select(f"done{step}", ["yes", "no"]))
        if s[f"done{step}"] == "yes":
            break
    s += rl.assistant("Final answer:" + rl.gen("answer", max_tokens=24, stop="\n"))


def main(url: str) -> dict:
    """Run the agent; return its tool calls."""
    backend = rl.RuntimeEndpoint(url)
    state = agent.run(task="What is 17 * 23 + 4, and how tall is Everest?", backend=backend,
                      temperature=0)
    if state.error() is not None:
        raise SystemExit(f"failed: {state.error()}")
    calls = []
    for step in range(MAX_STEPS):
        if f"tool{step}" not in state:
            break
        call = (state[f"tool{step}"], state[f"input{step}"])
        calls.append(call)
        print(f"step {step}: {call[0]}({call[1]!r}) done={state[f'done{step}']}")
    print("final answer:", repr(state["answer"]))
    backend.shutdown()
    return {"calls": calls, "answer": state["answer"]}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:30000")
    main(parser.parse_args().url)
