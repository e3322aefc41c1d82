"""Generate betterproto2 code from ``.proto`` files, with the options longlived's own uses.

For an app's own messages (typed payloads, keyed state)::

    pip install 'longlived[codegen]'
    python -m longlived.codegen -I proto --out myapp/_proto proto/inventory.proto

The output is a package of dataclass messages (and grpclib stubs for services) that
``pack``/``unpack``, ``put`` and ``WatchCache`` take as they are, with protobuf descriptors
so server reflection can describe them (``SubscriptionManager(payload_types=...)``).
It replaces ``--out`` entirely: keep it generated, never edited by hand.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Sequence
from pathlib import Path

__all__ = ["OPTIONS", "generate", "main"]

OPTIONS = "client_generation=async,server_generation=async,google_protobuf_descriptors"
"""The betterproto2 plugin options: async grpclib client and server, descriptors."""


def generate(protos: Sequence[Path], out: Path, *, include: Sequence[Path] = ()) -> None:
    """Run protoc (from grpcio-tools) with the betterproto2 plugin: ``protos`` into ``out``.

    Raises:
        RuntimeError: grpcio-tools or the betterproto2 plugin is missing.
        subprocess.CalledProcessError: protoc refused the files (it printed why).
    """
    try:
        import grpc_tools  # noqa: F401  (only to say what is missing)
    except ImportError:
        raise RuntimeError("codegen needs grpcio-tools: pip install 'longlived[codegen]'") from None
    env = dict(os.environ)
    # the plugin is a console script installed next to this interpreter
    scripts = sysconfig.get_path("scripts")
    env["PATH"] = os.pathsep.join([scripts, str(Path(sys.executable).parent), env.get("PATH", "")])
    if shutil.which("protoc-gen-python_betterproto2", path=env["PATH"]) is None:
        raise RuntimeError(
            "codegen needs the betterproto2 plugin: pip install 'longlived[codegen]'"
        )
    dirs = list(include) or sorted({p.parent for p in protos})
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            *(f"-I{d}" for d in dirs),
            f"--python_betterproto2_out={tmp}",
            f"--python_betterproto2_opt={OPTIONS}",
            *(str(p) for p in protos),
        ]
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(tmp, out)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m longlived.codegen [-I DIR]... --out DIR PROTO...``"""
    parser = argparse.ArgumentParser(
        prog="python -m longlived.codegen",
        description="Generate betterproto2 messages for an app's .proto files.",
    )
    parser.add_argument("protos", nargs="+", type=Path, metavar="PROTO")
    parser.add_argument("--out", required=True, type=Path, help="the package to (re)create")
    parser.add_argument(
        "-I", "--include", action="append", type=Path, default=[], metavar="DIR",
        help="import directory (default: each proto's own)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    try:
        generate(args.protos, args.out, include=args.include)
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        print(f"longlived codegen: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
