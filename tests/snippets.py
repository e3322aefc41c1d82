"""Running and type-checking the Python snippets of the README and the docs pages."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["ROOT", "run_snippet", "type_check"]

ROOT = Path(__file__).resolve().parent.parent


def run_snippet(snippet: str, directory: Path) -> subprocess.CompletedProcess[str]:
    """``snippet`` run as a script from the repository root, with only the repository on
    the import path (bounded)."""
    module = directory / "snippet.py"
    module.write_text(snippet)
    return subprocess.run(
        [sys.executable, str(module)], cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={"PYTHONPATH": str(ROOT), "PATH": ""},
    )  # fmt: skip


def type_check(snippets: Sequence[str], directory: Path) -> subprocess.CompletedProcess[str]:
    """``mypy --strict`` over ``snippets``, each a module of its own (bounded)."""
    modules = []
    for number, snippet in enumerate(snippets):
        modules.append(directory / f"snippet_{number}.py")
        modules[-1].write_text(snippet)
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", *map(str, modules)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
