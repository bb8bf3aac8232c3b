"""The route modules share what they need through server/common.py: nothing in radixlm/server
imports app.py (which assembles the routes) but the command line, so no import circle."""

from __future__ import annotations

import ast
from pathlib import Path

import radixlm.server

SERVER = Path(radixlm.server.__file__).parent
ALLOWED = {"cli.py"}  # the CLI builds the app and runs it


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_no_server_module_imports_the_app_but_the_cli():
    offenders = [
        path.name
        for path in SERVER.glob("*.py")
        if path.name not in ALLOWED | {"app.py"} and "radixlm.server.app" in _imports(path)
    ]
    assert offenders == []


def test_the_routes_do_not_import_each_other():
    assert "radixlm.server.native_api" not in _imports(SERVER / "openai_api.py")
    assert "radixlm.server.openai_api" not in _imports(SERVER / "native_api.py")
