"""radixlm_lang: write LM programs in Python; radixlm runs them with maximal prefix reuse.

    import radixlm_lang as rl

    @rl.function
    def answer(s, question):
        s += rl.user(question)
        s += rl.assistant(rl.gen("answer", max_tokens=64))

    state = answer.run(question="...", backend=rl.RuntimeEndpoint("http://127.0.0.1:30000"))
"""

from radixlm_lang.api import (
    assistant,
    assistant_begin,
    assistant_end,
    gen,
    gen_int,
    gen_string,
    get_default_backend,
    select,
    set_default_backend,
    system,
    system_begin,
    system_end,
    user,
    user_begin,
    user_end,
)
from radixlm_lang.backends.base import Backend, BackendError
from radixlm_lang.backends.engine import EngineBackend
from radixlm_lang.backends.openai import OpenAI
from radixlm_lang.backends.runtime_endpoint import Runtime, RuntimeEndpoint
from radixlm_lang.chat import ChatTemplateError
from radixlm_lang.choices import (
    ChoicesMethod,
    greedy_token_selection,
    token_length_normalized,
    unconditional_likelihood_normalized,
)
from radixlm_lang.dtypes import ConversionError
from radixlm_lang.graph import RequestGraph
from radixlm_lang.interpreter import GenerationAborted, ProgramError
from radixlm_lang.program import CompiledFunction, Function, function
from radixlm_lang.sampling import SamplingParams
from radixlm_lang.state import ForkedStates, ProgramState

__all__ = [
    "Backend", "BackendError", "ChatTemplateError", "ChoicesMethod", "CompiledFunction",
    "ConversionError", "EngineBackend", "ForkedStates", "Function", "GenerationAborted",
    "OpenAI", "ProgramError", "ProgramState", "RequestGraph", "Runtime", "RuntimeEndpoint",
    "SamplingParams", "assistant", "assistant_begin", "assistant_end", "function", "gen",
    "gen_int", "gen_string", "get_default_backend", "greedy_token_selection", "select",
    "set_default_backend", "system", "system_begin", "system_end", "token_length_normalized",
    "unconditional_likelihood_normalized", "user", "user_begin", "user_end",
]  # fmt: skip
