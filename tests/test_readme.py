"""Every Python snippet of the README runs as shown: its imports resolve, it defines what it
uses, and mypy --strict accepts it (so no name in it is undefined or misused)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SNIPPETS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_the_readme_has_snippets() -> None:
    assert len(SNIPPETS) >= 2


@pytest.mark.parametrize("number", range(len(SNIPPETS)))
def test_a_readme_snippet_runs(number: int, tmp_path: Path) -> None:
    module = tmp_path / f"snippet_{number}.py"
    module.write_text(SNIPPETS[number])
    ran = subprocess.run(
        [sys.executable, str(module)], cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={"PYTHONPATH": str(ROOT), "PATH": ""},
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr


def test_every_readme_snippet_type_checks(tmp_path: Path) -> None:
    modules = []
    for number, snippet in enumerate(SNIPPETS):
        modules.append(tmp_path / f"snippet_{number}.py")
        modules[-1].write_text(snippet)
    checked = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", *map(str, modules)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stdout
