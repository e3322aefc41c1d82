"""Generate ``longlived/_proto`` from ``proto/longlived.proto`` with betterproto2.

Usage: ``python codegen/generate.py [OUT_DIR]`` (default: ``longlived/_proto``), or
``just codegen``, which also regenerates the examples' messages. The output is committed;
``tests/test_codegen.py`` regenerates it into a temporary directory and fails on any
difference. Apps generate their own with ``python -m longlived.codegen`` (same options).
"""

from __future__ import annotations

import sys
from pathlib import Path

from longlived.codegen import generate as generate_from

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
DEFAULT_OUT = ROOT / "longlived" / "_proto"


def generate(out: Path) -> None:
    """longlived's own messages into ``out``."""
    generate_from(sorted(PROTO_DIR.glob("*.proto")), out, include=[PROTO_DIR])


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT)
