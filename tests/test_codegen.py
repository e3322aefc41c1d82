"""The committed ``longlived/_proto`` is exactly what ``codegen/`` produces from ``proto/``, and
``longlived/proto/`` (shipped in the wheel) holds the same ``.proto`` files."""

from __future__ import annotations

import filecmp
import importlib.util
import sys
from pathlib import Path

import pytest

from longlived import codegen

ROOT = Path(__file__).resolve().parent.parent


def _load_generator() -> object:
    spec = importlib.util.spec_from_file_location("_codegen", ROOT / "codegen" / "generate.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("_codegen", module)
    spec.loader.exec_module(module)
    return module


def _tree(root: Path) -> dict[str, Path]:
    return {
        str(path.relative_to(root)): path
        for path in sorted(root.rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts
    }


def test_generated_code_matches_the_proto(tmp_path: Path) -> None:
    generator = _load_generator()
    out = tmp_path / "_proto"
    generator.generate(out)  # type: ignore[attr-defined]  # loaded from a file path
    fresh, committed = _tree(out), _tree(ROOT / "longlived" / "_proto")
    assert sorted(fresh) == sorted(committed), "run `just codegen` and commit the result"
    changed = [name for name in fresh if not filecmp.cmp(fresh[name], committed[name], False)]
    assert changed == [], f"stale generated files {changed}: run `just codegen` and commit"


def test_the_apps_codegen_command_matches_the_example(tmp_path: Path) -> None:
    """``python -m longlived.codegen``, as an app runs it, reproduces the example's
    committed messages."""
    example = ROOT / "examples" / "inventory"
    out = tmp_path / "_proto"
    assert codegen.main(["--out", str(out), str(example / "inventory.proto")]) == 0
    fresh, committed = _tree(out), _tree(example / "_proto")
    assert sorted(fresh) == sorted(committed), "run `just codegen` and commit the result"
    changed = [name for name in fresh if not filecmp.cmp(fresh[name], committed[name], False)]
    assert changed == [], f"stale generated files {changed}: run `just codegen` and commit"


def test_the_codegen_command_names_a_proto_it_cannot_compile(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken.proto"
    broken.write_text('syntax = "proto3";\nmessage Item { strin name = 1; }\n')
    assert codegen.main(["--out", str(tmp_path / "out"), str(broken)]) == 1
    assert "longlived codegen:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_packaged_protos_are_the_contract() -> None:
    fresh, packaged = _tree(ROOT / "proto"), _tree(ROOT / "longlived" / "proto")
    assert sorted(packaged) == sorted(fresh), "run `just codegen` and commit the result"
    changed = [name for name in fresh if not filecmp.cmp(fresh[name], packaged[name], False)]
    assert changed == [], f"stale packaged protos {changed}: run `just codegen` and commit"
