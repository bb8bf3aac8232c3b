"""The real server (``radixlm serve`` on 127.0.0.1) on the default model, SmolLM2-135M-Instruct:
the chat template against transformers' ``apply_chat_template``, and constrained extraction
with ``response_format`` on real weights."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

ROOT = Path(__file__).resolve().parents[2]

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are a pirate. Answer like one."},
        {"role": "user", "content": "How are you today?"},
    ],
    [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Name another one."},
    ],
    [{"role": "user", "content": "Écris une phrase sur la mer 🌊."}],
    [{"role": "user", "content": "def add(a, b):\n    return a + b\n\nWhat does this do?"}],
]

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
EXTRACTIONS = [
    ("John Smith is 42 years old and works as a plumber.", "John Smith", 42),
    ("Maria Garcia, aged 35, lives in Madrid.", "Maria Garcia", 35),
    ("The patient, Li Wei, is 67 years old.", "Li Wei", 67),
    ("Our new intern Tom Baker is 21 years old.", "Tom Baker", 21),
    ("Anna Muller is 29 years old and leads the design team.", "Anna Muller", 29),
    ("Robert Johnson, 54, ran his first marathon this year.", "Robert Johnson", 54),
    ("Priya Patel is a 38-year-old engineer.", "Priya Patel", 38),
    ("Meet Carlos Silva, who is 46 years old.", "Carlos Silva", 46),
    ("Emily Chen is 30 years old.", "Emily Chen", 30),
    ("Ahmed Hassan, 73, is a retired teacher.", "Ahmed Hassan", 73),
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(smollm2_gguf):
    """``radixlm serve --model <SmolLM2 GGUF>`` on a free port of 127.0.0.1, CPU, fp32."""
    port = _free_port()
    command = [
        sys.executable,
        "-m",
        "radixlm",
        "serve",
        "--model",
        str(smollm2_gguf),
        "--port",
        str(port),
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--kv-cache-tokens",
        "16384",
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not become healthy")
            time.sleep(0.5)
        with httpx.Client(base_url=url, timeout=300) as client:
            yield client
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_chat_template_ids_equal_transformers(server, smollm2_hf_tokenizer):
    tokenizer = smollm2_hf_tokenizer
    for messages in CONVERSATIONS:
        rendered = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        expected_ids = tokenizer.encode(rendered, add_special_tokens=False)
        chat = server.post(
            "/v1/chat/completions",
            json={"messages": messages, "max_tokens": 16, "temperature": 0, "logprobs": True},
        ).json()
        native = server.post(
            "/generate",
            json={
                "input_ids": expected_ids,
                "return_logprob": True,
                "sampling_params": {"max_new_tokens": 16, "temperature": 0},
            },
        ).json()
        # The chat route tokenised the conversation to transformers' ids: same length, and the
        # same continuation with the same logprobs as the native route fed those exact ids.
        assert chat["usage"]["prompt_tokens"] == len(expected_ids)
        choice = chat["choices"][0]
        assert choice["message"]["content"] == native["text"]
        chat_lp = [t["logprob"] for t in choice["logprobs"]["content"]]
        native_lp = [lp for lp, _, _ in native["meta_info"]["output_token_logprobs"]]
        assert len(chat_lp) == len(native_lp)
        assert max(abs(a - b) for a, b in zip(chat_lp, native_lp)) < 1e-4


def test_capital_of_france(server):
    reply = server.post(
        "/v1/chat/completions",
        json={"messages": CONVERSATIONS[0], "max_tokens": 32, "temperature": 0},
    ).json()
    assert "Paris" in reply["choices"][0]["message"]["content"]


def test_json_schema_extraction_parses_validates_and_is_mostly_right(server):
    import jsonschema

    correct = 0
    for sentence, name, age in EXTRACTIONS:
        reply = server.post(
            "/v1/chat/completions",
            json={
                "messages": [
                    {"role": "system", "content": "Extract the person's name and age as JSON."},
                    {"role": "user", "content": sentence},
                ],
                "max_tokens": 64,
                "temperature": 0,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "person", "schema": PERSON},
                },
            },
        ).json()
        choice = reply["choices"][0]
        assert choice["finish_reason"] == "stop", (sentence, choice)
        value = json.loads(choice["message"]["content"])
        jsonschema.validate(value, PERSON)
        correct += value == {"name": name, "age": age}
    assert correct >= 8, f"only {correct}/10 extractions carry the right values"
