"""Generate ``longlived/_proto`` from ``proto/longlived.proto`` with betterproto2, and copy
the ``.proto`` files into ``longlived/proto/`` (package data: the wheel ships the contract).

Usage: ``python codegen/generate.py [OUT_DIR]`` (default: ``longlived/_proto``; the copies
are made only then), or ``just codegen``, which also regenerates the examples' messages.
The output is committed; ``tests/test_codegen.py`` regenerates it into a temporary
directory and fails on any difference, and on copies that differ from ``proto/``. Apps
generate their own with ``python -m longlived.codegen`` (same options).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from longlived.codegen import generate as generate_from

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
DEFAULT_OUT = ROOT / "longlived" / "_proto"
PACKAGED = ROOT / "longlived" / "proto"


def generate(out: Path) -> None:
    """longlived's own messages into ``out``."""
    generate_from(sorted(PROTO_DIR.glob("*.proto")), out, include=[PROTO_DIR])


def package_protos(out: Path = PACKAGED) -> None:
    """Copy ``proto/*.proto`` into ``out``, replacing what was there."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir()
    for proto in sorted(PROTO_DIR.glob("*.proto")):
        shutil.copy2(proto, out / proto.name)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        generate(Path(sys.argv[1]))
    else:
        generate(DEFAULT_OUT)
        package_protos()
