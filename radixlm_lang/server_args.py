"""SGLang's server-argument names (``sgl.Runtime(model_path=...)``, ``sgl.Engine(...)``) in
radixlm's terms.

Arguments with the same meaning under another name are renamed; SGLang's ``disable_*`` switches
become radixlm's ``enable_*`` options; arguments radixlm has no equivalent for are refused with
the reason, never silently dropped.
"""

from __future__ import annotations

from typing import Any

RENAMED = {
    "model_path": "model",
    "tokenizer_path": "tokenizer",
    "max_total_tokens": "kv_cache_tokens",
    "mem_fraction_static": "mem_fraction",
    "cuda_graph_max_bs": "cuda_graph_max_batch_size",
}

# SGLang switch -> (radixlm option, the value it takes when the switch is on).
SWITCHES = {
    "disable_radix_cache": ("enable_radix_cache", False),
    "disable_overlap_schedule": ("enable_overlap", False),
    "disable_cuda_graph": ("cuda_graph_max_batch_size", 0),
    "disable_jump_forward": ("enable_jump_forward", False),
}

# Same name, same meaning in radixlm.
SAME = {
    "host", "port", "api_key", "served_model_name", "log_level", "dtype", "device",
    "attention_backend", "context_length", "random_seed", "page_size", "schedule_policy",
    "max_running_requests", "chunked_prefill_size", "max_prefill_tokens", "max_queued_requests",
    "grammar_backend", "cascade_attention", "cascade_min_shared", "init_new_token_ratio",
    "enable_overlap", "enable_radix_cache", "enable_jump_forward", "drain_timeout", "model",
    "tokenizer", "kv_cache_tokens", "mem_fraction", "cuda_graph_max_batch_size",
}  # fmt: skip

# Accepted because they cannot change what radixlm does: it loads local files only (no remote
# code, no hub revisions) and serves one model on one device per process.
NO_EFFECT = {
    "trust_remote_code": "radixlm never runs model code from the model directory",
    "skip_server_warmup": "radixlm does not warm up",
    "tp_size": "radixlm's HTTP server runs one device per process",
}

DTYPES = {"half": "float16", "float": "float32", "bf16": "bfloat16", "fp16": "float16"}
ATTENTION = {"torch_native": "torch"}


def translate_server_args(kwargs: dict[str, Any]) -> dict[str, Any]:
    """radixlm options for SGLang-named (or radixlm-named) server arguments.

    Args:
        kwargs: keyword arguments of ``sgl.Runtime`` / ``sgl.Engine``.

    Returns:
        The same settings under radixlm's option names.

    Raises:
        TypeError: an argument radixlm has no equivalent for, or one given twice under two
            names, naming it.
        ValueError: ``tp_size`` above 1 (not served by one radixlm process).
    """
    out: dict[str, Any] = {}

    def put(name: str, value: Any, given_as: str) -> None:
        if name in out:
            raise TypeError(f"{given_as!r} sets {name!r}, which is already given")
        out[name] = value

    for key, value in kwargs.items():
        if key in NO_EFFECT:
            if key == "tp_size" and value not in (None, 1):
                raise ValueError(f"tp_size={value!r}: {NO_EFFECT[key]}")
            continue
        if key in SWITCHES:
            option, when_on = SWITCHES[key]
            if value:
                put(option, when_on, key)
            continue
        name = RENAMED.get(key, key)
        if name not in SAME:
            raise TypeError(f"server argument {key!r} has no radixlm equivalent "
                            f"(see docs/lang.md, 'Migrating from SGLang')")  # fmt: skip
        if name == "dtype":
            value = DTYPES.get(value, value)
        if name == "attention_backend":
            value = ATTENTION.get(value, value)
        put(name, value, key)
    return out
