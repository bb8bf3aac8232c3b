"""Quickstart: one chat turn, then the same program streamed.

Start a server first (no --model serves the default model, SmolLM2-135M-Instruct):

    radixlm serve --port 30000
    python examples/quickstart.py --url http://127.0.0.1:30000
"""

from __future__ import annotations

import argparse

import radixlm_lang as rl


@rl.function
def answer(s, question):
    s += rl.system("You are a terse assistant.")
    s += rl.user(question)
    s += rl.assistant(rl.gen("answer", max_tokens=32))


def main(url: str) -> dict:
    """Run the quickstart against the server at ``url``; return what it printed as data."""
    backend = rl.RuntimeEndpoint(url)
    state = answer.run(question="What is a radix tree?", backend=backend, temperature=0)
    if state.error() is not None:
        raise SystemExit(f"failed: {state.error()}")
    print("answer:", repr(state["answer"]))
    print("messages:", state.messages())
    print("meta_info:", state.get_meta_info("answer"))

    print("streamed: ", end="")
    streamed = answer.run(question="And a trie?", backend=backend, stream=True, temperature=0)
    for piece in streamed.text_iter("answer"):
        print(piece, end="", flush=True)
    print()
    backend.shutdown()
    return {"answer": state["answer"], "streamed": streamed["answer"]}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:30000")
    main(parser.parse_args().url)
