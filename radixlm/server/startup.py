"""Checks ``radixlm serve`` runs before it loads anything: each failure is one clear line.

Loading a model takes seconds to minutes; a busy port, a mistyped ``--model`` or a CUDA device
that is not there should not cost that wait, nor end in a traceback from deep in the loader.
"""

from __future__ import annotations

import socket
from pathlib import Path

from radixlm.config import EngineConfig


class StartupError(Exception):
    """A reason the server cannot start; ``str()`` is the one line to print."""


def check_startup(host: str, port: int, config: EngineConfig) -> None:
    """Everything that can be checked before the model loads.

    Args:
        host: the interface the server will bind.
        port: the TCP port it will bind.
        config: the engine configuration.

    Raises:
        StartupError: the port is taken, the device is missing, or the model or tokenizer
            path is unusable.
    """
    check_port_free(host, port)
    check_device(config.model.device)
    if config.model.model is not None:
        check_model(config.model.model, config.model.tokenizer)


def check_port_free(host: str, port: int) -> None:
    """Bind ``host:port`` the way the server will (address reuse on) and let it go again.

    Args:
        host: interface name or address.
        port: TCP port.

    Raises:
        StartupError: the address cannot be bound (in use, not an interface of this machine,
            or a privileged port).
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartupError(f"--host {host}: cannot resolve it ({exc.strerror})") from exc
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            raise StartupError(
                f"cannot listen on {host}:{port}: {exc.strerror or exc}; is another server "
                "running there? Pick a free port with --port"
            ) from exc


def check_device(device: str) -> None:
    """A ``cuda`` device must exist.

    Args:
        device: the ``--device`` value.

    Raises:
        StartupError: CUDA was asked for but torch sees no (or too few) CUDA devices.
    """
    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise StartupError(
            f"--device {device}: no CUDA device is available (torch {torch.__version__} sees "
            "none); use --device cpu or --device auto"
        )
    index = device.partition(":")[2]
    if index and int(index) >= torch.cuda.device_count():
        raise StartupError(
            f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible"
        )


def check_model(model: str, tokenizer: str | None) -> None:
    """The model path exists, is a model, and has a tokenizer.

    For a GGUF file this builds (once) the cached config and tokenizer the engine reads, so a
    GGUF whose metadata transformers cannot convert fails here too.

    Args:
        model: the ``--model`` value.
        tokenizer: the ``--tokenizer`` value, if any.

    Raises:
        StartupError: what is wrong, in one line.
    """
    from radixlm.model.arch import ModelArch, UnsupportedModelError
    from radixlm.model.gguf import GGUFError
    from radixlm.model.loader import model_metadata_dir
    from radixlm.tokenizer.tokenizer import TOKENIZER_FILES

    path = Path(model).expanduser()
    if not path.exists():
        raise StartupError(f"--model {model}: no such file or directory")
    try:
        meta_dir = model_metadata_dir(path)
        ModelArch.from_dir(meta_dir)
    except (FileNotFoundError, GGUFError, UnsupportedModelError) as exc:
        raise StartupError(f"--model {model}: {exc}") from exc
    except (KeyError, ValueError) as exc:
        raise StartupError(f"--model {model}: cannot read its config.json ({exc!r})") from exc
    where = Path(tokenizer).expanduser() if tokenizer else meta_dir
    flag = f"--tokenizer {tokenizer}" if tokenizer else f"--model {model}"
    if not where.is_dir():
        raise StartupError(f"{flag}: no such directory")
    if not any((where / name).is_file() for name in TOKENIZER_FILES):
        raise StartupError(
            f"{flag}: no tokenizer files there (looked for {', '.join(TOKENIZER_FILES)}); "
            "pass --tokenizer DIR"
        )
