"""``sgl.global_config``: process-wide settings of the frontend, as SGLang spells them."""

from __future__ import annotations

from typing import Any

from radixlm_lang.api import get_default_backend, set_default_backend


class GlobalConfig:
    """Settings read by every run.

    Attributes:
        verbosity: 2 or more prints each finished program's text (as SGLang does).
        enable_precache_with_tracing: ``run_batch`` of more than one program first sends the
            constant prefix they all share (found by tracing), as ``compile().run_batch`` does.
            Off by default: a plain ``run_batch`` sends the programs as written.
        default_backend: the backend runs use when none is passed (the same value as
            :func:`set_default_backend` / :func:`get_default_backend`).
    """

    def __init__(self) -> None:
        self.verbosity = 0
        self.enable_precache_with_tracing = False

    @property
    def default_backend(self) -> Any:
        return get_default_backend()

    @default_backend.setter
    def default_backend(self, backend: Any) -> None:
        set_default_backend(backend)


global_config = GlobalConfig()
