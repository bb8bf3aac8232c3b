"""Few-shot question answering over a batch, plain and compiled (prefix hoisting).

The few-shot examples are the same for every question: compile() sends that shared prefix once
before the batch, so every request finds it in the radix cache.

    radixlm serve --port 30000
    python examples/few_shot_qa.py --url http://127.0.0.1:30000
"""

from __future__ import annotations

import argparse

import radixlm_lang as rl

EXAMPLES = [
    ("What is the capital of France?", "Paris."),
    ("How many legs does a spider have?", "Eight."),
    ("What gas do plants absorb?", "Carbon dioxide."),
    ("Who wrote Hamlet?", "William Shakespeare."),
]
QUESTIONS = [
    "What is the largest planet?",
    "What is the boiling point of water at sea level?",
    "Which ocean is the largest?",
    "What is the chemical symbol of gold?",
]


@rl.function
def few_shot_qa(s, question):
    s += "Answer each question in a few words.\n\n"
    for q, a in EXAMPLES:
        s += f"Q: {q}\nA: {a}\n\n"
    s += f"Q: {question}\nA:" + rl.gen("answer", max_tokens=16, stop="\n")


def main(url: str) -> dict:
    """Answer QUESTIONS twice (plain, compiled); return the cached-token counts."""
    backend = rl.RuntimeEndpoint(url)
    batch = [{"question": q} for q in QUESTIONS]
    plain = few_shot_qa.run_batch(batch, backend=backend, temperature=0)
    compiled = few_shot_qa.compile().run_batch(batch, backend=backend, temperature=0)
    for question, state in zip(QUESTIONS, compiled):
        if state.error() is not None:
            raise SystemExit(f"failed: {state.error()}")
        print(f"{question} -> {state['answer']!r}")
    cached = {
        name: [s.get_meta_info("answer")["cached_tokens"] for s in states]
        for name, states in (("plain", plain), ("compiled", compiled))
    }
    print("cached tokens per request:", cached)
    print(few_shot_qa.trace(question="...", backend=backend))
    backend.shutdown()
    return cached


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:30000")
    main(parser.parse_args().url)
