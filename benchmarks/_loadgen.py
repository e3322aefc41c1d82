"""The load generator: one grpcio process holding every subscriber, the same for all servers.

Subscribers are ``grpc.aio`` calls, one TCP connection per subscriber unless a workload
puts several streams on one (a channel each, made distinct with ``grpc.channel_id`` and a
local subchannel pool, or grpcio would share one connection among them). Measured against
sync grpcio with a thread per stream (even with ``SingleThreadedUnaryStream``), grpc.aio
cost about the same per message and holds 10,000 streams without 10,000 threads. Messages
are read as raw bytes, no per-message parsing beyond what the workload needs: fanout
counts and decodes each stream's last message; latency reads the publish stamp straight
from the bytes. The process is pinned to its own CPU; its CPU time is reported so a reader
can see when it, not the server, was the limit.

Commands (orchestrator -> here) and answers::

    ("open", port, n, per_connection, kind) -> ("ready", seconds)  all n streams have headers
    ("read", mode, events)             -> ("reading",), then later ("done", result)
    ("close",)                         -> ("closed",)
    ("rc", command, *args)             -> see ``_reconnect.Clients``
    ("exit",)

``mode`` is ``count`` (fanout: ``events`` messages per stream, the last must carry seq
``events``), ``latency`` (the same, and publish-to-arrival times) or ``final`` (idle: one
message per stream).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import traceback
from array import array
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from benchmarks._common import (
    SUBSCRIBE,
    Stubs,
    child_setup,
    load_stubs,
    receive,
    runner,
    stamp,
    summary,
)

__all__ = ["GRPCIO_OPTIONS", "main"]

IDLE_TIMEOUT = 3600.0
OPEN_BATCH = 100
"""Streams opened at once: more would overflow the server's accept backlog."""

GRPCIO_OPTIONS: list[tuple[str, Any]] = [
    # loopback calls must not go to an http(s)_proxy from the environment
    ("grpc.enable_http_proxy", 0),
    # without it, channels with the same target share one TCP connection
    ("grpc.use_local_subchannel_pool", 1),
]


def main(conn: Connection, cpu: int | None, stubs_dir: str, timeout: float, loop: str) -> None:
    """Process entry point: pin, then run commands until told to exit.

    ``loop`` is ``uvloop`` (when it is installed) or ``asyncio``: the generator's event loop.
    Its cost per socket read is part of every arrival time, and uvloop's is the smaller.
    """
    try:
        setup = child_setup(cpu)
        run, setup["loop"] = runner(loop)
        conn.send(("hello", setup))
        run(_Loadgen(conn, load_stubs(Path(stubs_dir)), timeout).run())
    except Exception:
        with contextlib.suppress(OSError):
            conn.send(("error", traceback.format_exc()))
        raise


class _Loadgen:
    def __init__(self, conn: Connection, stubs: Stubs, timeout: float) -> None:
        self.conn = conn
        self.stubs = stubs
        self.timeout = timeout
        self.subscribers: _Subscribers | None = None
        self.reconnect: Any = None

    async def run(self) -> None:
        try:
            while True:
                command = await receive(self.conn, timeout=IDLE_TIMEOUT)
                if command[0] == "exit":
                    return
                await self.handle(*command)
        finally:
            await self._close()

    async def handle(self, command: str, *args: Any) -> None:
        if command == "open":
            *where, kind = args
            self.subscribers = _Subscribers(self.stubs) if kind == "grpcio" else _raw(self.stubs)
            async with asyncio.timeout(self.timeout):
                seconds = await self.subscribers.open(*where)
            self.conn.send(("ready", seconds))
        elif command == "read":
            if self.subscribers is None:
                raise RuntimeError("read before open")
            result = await self.subscribers.read(self.conn, *args, timeout=self.timeout)
            self.conn.send(("done", result))
        elif command == "close":
            await self._close()
            self.conn.send(("closed",))
        elif command == "rc":
            if self.reconnect is None:
                from benchmarks._reconnect import Clients

                self.reconnect = Clients(self.stubs)
            answer = await self.reconnect.handle(*args, timeout=self.timeout)
            if args[0] == "close":
                self.reconnect = None
            self.conn.send(answer)
        else:
            raise ValueError(f"unknown command {command!r}")

    async def _close(self) -> None:
        subscribers, self.subscribers = self.subscribers, None
        if subscribers is not None:
            async with asyncio.timeout(self.timeout):
                await subscribers.close()
        if self.reconnect is not None:
            reconnect, self.reconnect = self.reconnect, None
            await reconnect.handle("close", timeout=self.timeout)


def _raw(stubs: Stubs) -> Any:
    from benchmarks._rawgen import RawSubscribers

    return RawSubscribers(stubs)


class _Subscribers:
    """N ``Subscribe`` calls on grpc.aio channels, read as raw bytes."""

    def __init__(self, stubs: Stubs) -> None:
        self.stubs = stubs
        self.channels: list[Any] = []
        self.calls: list[Any] = []

    async def open(self, port: int, n: int, per_connection: int) -> float:
        """Open ``n`` streams, ``per_connection`` per TCP connection; seconds it took."""
        import grpc

        started = time.monotonic()
        request = self.stubs.messages.Request
        for first in range(0, n, OPEN_BATCH):
            batch = []
            for i in range(first, min(first + OPEN_BATCH, n)):
                if i % per_connection == 0:
                    options = [*GRPCIO_OPTIONS, ("grpc.channel_id", len(self.channels))]
                    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options)
                    self.channels.append(channel)
                    method = channel.unary_stream(
                        SUBSCRIBE,
                        request_serializer=request.SerializeToString,
                        response_deserializer=None,
                    )
                call = method(request(id=i))
                self.calls.append(call)
                batch.append(call)
            await asyncio.gather(*(call.initial_metadata() for call in batch))
            for call in batch:
                if call.done():  # failed before it could be read: no subscription
                    raise RuntimeError(f"a stream failed while opening: {await call.code()}")
        return time.monotonic() - started

    async def read(
        self, conn: Connection, mode: str, events: int, *, timeout: float
    ) -> dict[str, Any]:
        """Read every stream as ``mode`` says; the trial's result for the orchestrator."""
        import grpc

        eof = grpc.aio.EOF
        latencies = array("q")
        stamping = mode == "latency"
        cpu0 = time.process_time()

        async def reader(call: Any) -> tuple[float, int, bytes | str]:
            count, last = 0, b""
            try:
                while count < events:
                    message = await call.read()
                    if message is eof:
                        return time.monotonic(), count, f"stream ended after {count} messages"
                    if stamping:
                        latencies.append(time.monotonic_ns() - stamp(message))
                    count += 1
                    last = message
            except grpc.aio.AioRpcError as exc:
                return time.monotonic(), count, f"stream failed after {count}: {exc.code()}"
            return time.monotonic(), count, last

        readers = [asyncio.ensure_future(reader(call)) for call in self.calls]
        conn.send(("reading",))
        done, pending = await asyncio.wait(readers, timeout=timeout)
        cpu = time.process_time() - cpu0
        for task in pending:
            task.cancel()
        results = [task.result() for task in done]
        errors = [f"{len(pending)} of {len(readers)} streams timed out"] if pending else []
        last_seq = events if mode != "final" else None
        errors += self._check(results, events, last_seq)
        result: dict[str, Any] = {
            "t_last": max((t for t, _, _ in results), default=0.0),
            "cpu": cpu,
            "received": sum(count for _, count, _ in results),
            # the size of the last message: every server must send the same bytes
            "last_bytes": next((len(m) for _, _, m in results if isinstance(m, bytes)), None),
            "errors": errors[:10],
        }
        if stamping:
            result["latency_ms"] = summary(latencies)
        return result

    def _check(
        self, results: list[tuple[float, int, bytes | str]], events: int, last_seq: int | None
    ) -> list[str]:
        """Streams that ended early, failed, or whose last message was not the last event."""
        errors = []
        for _, count, last in results:
            if isinstance(last, str):
                errors.append(last)
            elif last_seq is not None:
                seq = self.stubs.messages.Response.FromString(last).seq
                if seq != last_seq or count != events:
                    errors.append(f"{count} messages, the last with seq {seq}; expected {events}")
        return errors

    async def close(self) -> None:
        for call in self.calls:
            call.cancel()
        for first in range(0, len(self.channels), OPEN_BATCH):
            await asyncio.gather(*(c.close() for c in self.channels[first : first + OPEN_BATCH]))
        self.calls, self.channels = [], []
