"""A radixlm server over HTTP (native API), and a server started as a subprocess."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

import httpx

from radixlm_lang.backends.base import BackendError, Messages, strip_bos
from radixlm_lang.backends.http_errors import error_from_body, http_error
from radixlm_lang.backends.native import NativeBackend
from radixlm_lang.chat import ChatTemplateError
from radixlm_lang.server_args import translate_server_args


class RuntimeEndpoint(NativeBackend):
    """A running ``radixlm serve`` reached through its native routes.

    Args (SGLang's order):
        base_url: e.g. ``http://127.0.0.1:30000``.
        api_key: sent as ``Authorization: Bearer`` when the server requires one.
        verify: TLS verification for ``https`` servers: a CA bundle path, or False to skip it
            (None: verify with the system's CAs).
        chat_template_name: SGLang's client-side template override; only None is accepted,
            since the server renders chat roles with the model's own template.
        timeout: seconds per request (None: no limit).
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        verify: str | bool | None = None,
        chat_template_name: str | None = None,
        timeout: float | None = 600.0,
    ):
        super().__init__()
        if chat_template_name is not None:
            raise ValueError(
                f"chat_template_name={chat_template_name!r} is not supported: radixlm renders "
                "chat roles with the served model's own chat template"
            )
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
        self._client = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            timeout=timeout,
            limits=limits,
            verify=True if verify is None else verify,
        )
        self._lock = threading.Lock()
        self._bos: tuple[int | None, str | None] | None = None
        self._token_text: dict[int, str] = {}

    # ---- NativeBackend ----

    def call(self, request: dict[str, Any]) -> Any:
        return self._post("/generate", request)

    def call_stream(self, request: dict[str, Any]) -> Iterator[dict[str, Any]]:
        with self._client.stream("POST", "/generate", json=request) as response:
            if response.status_code >= 400:
                response.read()
                raise http_error(response)
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[len("data:") :].strip()
                if payload == "[DONE]":
                    return
                chunk = json.loads(payload)
                if "error" in chunk:
                    raise error_from_body(chunk, None)
                yield chunk

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return [self._post("/tokenize", {"prompt": text})["tokens"] for text in texts]

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_info()[0]

    def render_chat(self, messages: Messages) -> str:
        # The server renders the template; ids -> text keeps special tokens as their strings.
        ids = self._post("/tokenize", {"messages": messages, "add_generation_prompt": False},
                         chat=True)["tokens"]  # fmt: skip
        text = self._post("/detokenize", {"tokens": ids, "skip_special_tokens": False})["text"]
        return strip_bos(text, self._bos_info()[1])

    def shutdown(self) -> None:
        """Close the HTTP connections."""
        self._client.close()

    # ---- server routes ----

    def server_info(self) -> dict[str, Any]:
        """``GET /server_info``: KV capacity, cache and queue figures."""
        return self._get("/server_info")

    def get_server_info(self) -> dict[str, Any]:
        """SGLang's name for :meth:`server_info`."""
        return self.server_info()

    def get_model_name(self) -> str:
        """The model the server serves (its ``model_path``)."""
        return self.server_info()["model_path"]

    def token_texts(self, ids: list[int]) -> list[str]:
        # One /detokenize per distinct id: logprob entries are short (a select's choices, a
        # gen's output), and a lone token's text is what SGLang reports for each entry.
        with self._lock:
            missing = [i for i in dict.fromkeys(ids) if i not in self._token_text]
        for token in missing:
            text = self._post("/detokenize", {"tokens": [token], "skip_special_tokens": False})
            with self._lock:
                self._token_text[token] = text["text"]
        with self._lock:
            return [self._token_text[i] for i in ids]

    def flush_cache(self) -> dict[str, Any]:
        """``POST /flush_cache``: empty the radix cache."""
        return self._post("/flush_cache", {})

    def health(self) -> bool:
        """Whether ``GET /health`` answers 200."""
        try:
            return self._client.get("/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    # ---- helpers ----

    def _bos_info(self) -> tuple[int | None, str | None]:
        with self._lock:
            if self._bos is None:
                ids = self._post("/tokenize", {"prompt": ""})["tokens"]
                bos_id = ids[0] if ids else None
                text = None
                if bos_id is not None:
                    body = {"tokens": [bos_id], "skip_special_tokens": False}
                    text = self._post("/detokenize", body)["text"]
                self._bos = (bos_id, text)
            return self._bos

    def _post(self, path: str, body: dict[str, Any], chat: bool = False) -> Any:
        try:
            response = self._client.post(path, json=body)
        except httpx.HTTPError as exc:
            raise BackendError(f"POST {self.base_url}{path} failed: {exc}") from exc
        if response.status_code >= 400:
            error = http_error(response)
            if chat:
                raise ChatTemplateError(str(error)) from error
            raise error
        return response.json()

    def _get(self, path: str) -> Any:
        try:
            response = self._client.get(path)
        except httpx.HTTPError as exc:
            raise BackendError(f"GET {self.base_url}{path} failed: {exc}") from exc
        if response.status_code >= 400:
            raise http_error(response)
        return response.json()


class Runtime(NativeBackend):
    """Starts ``python -m radixlm serve`` on a free local port and stops it on :meth:`shutdown`.

    Use it as a backend directly (it forwards to :attr:`endpoint`) or as a context manager.
    SGLang's argument names are accepted too (``model_path``, ``mem_fraction_static``,
    ``disable_radix_cache``...; see :func:`radixlm_lang.server_args.translate_server_args`).

    Args:
        model: a Hugging Face model directory or GGUF file (SGLang: ``model_path``); None
            serves the default model.
        host: interface to bind.
        port: TCP port; None picks a free one.
        api_key: require this key (passed to the server and used by the endpoint).
        start_timeout: seconds to wait for ``/health`` (SGLang: ``launch_timeout``).
        **server_args: any ``radixlm serve`` option as a keyword (``page_size=16``,
            ``schedule_policy="dfs-weight"``, ``enable_radix_cache=False``...).
    """

    def __init__(
        self,
        model: str | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        api_key: str | None = None,
        start_timeout: float = 600.0,
        **server_args: Any,
    ):
        super().__init__()
        start_timeout = server_args.pop("launch_timeout", start_timeout)
        if model is not None:
            server_args["model"] = model
        options = translate_server_args(server_args)
        self.port = port or _free_port(host)
        self.url = f"http://{host}:{self.port}"
        args = dict(options, host=host, port=self.port, api_key=api_key)
        self._log = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "radixlm", "serve", *server_argv(args)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ),
        )
        self._finalizer = weakref.finalize(self, _stop, self.process)
        self.endpoint = RuntimeEndpoint(self.url, api_key=api_key)
        self._wait_until_healthy(start_timeout)

    def _wait_until_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"radixlm serve exited with {self.process.returncode}:\n"
                                   f"{self.log_tail()}")  # fmt: skip
            if self.endpoint.health():
                return
            time.sleep(0.25)
        self.shutdown()
        raise RuntimeError(f"radixlm serve did not become healthy in {timeout}s:\n"
                           f"{self.log_tail()}")  # fmt: skip

    def log_tail(self, chars: int = 4000) -> str:
        """The end of the server's combined stdout/stderr."""
        self._log.flush()
        self._log.seek(0)
        return self._log.read()[-chars:]

    def call(self, request: dict[str, Any]) -> Any:
        return self.endpoint.call(request)

    def call_stream(self, request: dict[str, Any]) -> Iterator[dict[str, Any]]:
        return self.endpoint.call_stream(request)

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return self.endpoint.tokenize(texts)

    @property
    def bos_token_id(self) -> int | None:
        return self.endpoint.bos_token_id

    def render_chat(self, messages: Messages) -> str:
        return self.endpoint.render_chat(messages)

    def token_texts(self, ids: list[int]) -> list[str]:
        return self.endpoint.token_texts(ids)

    def flush_cache(self) -> dict[str, Any]:
        """``POST /flush_cache`` on the server this runtime started."""
        return self.endpoint.flush_cache()

    def get_server_info(self) -> dict[str, Any]:
        """``GET /server_info`` of the server this runtime started."""
        return self.endpoint.get_server_info()

    def shutdown(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 30 s) and close the connections."""
        self.endpoint.shutdown()
        self._finalizer()
        self._log.close()


def server_argv(options: dict[str, Any]) -> list[str]:
    """``radixlm serve`` flags for keyword options (None values are left out).

    Booleans become ``--flag`` / ``--no-flag``; everything else ``--flag value``.
    """
    argv: list[str] = []
    for key, value in options.items():
        if value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        else:
            argv += [flag, str(value)]
    return argv


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)
