"""The server process: runs one server under test at a time, driven over a pipe.

It is pinned to the server CPU before anything else runs. The driver (publishing) runs on
the server's own event loop, as an application's would; every server gets the same calls.
CPU times are ``time.process_time()``: the whole process, every thread (grpcio's C-core
threads count too). Times are ``time.monotonic()``, which on Linux is one system-wide
clock, so the load generator's timestamps compare directly.

Commands (orchestrator -> here) and answers::

    ("start", spec)                    -> ("started", port, t_ready)
    ("wait", n)                        -> ("subscribed", count)   all n subscriptions open
    ("rss",)                           -> ("rss", kib)            after a gc.collect()
    ("cpu",)                           -> ("cpu", process_seconds)
    ("fanout", events, per_turn, size) -> ("published", cpu0, t0, t1)
    ("paced", rate, events, size)      -> ("published", cpu0, t0, t1, late_ms)
    ("one", index, size)               -> ("published", t)        one event
    ("stream", rate, generation, size) -> ("streaming",)          numbered events until halt
    ("halt",)                          -> ("halted", last_index)
    ("stop",)                          -> ("stopped",)
    ("exit",)

``spec`` is ``{"kind": ..., "port": 0, "queue": ..., "redis_url": ..., "redis_stream":
...}``. While streaming, the index of the last event published (for Redis: appended) is
kept in ``counter``, shared memory the orchestrator reads after it has killed the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Protocol

from benchmarks._common import (
    child_setup,
    numbered,
    payload,
    receive,
    rss_kb,
    runner,
    stamped,
)

__all__ = ["KINDS", "Server", "main"]

KINDS = ("longlived", "grpc.aio", "grpclib", "floor")
IDLE_TIMEOUT = 3600.0
"""Seconds the process waits for its next command before it gives up on the orchestrator."""


class Server(Protocol):
    """What the driver needs of a server under test."""

    name: str

    async def start(self, port: int = 0) -> int: ...
    def subscribed(self) -> int: ...
    async def wait_subscribed(self, count: int) -> None: ...
    def publish(self, data: str, index: int) -> None: ...
    async def emit(self, data: str, index: int) -> None: ...
    async def stop(self) -> None: ...


class Counter(Protocol):
    value: int


def main(
    conn: Connection,
    cpu: int | None,
    stubs_dir: str,
    timeout: float,
    counter: Counter,
    loop: str = "asyncio",
) -> None:
    """Process entry point: pin, then serve commands until told to exit.

    ``loop`` is the event loop: ``asyncio``, or ``uvloop`` (``longlived+uvloop``: longlived
    as ``longlived serve --event-loop uvloop`` runs it)."""
    try:
        setup = child_setup(cpu)
        run, setup["loop"] = runner(loop)
        conn.send(("hello", setup))
        run(_Process(conn, Path(stubs_dir), timeout, counter).run())
    except Exception:
        with contextlib.suppress(OSError):
            conn.send(("error", traceback.format_exc()))
        raise


def make_server(spec: dict[str, Any], stubs_dir: Path) -> Server:
    """A fresh server of ``spec["kind"]``; only the grpc.aio peer's process imports grpcio."""
    kind = spec["kind"]
    if kind == "longlived":
        from benchmarks._ours import Ours

        return Ours(
            name=spec.get("name", kind),
            queue=spec.get("queue", 1024),
            redis_url=spec.get("redis_url"),
            redis_stream=spec.get("redis_stream", ""),
        )
    if kind == "grpc.aio":
        from benchmarks._aio_peer import AioPeer
        from benchmarks._common import load_stubs

        return AioPeer(load_stubs(stubs_dir))
    if kind == "grpclib":
        from benchmarks._grpclib_peer import GrpclibPeer

        return GrpclibPeer()
    if kind == "floor":
        from benchmarks._floor import Floor

        return Floor()
    raise ValueError(f"unknown server kind {kind!r}")


class _Process:
    """The command loop, and the server it currently runs."""

    def __init__(self, conn: Connection, stubs_dir: Path, timeout: float, counter: Counter):
        self.conn = conn
        self.stubs_dir = stubs_dir
        self.timeout = timeout
        self.counter = counter
        self.server: Server | None = None
        self.streaming: asyncio.Task[None] | None = None
        self.halt = asyncio.Event()

    async def run(self) -> None:
        try:
            while True:
                command = await receive(self.conn, timeout=IDLE_TIMEOUT)
                if command[0] == "exit":
                    return
                answer = await self.handle(*command)
                self.conn.send(answer)
        finally:
            await self._stop()

    @property
    def _server(self) -> Server:
        if self.server is None:
            raise RuntimeError("no server is running")
        return self.server

    async def handle(self, command: str, *args: Any) -> tuple[Any, ...]:
        bound = self.timeout
        async with asyncio.timeout(bound):
            if command == "start":
                spec = args[0]
                self.server = make_server(spec, self.stubs_dir)
                port = await self.server.start(spec.get("port", 0))
                return ("started", port, time.monotonic())
            if command == "wait":
                await self._server.wait_subscribed(args[0])
                return ("subscribed", self._server.subscribed())
            if command == "rss":
                gc.collect()
                return ("rss", rss_kb())
            if command == "cpu":
                return ("cpu", time.process_time())
            if command == "one":
                index, size = args
                t = time.monotonic()  # before: a server may write while it publishes
                self._server.publish(payload(index, size), index)
                return ("published", t)
            if command == "stream":
                self.halt.clear()
                self.streaming = asyncio.create_task(self._stream(*args))
                return ("streaming",)
            if command == "halt":
                self.halt.set()
                if self.streaming is not None:
                    await self.streaming
                return ("halted", self.counter.value)
            if command == "stop":
                await self._stop()
                return ("stopped",)
        # the publishing commands are bounded by their own pace, not by the step timeout
        if command == "fanout":
            return await self._fanout(*args)
        if command == "paced":
            return await self._paced(*args)
        raise ValueError(f"unknown command {command!r}")

    async def _fanout(self, events: int, per_turn: int, size: int) -> tuple[Any, ...]:
        """Events 1..``events``, ``per_turn`` of them per loop turn, as fast as it goes."""
        server = self._server
        datas = [payload(index, size) for index in range(events + 1)]  # not timed
        gc.collect()
        cpu0, t0 = time.process_time(), time.monotonic()
        for first in range(1, events + 1, per_turn):
            for index in range(first, min(first + per_turn, events + 1)):
                server.publish(datas[index], index)
            await asyncio.sleep(0)  # the loop turns: writers write
        return ("published", cpu0, t0, time.monotonic())

    async def _paced(self, rate: float, events: int, size: int) -> tuple[Any, ...]:
        """Events 1..``events`` at ``rate`` per second, each stamped as it is published."""
        server = self._server
        loop = asyncio.get_running_loop()
        gc.collect()
        cpu0, t0 = time.process_time(), time.monotonic()
        late = 0.0
        for index in range(1, events + 1):
            due = t0 + (index - 1) / rate
            if (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)
            late = max(late, loop.time() - due)
            server.publish(stamped(index, time.monotonic_ns(), size), index)
        return ("published", cpu0, t0, time.monotonic(), late * 1e3)

    async def _stream(self, rate: float, generation: int, size: int) -> None:
        """Numbered events at ``rate`` per second until ``halt``; ``counter`` = last index."""
        server = self._server
        loop = asyncio.get_running_loop()
        self.counter.value = 0
        t0 = loop.time()
        index = 0
        while not self.halt.is_set():
            index += 1
            await server.emit(numbered(generation, index, size), index)
            self.counter.value = index  # published (appended, on Redis): it must arrive
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, t0 + index / rate - loop.time())):
                    await self.halt.wait()

    async def _stop(self) -> None:
        self.halt.set()
        if self.streaming is not None:
            with contextlib.suppress(Exception):
                await self.streaming
            self.streaming = None
        if self.server is not None:
            server, self.server = self.server, None
            async with asyncio.timeout(self.timeout):
                await server.stop()
