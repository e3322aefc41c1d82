"""What the benchmark's processes share: the pipe protocol, grpcio stubs, the event payload.

The orchestrator (``fanout.py``) talks to each child process over a ``multiprocessing``
pipe: it sends a command tuple, the child answers with a tuple. Children wait for commands
with ``receive``, which watches the pipe from the event loop (no helper thread), so a child
that waits costs no CPU and a trial's CPU accounting stays clean.

Only the standard library is imported here: children import what their side needs, so the
process that runs our server never loads grpcio.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.resources
import sys
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = [
    "PROTO",
    "SUBSCRIBE",
    "Stubs",
    "generate_stubs",
    "load_stubs",
    "payload",
    "receive",
]

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "proto" / "longlived.proto"
SUBSCRIBE = "/longlived.Longlived/Subscribe"

WELL_KNOWN = importlib.resources.files("grpc_tools") / "_proto"
"""protoc's own include directory, with the well-known types."""


@dataclass(frozen=True, slots=True)
class Stubs:
    """The modules ``grpc_tools.protoc`` generated from ``proto/longlived.proto``."""

    messages: ModuleType
    services: ModuleType


def generate_stubs(out: Path) -> None:
    """Run ``grpc_tools.protoc`` on the project's proto, writing grpcio stubs into ``out``."""
    from grpc_tools import protoc

    args = [
        "protoc",
        f"--proto_path={PROTO.parent}",
        f"--proto_path={WELL_KNOWN}",  # google/protobuf/any.proto
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        str(PROTO),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO}")


def load_stubs(out: Path) -> Stubs:
    """Import the stubs ``generate_stubs`` wrote into ``out``."""
    names = [f"{PROTO.stem}_pb2", f"{PROTO.stem}_pb2_grpc"]
    # the *_pb2_grpc module imports its *_pb2 sibling by top-level name
    sys.path.insert(0, str(out))
    try:
        messages, services = (importlib.import_module(name) for name in names)
    finally:
        sys.path.remove(str(out))
    return Stubs(messages=messages, services=services)


def payload(index: int, size: int) -> str:
    """The data of event ``index``: its number, padded to ``size`` characters."""
    return f"{index:08d}".ljust(size, "x")


async def receive(conn: Connection, *, timeout: float) -> tuple[Any, ...]:
    """The next command or answer on ``conn``, waited for on the event loop.

    Raises:
        TimeoutError: nothing arrived within ``timeout`` seconds.
        EOFError: the other end closed the pipe.
    """
    loop = asyncio.get_running_loop()
    readable = asyncio.Event()
    loop.add_reader(conn.fileno(), readable.set)
    try:
        async with asyncio.timeout(timeout):
            while not conn.poll():
                readable.clear()
                await readable.wait()
    finally:
        loop.remove_reader(conn.fileno())
    message: tuple[Any, ...] = conn.recv()
    return message
