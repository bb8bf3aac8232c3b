"""Structured extraction: JSON that validates against a schema, and a regex-shaped field.

Constrained decoding masks every token the grammar rejects, so the output always parses; on the
default model (SmolLM2-135M-Instruct) the values are the ones in the text.

    radixlm serve --port 30000
    python examples/json_extraction.py --url http://127.0.0.1:30000
"""

from __future__ import annotations

import argparse
import json

import radixlm_lang as rl

PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"enum": ["Paris", "London", "Tokyo", "Lima"]},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
DATE_REGEX = r"20[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"


@rl.function
def extract(s, text):
    s += "Extract the person described in the text as JSON.\n"
    s += f"Text: {text}\nJSON: " + rl.gen("person", json_schema=PERSON_SCHEMA, max_tokens=96)
    s += "\nDate of the meeting (YYYY-MM-DD): " + rl.gen("date", regex=DATE_REGEX, max_tokens=16)
    s += "\nNumber of attendees: " + rl.gen("attendees", dtype=int, max_tokens=8)


def main(url: str) -> dict:
    """Extract from two texts; return the parsed records."""
    backend = rl.RuntimeEndpoint(url)
    texts = [
        "Ana, 34, flew in from Lima for the 2024-05-17 planning meeting with 12 colleagues.",
        "Tom (58) lives in London; the kickoff on 2025-01-09 had 40 people.",
    ]
    states = extract.run_batch([{"text": t} for t in texts], backend=backend, temperature=0)
    records = []
    for state in states:
        if state.error() is not None:
            raise SystemExit(f"failed: {state.error()}")
        person = json.loads(state["person"])
        record = {"person": person, "date": state["date"], "attendees": int(state["attendees"])}
        print(record)
        records.append(record)
    backend.shutdown()
    return {"records": records}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:30000")
    main(parser.parse_args().url)
