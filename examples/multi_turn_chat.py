"""Multi-turn chat: each turn continues the same conversation, rendered with the model's own
chat template; every turn's prompt extends the previous one, so the radix cache serves it.

    radixlm serve --port 30000
    python examples/multi_turn_chat.py --url http://127.0.0.1:30000
"""

from __future__ import annotations

import argparse

import radixlm_lang as rl

TURNS = [
    "Hi! Can you help me plan a trip?",
    "I like mountains and quiet places.",
    "What should I pack?",
]


@rl.function
def chat(s, turns):
    s += rl.system("You are a friendly travel assistant.")
    for i, turn in enumerate(turns):
        s += rl.user(turn)
        s += rl.assistant(rl.gen(f"reply{i}", max_tokens=24))


def main(url: str) -> dict:
    """Run the conversation; return the messages and cached tokens per turn."""
    backend = rl.RuntimeEndpoint(url)
    state = chat.run(turns=TURNS, backend=backend, temperature=0)
    if state.error() is not None:
        raise SystemExit(f"failed: {state.error()}")
    for message in state.messages():
        print(f"{message['role']:>9}: {message['content']!r}")
    cached = [state.get_meta_info(f"reply{i}")["cached_tokens"] for i in range(len(TURNS))]
    print("cached tokens per turn:", cached)
    backend.shutdown()
    return {"messages": state.messages(), "cached": cached}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:30000")
    main(parser.parse_args().url)
