"""The committed ``longlived/_proto`` is exactly what ``codegen/`` produces from ``proto/``, and
``longlived/proto/`` (shipped in the wheel) holds the same ``.proto`` files."""

from __future__ import annotations

import filecmp
import importlib.util
import sys
from pathlib import Path

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


def test_the_packaged_protos_are_the_contract() -> None:
    fresh, packaged = _tree(ROOT / "proto"), _tree(ROOT / "longlived" / "proto")
    assert sorted(packaged) == sorted(fresh), "run `just codegen` and commit the result"
    changed = [name for name in fresh if not filecmp.cmp(fresh[name], packaged[name], False)]
    assert changed == [], f"stale packaged protos {changed}: run `just codegen` and commit"
