"""Generate ``longlived/_proto`` from ``proto/longlived.proto`` with betterproto2, and copy
the ``.proto`` files into ``longlived/proto/`` (package data: the wheel ships the contract).

Usage: ``python codegen/generate.py [OUT_DIR]`` (default: ``longlived/_proto``; the copies
are made only then). The output is committed; ``tests/test_codegen.py`` regenerates it into
a temporary directory and fails on any difference, and on copies that differ from ``proto/``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
DEFAULT_OUT = ROOT / "longlived" / "_proto"
PACKAGED = ROOT / "longlived" / "proto"
OPTIONS = "client_generation=async,server_generation=async,google_protobuf_descriptors"


def generate(out: Path) -> None:
    """Run protoc (from grpcio-tools) with the betterproto2 plugin into ``out``."""
    protos = sorted(str(p) for p in PROTO_DIR.glob("*.proto"))
    env = dict(os.environ)
    # The plugin is a console script installed next to this interpreter.
    scripts = sysconfig.get_path("scripts")
    env["PATH"] = os.pathsep.join([scripts, str(Path(sys.executable).parent), env.get("PATH", "")])
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTO_DIR}",
            f"--python_betterproto2_out={tmp}",
            f"--python_betterproto2_opt={OPTIONS}",
            *protos,
        ]
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(tmp, out)


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
