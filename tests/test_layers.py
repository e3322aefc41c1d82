"""The three layers stay apart: the core and the calls know no gRPC, and only the transport
reaches into grpclib's or h2's internals."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "longlived"
MODULES = sorted(p for p in PACKAGE.glob("*.py"))

NO_GRPC = [
    "events",
    "subscriber",
    "hub",
    "_dedup",
    "_logfields",
    "redislog",
    "payload",
    "_status",
    "_wire",
    "_call",
    "_local",
    "_aio",
]
"""The core and the call layer: they import neither grpclib nor h2."""

INTERNALS = {
    "_stream",
    "_transport",
    "_protocol",
    "_connection",
    "_h2_connection",
    "_dispatch",
    "_settings",
    "_tasks",
    "_mapping",
    "_cancel_done",
    "_send_trailing_metadata_done",
    "_send_initial_metadata_done",
}
"""grpclib and h2 attributes the transport touches; nobody else may."""

PRIVATE_MODULES = ("grpclib.protocol", "grpclib.config", "grpclib._typing", "grpclib.utils")


def imports(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("name", NO_GRPC)
def test_core_and_calls_import_no_grpc(name: str) -> None:
    tree = ast.parse((PACKAGE / f"{name}.py").read_text())
    found = {m for m in imports(tree) if m.split(".")[0] in ("grpclib", "h2", "hpack")}
    found |= {m for m in imports(tree) if m in ("longlived._transport", "longlived.server")}
    assert not found, f"{name} imports {sorted(found)}"


@pytest.mark.parametrize("path", [p for p in MODULES if p.stem != "_transport"], ids=str)
def test_only_the_transport_touches_grpclib_internals(path: Path) -> None:
    tree = ast.parse(path.read_text())
    private = {m for m in imports(tree) if m.startswith(PRIVATE_MODULES) or m.split(".")[0] == "h2"}
    assert not private, f"{path.name} imports {sorted(private)}"
    touched = {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and node.attr in INTERNALS
        and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
    }
    assert not touched, f"{path.name} touches {sorted(touched)}"
