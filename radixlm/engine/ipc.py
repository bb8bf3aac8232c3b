"""The typed messages between the caller's process and the engine core process.

Caller -> core: AddRequest, AbortRequest, Control. Core -> caller: Ready, Outputs, ControlReply,
Fatal. They travel pickled over a multiprocessing pipe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from radixlm.outputs import TokenOutput
from radixlm.request import LogprobOptions
from radixlm.sampling_params import SamplingParams


@dataclass
class AddRequest:
    rid: str
    input_ids: list[int]
    params: SamplingParams
    logprob: LogprobOptions = field(default_factory=LogprobOptions)
    namespace: str | None = None


@dataclass
class AbortRequest:
    rid: str
    message: str = "aborted by the client"


@dataclass
class Control:
    """A request for the core to do something and answer (flush_cache, server_info, shutdown)."""

    token: int
    command: str


@dataclass
class Ready:
    info: dict[str, Any]


@dataclass
class Outputs:
    items: list[TokenOutput]


@dataclass
class ControlReply:
    token: int
    value: Any


@dataclass
class Fatal:
    message: str
