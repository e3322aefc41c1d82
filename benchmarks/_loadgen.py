"""The load generator: one process holding every subscriber of a trial, for both servers.

It is the same client for ours and the peer: N ``Subscribe`` streams spread over a few
connections, opened with grpclib (the default: one thread, so on a small machine the server
keeps a core to itself) or grpcio's ``grpc.aio`` (``--client grpcio``; C-core adds threads). It
reads messages as raw bytes (no per-message parsing: the load generator should cost as
little as it can) and decodes only each stream's last message, to check that it is the
trial's last event.

Commands (orchestrator -> here) and answers::

    ("subscribe", port, n, events, connections)  -> ("ready",) once all N streams are open
                                                 -> ("done", t_last, cpu_seconds, errors)
    ("close",)                                   -> ("closed",)
    ("exit",)

``t_last`` is the ``time.monotonic()`` at which the last of the N x events messages arrived.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import traceback
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from _common import SUBSCRIBE, Stubs, load_stubs, receive

__all__ = ["CLIENTS", "main"]

CLIENTS = ("grpclib", "grpcio")

IDLE_TIMEOUT = 1800.0
"""Seconds to wait for the next trial before giving up on the orchestrator."""

GRPCIO_OPTIONS = [
    # loopback calls must not go to an http(s)_proxy from the environment
    ("grpc.enable_http_proxy", 0),
    # without it, channels with the same target share one TCP connection
    ("grpc.use_local_subchannel_pool", 1),
]

Read = Callable[[], Awaitable[bytes | None]]
"""Reads a stream's next message; None when the stream has ended."""


def main(conn: Connection, client: str, stubs_dir: str, timeout: float) -> None:
    """Process entry point: run trials with ``client`` (one of ``CLIENTS``) until told to exit."""
    try:
        asyncio.run(_run(conn, client, load_stubs(Path(stubs_dir)), timeout))
    except Exception:
        conn.send(("error", traceback.format_exc()))
        raise


async def _run(conn: Connection, client: str, stubs: Stubs, timeout: float) -> None:
    make: type[_Grpcio | _Grpclib] = _Grpclib if client == "grpclib" else _Grpcio
    while True:
        command = await receive(conn, timeout=IDLE_TIMEOUT)
        if command[0] == "exit":
            return
        _, port, n, events, connections = command
        subscribers = make(stubs)
        try:
            async with asyncio.timeout(timeout):
                reads = await subscribers.open(port, n, connections)
            await _trial(conn, stubs, reads, events=events, timeout=timeout)
        finally:
            async with asyncio.timeout(timeout):
                await subscribers.close()
        conn.send(("closed",))


async def _trial(
    conn: Connection, stubs: Stubs, reads: list[Read], *, events: int, timeout: float
) -> None:
    """Report ready, count every message, report done, wait for ``close``."""
    cpu0 = time.process_time()
    readers = [asyncio.ensure_future(_read(read, events)) for read in reads]
    conn.send(("ready",))
    done, pending = await asyncio.wait(readers, timeout=timeout)
    for reader in pending:
        reader.cancel()
    cpu = time.process_time() - cpu0
    results = [reader.result() for reader in done]
    errors = _check(stubs, results, n=len(reads), events=events)
    t_last = max((t for t, _, _ in results), default=0.0)
    conn.send(("done", t_last, cpu, errors))
    command = await receive(conn, timeout=timeout)
    if command[0] != "close":
        raise RuntimeError(f"expected 'close' from the orchestrator, got {command!r}")


async def _read(read: Read, events: int) -> tuple[float, int, bytes | str]:
    """Read ``events`` messages: (arrival of the last, count, the last message or an error)."""
    count = 0
    last: bytes | str = "no message"
    try:
        while count < events:
            message = await read()
            if message is None:
                last = f"stream ended after {count} messages"
                break
            count += 1
            last = message
    except Exception as exc:  # reported to the orchestrator, which fails the trial
        last = f"stream failed after {count} messages: {exc!r}"
    return time.monotonic(), count, last


def _check(
    stubs: Stubs, results: list[tuple[float, int, bytes | str]], *, n: int, events: int
) -> list[str]:
    """What went wrong: streams that timed out, ended early or did not end on the last event."""
    errors = [f"{n - len(results)} of {n} streams timed out"] if len(results) < n else []
    for _, count, last in results:
        if isinstance(last, str):
            errors.append(last)
        elif (seq := stubs.messages.Response.FromString(last).seq) != events or count != events:
            errors.append(f"{count} messages, the last with seq {seq}; expected {events}")
    return errors[:10]


class _Grpcio:
    """Subscribers on ``grpc.aio`` channels, one TCP connection each."""

    def __init__(self, stubs: Stubs) -> None:
        self._stubs = stubs
        self._channels: list[Any] = []
        self._calls: list[Any] = []

    async def open(self, port: int, n: int, connections: int) -> list[Read]:
        import grpc

        self._channels = [
            grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=GRPCIO_OPTIONS)
            for _ in range(min(connections, n))
        ]
        request = self._stubs.messages.Request
        methods = [
            channel.unary_stream(
                SUBSCRIBE, request_serializer=request.SerializeToString, response_deserializer=None
            )
            for channel in self._channels
        ]
        self._calls = [methods[i % len(methods)](request(id=i)) for i in range(n)]
        await asyncio.gather(*(call.initial_metadata() for call in self._calls))
        return [self._reader(call, grpc.aio.EOF) for call in self._calls]

    @staticmethod
    def _reader(call: Any, eof: object) -> Read:
        async def read() -> bytes | None:
            message = await call.read()
            return None if message is eof else message

        return read

    async def close(self) -> None:
        for call in self._calls:
            call.cancel()
        await asyncio.gather(*(channel.close() for channel in self._channels))


class _Grpclib:
    """Subscribers on grpclib channels, one TCP connection each."""

    def __init__(self, stubs: Stubs) -> None:
        self._stubs = stubs
        self._channels: list[Any] = []
        self._streams: list[Any] = []
        self._stack = contextlib.AsyncExitStack()

    async def open(self, port: int, n: int, connections: int) -> list[Read]:
        from grpclib.client import Channel

        self._channels = [
            Channel("127.0.0.1", port, codec=_raw_codec()) for _ in range(min(connections, n))
        ]
        # One stream per connection first, so the server's SETTINGS are acknowledged before
        # the rest: see the README (a server that raises h2's limit of 100 streams only after
        # the connection starts enforces 100 until the client acknowledges the new value).
        count = len(self._channels)
        for i in range(n):
            stream = await self._subscribe(i, self._channels[i % count])
            if i < count:
                await stream.recv_initial_metadata()
            self._streams.append(stream)
        rest = self._streams[count:]
        await asyncio.gather(*(stream.recv_initial_metadata() for stream in rest))
        return [stream.recv_message for stream in self._streams]

    async def _subscribe(self, id: int, channel: Any) -> Any:
        from grpclib.const import Cardinality

        request = channel.request(SUBSCRIBE, Cardinality.UNARY_STREAM, bytes, bytes)
        stream = await self._stack.enter_async_context(request)
        await stream.send_request()
        await stream.send_message(self._stubs.messages.Request(id=id).SerializeToString(), end=True)
        return stream

    async def close(self) -> None:
        from grpclib.exceptions import ProtocolError, StreamTerminatedError

        try:
            for stream in self._streams:
                with contextlib.suppress(ProtocolError, StreamTerminatedError):
                    await stream.cancel()  # RST_STREAM: the stream's context then exits at once
            await self._stack.aclose()
        finally:
            for channel in self._channels:
                channel.close()


def _raw_codec() -> Any:
    """A grpclib codec that passes bytes through both ways."""
    from grpclib.encoding.base import CodecBase

    class RawCodec(CodecBase):
        __content_subtype__ = "proto"

        def encode(self, message: Any, message_type: Any) -> bytes:
            return message  # type: ignore[no-any-return]

        def decode(self, data: bytes, message_type: Any) -> Any:
            return data

    return RawCodec()
