"""The server process: runs one kind of server (ours or the peer) for trial after trial.

Per trial it starts a fresh server on a free loopback port, reports the port, and on ``go``
publishes the trial's events in batches (``asyncio.sleep(0)`` between batches lets the loop
write), as fast as the server allows. It reports when publishing began (``time.monotonic``,
the system-wide clock the load generator also reads) and, when asked, the process CPU time
spent since then: every thread, so grpcio's C-core threads count too.

Commands (orchestrator -> here) and answers::

    ("trial", n, events, batch, size)  -> ("port", port)
    ("go",)                            -> ("published", t0, t_published)
    ("measure",)                       -> ("cpu", seconds)
    ("stop",)                          -> ("stopped",)
    ("exit",)
"""

from __future__ import annotations

import asyncio
import gc
import time
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Protocol

from _common import load_stubs, receive

__all__ = ["FanoutServer", "main"]

IDLE_TIMEOUT = 1800.0
"""Seconds a child waits for its next trial before it gives up on the orchestrator."""


class FanoutServer(Protocol):
    """What the driver needs of a server under test."""

    name: str

    async def start(self) -> int: ...
    def subscribed(self) -> int: ...
    async def wait_subscribed(self, count: int) -> None: ...
    def publish(self, index: int) -> None: ...
    async def stop(self) -> None: ...


def main(conn: Connection, kind: str, stubs_dir: str, timeout: float) -> None:
    """Process entry point: serve trials of ``kind`` ("ours" or "peer") until told to exit."""
    try:
        asyncio.run(_serve(conn, kind, Path(stubs_dir), timeout))
    except Exception:
        conn.send(("error", traceback.format_exc()))
        raise


async def _serve(conn: Connection, kind: str, stubs_dir: Path, timeout: float) -> None:
    factory = _factory(kind, stubs_dir)
    while True:
        command = await receive(conn, timeout=IDLE_TIMEOUT)
        if command[0] == "exit":
            return
        _, n, events, batch, size = command
        await _trial(conn, factory(events, size), n=n, events=events, batch=batch, timeout=timeout)


class _Factory(Protocol):
    def __call__(self, events: int, size: int, /) -> FanoutServer: ...


def _factory(kind: str, stubs_dir: Path) -> _Factory:
    """A constructor of fresh servers of ``kind``; only the peer's process imports grpcio."""
    if kind == "ours":
        from _ours import Ours

        return lambda events, size: Ours(events=events, size=size)
    if kind == "peer":
        from _peer import Peer

        stubs = load_stubs(stubs_dir)
        return lambda events, size: Peer(stubs, size=size)
    raise ValueError(f"unknown server kind {kind!r}")


async def _trial(
    conn: Connection, server: FanoutServer, *, n: int, events: int, batch: int, timeout: float
) -> None:
    """One trial: start, report the port, publish on ``go``, report CPU, stop."""
    port = await server.start()
    try:
        conn.send(("port", port))
        await _expect(conn, "go", timeout)
        async with asyncio.timeout(timeout):
            await server.wait_subscribed(n)
        if server.subscribed() != n:
            raise RuntimeError(f"{server.name}: {server.subscribed()} subscribers, expected {n}")
        gc.collect()
        cpu0 = time.process_time()
        t0 = time.monotonic()
        await _publish(server, events, batch)
        conn.send(("published", t0, time.monotonic()))
        await _expect(conn, "measure", timeout)
        conn.send(("cpu", time.process_time() - cpu0))
        await _expect(conn, "stop", timeout)
    finally:
        async with asyncio.timeout(timeout):
            await server.stop()
    conn.send(("stopped",))


async def _publish(server: FanoutServer, events: int, batch: int) -> None:
    """Publish events 1..``events``, ``batch`` at a time, yielding to the loop in between."""
    for first in range(1, events + 1, batch):
        for index in range(first, min(first + batch, events + 1)):
            server.publish(index)
        await asyncio.sleep(0)


async def _expect(conn: Connection, kind: str, timeout: float) -> None:
    command = await receive(conn, timeout=timeout)
    if command[0] != kind:
        raise RuntimeError(f"expected {kind!r} from the orchestrator, got {command!r}")
