"""radixlm_lang: write LM programs in Python; radixlm runs them with maximal prefix reuse.

import radixlm_lang as sgl   # SGLang programs run after changing only their import

@sgl.function
def answer(s, question):
    s += sgl.user(question)
    s += sgl.assistant(sgl.gen("answer", max_tokens=64))

sgl.set_default_backend(sgl.RuntimeEndpoint("http://127.0.0.1:30000"))
state = answer.run(question="...")
"""

from typing import Any

from radixlm_lang.api import (
    assistant,
    assistant_begin,
    assistant_end,
    flush_cache,
    gen,
    gen_int,
    gen_string,
    get_default_backend,
    get_server_info,
    image,
    select,
    separate_reasoning,
    set_default_backend,
    system,
    system_begin,
    system_end,
    user,
    user_begin,
    user_end,
    video,
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
from radixlm_lang.dtypes import REGEX_BOOL, REGEX_FLOAT, REGEX_INT, REGEX_STR
from radixlm_lang.global_config import global_config
from radixlm_lang.graph import RequestGraph
from radixlm_lang.interpreter import GenerationAborted, ProgramError
from radixlm_lang.program import CompiledFunction, Function, function
from radixlm_lang.sampling import SamplingParams
from radixlm_lang.state import ForkedStates, ProgramState

__version__ = "0.1.0"


def Engine(*args: Any, **kwargs: Any) -> Any:  # noqa: N802 (SGLang's name for the class)
    """SGLang's offline engine API: a :class:`radixlm.Engine` (SGLang's argument names too).

    ``sgl.Engine(model_path=...)`` starts an engine; ``engine.generate(prompt, sampling_params)``
    and ``engine.shutdown()`` work as in SGLang. Importing it is deferred so that programs that
    only talk to a server never load the runtime.
    """
    import radixlm
    from radixlm_lang.server_args import translate_server_args

    return radixlm.Engine(*args, **translate_server_args(kwargs))


__all__ = [
    "Backend", "BackendError", "ChatTemplateError", "ChoicesMethod", "CompiledFunction",
    "Engine", "EngineBackend", "ForkedStates", "Function", "GenerationAborted", "OpenAI",
    "ProgramError", "ProgramState", "REGEX_BOOL", "REGEX_FLOAT", "REGEX_INT", "REGEX_STR",
    "RequestGraph", "Runtime", "RuntimeEndpoint", "SamplingParams", "__version__", "assistant",
    "assistant_begin", "assistant_end", "flush_cache", "function", "gen", "gen_int",
    "gen_string", "get_default_backend", "get_server_info", "global_config",
    "greedy_token_selection", "image", "select", "separate_reasoning", "set_default_backend",
    "system", "system_begin", "system_end", "token_length_normalized",
    "unconditional_likelihood_normalized", "user", "user_begin", "user_end", "video",
]  # fmt: skip
