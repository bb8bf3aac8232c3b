"""Fixtures for the frontend tests.

``ScriptedBackend`` is an in-test backend for pure-language behaviour (text assembly, forks,
tracing, errors): it completes a prompt with a deterministic function of the prompt, records
every request, and renders chat with a real tokenizer's chat template. Acceptance tests run real
models through EngineBackend and a real server instead.
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Callable

import pytest

from radixlm_lang.backends.base import Backend, Completion, StreamDelta, strip_bos
from radixlm_lang.choices import ChoiceLogprobs


def scripted_completion(prompt: str, max_new_tokens: int | None) -> str:
    """A deterministic completion: a word derived from the prompt's checksum, cut to length."""
    word = f"w{zlib.crc32(prompt.encode()) % 1000}"
    return word[: max_new_tokens or len(word)]


class ScriptedBackend(Backend):
    """Deterministic backend that records requests (see the module docstring).

    Args:
        tokenizer: an HF tokenizer whose chat template renders roles (None: no template).
        choice_logprobs: per choice text, the token logprobs ``score_choices`` reports.
        complete: prompt, max_new_tokens -> completion text.
        fail_on: a substring; a prompt containing it makes generate raise RuntimeError.
    """

    def __init__(self, tokenizer=None, choice_logprobs=None, complete=None, fail_on=None):
        super().__init__()
        self.tokenizer = tokenizer
        self.choice_logprobs = choice_logprobs or {}
        self.complete: Callable[[str, int | None], str] = complete or scripted_completion
        self.fail_on = fail_on
        self.requests: list[tuple[str, str, object]] = []  # (kind, prompt, params/choices)
        self.lock = threading.Lock()

    def _record(self, kind: str, prompt: str, detail: object) -> None:
        with self.lock:
            self.requests.append((kind, prompt, detail))

    def generate(self, prompt, params, messages=None):
        self._record("generate", prompt, params)
        if self.fail_on and self.fail_on in prompt:
            raise RuntimeError(f"scripted failure on {self.fail_on!r}")
        text = self.complete(prompt, params.max_new_tokens)
        return Completion(text, {"prompt": prompt, "finish_reason": {"type": "length"}})

    def generate_stream(self, prompt, params, messages=None):
        completion = self.generate(prompt, params, messages)
        for i, char in enumerate(completion.text):
            last = i == len(completion.text) - 1
            yield StreamDelta(char, completion.meta_info if last else None)

    def cache_prefix(self, prompt):
        self._record("cache_prefix", prompt, None)
        return {"cached": True}

    def score_choices(self, prompt, choices, unconditional=False):
        self._record("score", prompt, tuple(choices))
        rows = tuple(tuple(self.choice_logprobs.get(c, [-1.0])) for c in choices)
        ids = tuple(tuple(range(len(r))) for r in rows)
        uncond = tuple(tuple(-0.5 for _ in r) for r in rows) if unconditional else None
        return ChoiceLogprobs(tuple(choices), ids, rows, uncond)

    def render_chat(self, messages):
        if self.tokenizer is None:
            raise NotImplementedError("no chat template")
        text = self.tokenizer.apply_chat_template(messages, tokenize=False)
        return strip_bos(text, self.tokenizer.bos_token)

    def kinds(self) -> list[str]:
        return [kind for kind, _, _ in self.requests]


@pytest.fixture(scope="session")
def llama3_tokenizer(llama3_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(llama3_tokenizer_dir))


@pytest.fixture(scope="session")
def llama2_tokenizer(llama2_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(llama2_tokenizer_dir))


@pytest.fixture
def scripted(llama3_tokenizer):
    """A ScriptedBackend rendering chat with the Llama 3 template."""
    return ScriptedBackend(tokenizer=llama3_tokenizer)


@pytest.fixture
def make_scripted(llama3_tokenizer):
    """Factory for ScriptedBackends with custom behaviour."""

    def make(**kwargs):
        kwargs.setdefault("tokenizer", llama3_tokenizer)
        return ScriptedBackend(**kwargs)

    return make


# ---- real models: the in-process engine and a real server ----------------------------------
# Both serve the embedded demo model (a small random-weight Llama with its own byte-level BPE
# tokenizer and chat template, built once and cached on disk), so one server is shared by the
# acceptance tests and the examples.

ENGINE_OPTIONS = {"kv_cache_tokens": 16384}


@pytest.fixture(scope="session")
def demo_model_dir():
    from radixlm.model.demo import ensure_demo_model

    return ensure_demo_model()


@pytest.fixture(scope="session")
def engine(demo_model_dir):
    from radixlm import Engine

    with Engine(model=str(demo_model_dir), **ENGINE_OPTIONS) as eng:
        yield eng


@pytest.fixture(scope="session")
def engine_backend(engine):
    import radixlm_lang as rl

    return rl.EngineBackend(engine)


@pytest.fixture(scope="session")
def server_runtime(demo_model_dir):
    """``radixlm serve`` (demo model) in a subprocess on a free port of 127.0.0.1."""
    import radixlm_lang as rl

    runtime = rl.Runtime(model=str(demo_model_dir), **ENGINE_OPTIONS)
    yield runtime
    runtime.shutdown()


@pytest.fixture(scope="session")
def hf_model(demo_model_dir):
    """The same weights in transformers: the independent reference for logprobs."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(demo_model_dir)).eval()


# ---- the default model (SmolLM2-135M-Instruct) for the SGLang-style programs -----------------
# sglang_style/ runs its programs against both: sgl.Runtime (a real `radixlm serve`, started with
# SGLang's argument names) and the session's shared in-process SmolLM2 engine.

SGL_SERVER_ARGS = {"device": "cpu", "dtype": "float32", "max_total_tokens": 8192,
                   "log_level": "warning"}  # fmt: skip


@pytest.fixture(scope="session")
def sgl_server(smollm2_gguf):
    """``sgl.Runtime(model_path=...)``: a real ``radixlm serve`` subprocess on 127.0.0.1."""
    import radixlm_lang as sgl

    runtime = sgl.Runtime(model_path=str(smollm2_gguf), **SGL_SERVER_ARGS)
    yield runtime
    runtime.shutdown()


@pytest.fixture(scope="session")
def sgl_engine(smollm2_engine):
    """The session's shared SmolLM2 engine, in this process."""
    import radixlm_lang as sgl

    return sgl.EngineBackend(smollm2_engine)
