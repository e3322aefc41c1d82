"""Every Python snippet of the README runs as shown: its imports resolve, it defines what it
uses, and mypy --strict accepts it (so no name in it is undefined or misused)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.snippets import ROOT, run_snippet, type_check

SNIPPETS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_the_readme_has_snippets() -> None:
    assert len(SNIPPETS) >= 2


@pytest.mark.parametrize("number", range(len(SNIPPETS)))
def test_a_readme_snippet_runs(number: int, tmp_path: Path) -> None:
    ran = run_snippet(SNIPPETS[number], tmp_path)
    assert ran.returncode == 0, ran.stderr


def test_every_readme_snippet_type_checks(tmp_path: Path) -> None:
    checked = type_check(SNIPPETS, tmp_path)
    assert checked.returncode == 0, checked.stdout
