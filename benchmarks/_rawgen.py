"""A lean HTTP/2 load generator: subscribers read straight off the socket.

The grpcio load generator costs 25-90 us per received message here, so at 20,000
deliveries per second it, not the server, sets the pace (the reports marked such figures
*gen-bound*). This one speaks just enough HTTP/2 to be a correct gRPC client of
``Subscribe`` and nothing more: per connection it sends the preface, its SETTINGS (the
largest stream window, push off) and a WINDOW_UPDATE opening the connection window as
wide; per stream a HEADERS frame (hpack-encoded once per connection by the ``hpack``
package h2 uses) and the request in one DATA frame with END_STREAM. It acknowledges
SETTINGS and PING, decodes response headers and trailers with hpack (so ``grpc-status``
and ``grpc-message`` of a failed stream are reported), and parses DATA frames into gRPC
length-prefixed messages, across frame boundaries when a message spans them. It gives
the windows back when half of them is used, so no server is ever throttled by it.

The same for every server: each is read by the same bytes-level code, so a ratio between
servers measures the servers. ``_Subscribers`` in ``_loadgen`` keeps the grpcio reader
(``--loadgen grpcio``) for a run that wants the official client on the other end.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from array import array
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, cast

import hpack

from benchmarks._common import SUBSCRIBE, Stubs, stamp, summary

__all__ = ["RawSubscribers"]

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = (
    0,
    1,
    3,
    4,
    6,
    7,
    8,
    9,
)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY = 0x1, 0x1, 0x4, 0x8, 0x20
WINDOW = 2**31 - 1
DEFAULT_WINDOW = 65_535
GIVE_BACK = 2**30
"""Bytes received on a stream or connection after which its window is topped up again."""
OPEN_BATCH = 100
"""Streams opened at once, as the grpcio generator does (more would overflow a small accept
backlog, and grpc.aio cancelled some of 10,000 opened at once, 100 per connection)."""


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    """One HTTP/2 frame."""
    return (
        len(payload).to_bytes(3, "big") + bytes((kind, flags)) + stream.to_bytes(4, "big") + payload
    )


def window_update(stream: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, stream, increment.to_bytes(4, "big"))


def _strip(flags: int, payload: bytes, *, headers: bool = False) -> bytes:
    """``payload`` without padding (and a HEADERS frame's priority fields)."""
    start, end = 0, len(payload)
    if flags & PADDED:
        start, end = 1, end - payload[0]
    if headers and flags & PRIORITY:
        start += 5
    return payload[start:end]


class _Stream:
    __slots__ = ("block", "consumed", "count", "done_at", "error", "headers", "last", "pending")

    def __init__(self) -> None:
        self.headers = False
        self.count = 0
        self.last = b""
        self.pending = b""
        self.consumed = 0
        self.block = b""  # a header block waiting for its CONTINUATION frames
        self.done_at: float | None = None
        self.error: str | None = None


class _Connection(asyncio.Protocol):
    """One TCP connection carrying ``len(ids)`` Subscribe streams."""

    def __init__(self, owner: RawSubscribers, port: int, requests: list[bytes]) -> None:
        self.owner = owner
        self.port = port
        self.requests = requests
        self.streams: dict[int, _Stream] = {}
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.consumed = 0
        self.decoder = hpack.Decoder()
        self.decoder.max_header_list_size = 1 << 20
        self.continuing: int | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # -- asyncio

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # not isinstance-checked: uvloop's transports are not asyncio.Transport subclasses
        self.transport = transport = cast(asyncio.Transport, transport)
        encoder = hpack.Encoder()
        out = [
            PREFACE,
            frame(
                SETTINGS,
                0,
                0,
                b"\x00\x02\x00\x00\x00\x00" + b"\x00\x04" + WINDOW.to_bytes(4, "big"),
            ),
            window_update(0, WINDOW - DEFAULT_WINDOW),
        ]
        headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", SUBSCRIBE),
            (":authority", f"127.0.0.1:{self.port}"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
        for i, request in enumerate(self.requests):
            stream_id = 2 * i + 1
            self.streams[stream_id] = _Stream()
            message = b"\x00" + len(request).to_bytes(4, "big") + request
            out.append(frame(HEADERS, END_HEADERS, stream_id, encoder.encode(headers)))
            out.append(frame(DATA, END_STREAM, stream_id, message))
        transport.write(b"".join(out))

    def connection_lost(self, exc: Exception | None) -> None:
        for stream in self.streams.values():
            if stream.done_at is None and stream.error is None:
                why = f": {exc}" if exc is not None else ""
                self._fail(stream, f"connection lost after {stream.count} messages{why}")
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        now = time.monotonic_ns()
        size, at = len(buffer), 0
        while size - at >= 9:
            length = int.from_bytes(buffer[at : at + 3], "big")
            end = at + 9 + length
            if end > size:
                break
            kind, flags = buffer[at + 3], buffer[at + 4]
            stream_id = int.from_bytes(buffer[at + 5 : at + 9], "big") & 0x7FFF_FFFF
            payload = buffer[at + 9 : end]
            at = end
            if kind == DATA:
                self._data(stream_id, flags, payload, now)
            else:
                self._control(kind, flags, stream_id, payload)
        self.buffer = buffer[at:]

    # -- frames

    def _data(self, stream_id: int, flags: int, payload: bytes, now: int) -> None:
        stream = self.streams[stream_id]
        self.consumed += len(payload)
        stream.consumed += len(payload)
        if self.consumed > GIVE_BACK or stream.consumed > GIVE_BACK:
            self._give_back(stream_id, stream)
        if flags & PADDED:
            payload = _strip(flags, payload)
        if stream.pending:
            payload = stream.pending + payload
        size, at = len(payload), 0
        on_message = self.owner.on_message
        while size - at >= 5:
            length = int.from_bytes(payload[at + 1 : at + 5], "big")
            end = at + 5 + length
            if end > size:
                break
            on_message(stream, payload[at + 5 : end], now)
            at = end
        stream.pending = payload[at:]
        if flags & END_STREAM and stream.done_at is None:
            self._fail(stream, f"stream ended after {stream.count} messages, without trailers")

    def _give_back(self, stream_id: int, stream: _Stream) -> None:
        assert self.transport is not None
        self.transport.write(
            window_update(0, self.consumed) + window_update(stream_id, stream.consumed)
        )
        self.consumed = stream.consumed = 0

    def _control(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        assert self.transport is not None
        if kind == HEADERS:
            block = _strip(flags, payload, headers=True)
            if flags & END_HEADERS:
                self._headers(stream_id, flags, block)
            else:
                self.streams[stream_id].block = block
                self.continuing = stream_id | (flags & END_STREAM) << 31
        elif kind == CONTINUATION:
            assert self.continuing is not None
            stream = self.streams[stream_id]
            stream.block += payload
            if flags & END_HEADERS:
                ended = self.continuing >> 31
                self.continuing, block, stream.block = None, stream.block, b""
                self._headers(stream_id, END_STREAM if ended else 0, block)
        elif kind == SETTINGS and not flags & ACK:
            self.transport.write(frame(SETTINGS, ACK, 0))
        elif kind == PING and not flags & ACK:
            self.transport.write(frame(PING, ACK, 0, payload))
        elif kind == RST_STREAM:
            code = int.from_bytes(payload[:4], "big")
            self._fail(self.streams[stream_id], f"stream reset (code {code})")
        elif kind == GOAWAY:
            last = int.from_bytes(payload[:4], "big") & 0x7FFF_FFFF
            error = int.from_bytes(payload[4:8], "big")
            for sid, stream in self.streams.items():
                if sid > last:
                    self._fail(stream, f"GOAWAY (code {error}) before the stream began")
        # WINDOW_UPDATE, PRIORITY, PUSH_PROMISE (refused by SETTINGS), unknown: nothing to do

    def _headers(self, stream_id: int, flags: int, block: bytes) -> None:
        fields = {str(k): str(v) for k, v in self.decoder.decode(block)}
        stream = self.streams[stream_id]
        if not stream.headers:
            stream.headers = True
            self.owner.on_headers()
        if flags & END_STREAM:
            status = fields.get("grpc-status", "?")
            if status != "0" or stream.done_at is None:
                message = fields.get("grpc-message", "")
                self._fail(
                    stream,
                    f"stream ended after {stream.count} messages: grpc-status {status} {message}",
                )

    def _fail(self, stream: _Stream, error: str) -> None:
        if stream.error is None and stream.done_at is None:
            stream.error = error
            self.owner.on_finished()
            if not stream.headers:  # refused while opening: open() must not wait for it
                self.owner.on_refused()


class RawSubscribers:
    """N ``Subscribe`` streams on raw HTTP/2 connections: the ``_Subscribers`` interface."""

    def __init__(self, stubs: Stubs) -> None:
        self.stubs = stubs
        self.connections: list[_Connection] = []
        self.events = 0
        self.stamp = False
        self.latencies = array("q")
        self.remaining = 0
        self.waiting: asyncio.Future[None] | None = None
        self.headers_seen = 0

    # -- callbacks from the connections

    def on_headers(self) -> None:
        self.headers_seen += 1
        self._check_waiting(self.headers_seen >= self.expected_headers)

    def on_message(self, stream: _Stream, message: bytes, now: int) -> None:
        stream.count += 1
        if stream.done_at is not None:  # one too many: read() reports the count
            return
        stream.last = message
        if self.stamp:
            self.latencies.append(now - stamp(message))
        if stream.count == self.events and stream.done_at is None and stream.error is None:
            stream.done_at = now / 1e9
            self.on_finished()

    def on_refused(self) -> None:
        self._check_waiting(self.events == -1)  # only open() waits with events unset

    def on_finished(self) -> None:
        self.remaining -= 1
        self._check_waiting(self.remaining <= 0)

    def _check_waiting(self, ready: bool) -> None:
        if ready and self.waiting is not None and not self.waiting.done():
            self.waiting.set_result(None)

    # -- the interface

    expected_headers = 0

    async def open(self, port: int, n: int, per_connection: int) -> float:
        """Open ``n`` streams, ``per_connection`` per TCP connection; seconds it took."""
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        request = self.stubs.messages.Request
        self.remaining = n  # streams neither done nor failed (events is set by read)
        self.events = -1
        groups = [
            [
                request(id=i).SerializeToString()
                for i in range(first, min(first + per_connection, n))
            ]
            for first in range(0, n, per_connection)
        ]
        step = max(1, OPEN_BATCH // per_connection)  # connections per batch
        for first in range(0, len(groups), step):
            batch = groups[first : first + step]
            self.expected_headers = self.headers_seen + sum(len(g) for g in batch)
            self.waiting = loop.create_future()
            made = await asyncio.gather(
                *(loop.create_connection(self._factory(port, g), "127.0.0.1", port) for g in batch)
            )
            self.connections += [protocol for _, protocol in made]
            if self.headers_seen < self.expected_headers:
                await self._until_ready()
            failed = [s.error for c in self.connections for s in c.streams.values() if s.error]
            if failed:
                raise RuntimeError(f"a stream failed while opening: {failed[0]}")
        self.waiting = None
        return time.monotonic() - started

    def _factory(self, port: int, requests: list[bytes]) -> Callable[[], _Connection]:
        return lambda: _Connection(self, port, requests)

    async def _until_ready(self) -> None:
        assert self.waiting is not None
        waiting, failed = self.waiting, self._any_failed()
        while not waiting.done() and not failed.done():
            await asyncio.wait([waiting, failed], return_when=asyncio.FIRST_COMPLETED)
        failed.cancel()

    def _any_failed(self) -> asyncio.Future[Any]:
        return asyncio.ensure_future(
            asyncio.wait([c.closed for c in self.connections], return_when="FIRST_COMPLETED")
        )

    async def read(
        self, conn: Connection, mode: str, events: int, *, timeout: float
    ) -> dict[str, Any]:
        """Count every stream's messages as ``mode`` says; the trial's result."""
        loop = asyncio.get_running_loop()
        streams = [s for c in self.connections for s in c.streams.values()]
        self.stamp = mode == "latency"
        self.latencies = array("q")
        self.events = events
        for stream in streams:
            stream.count = 0
        self.remaining = sum(1 for s in streams if s.error is None)
        self.waiting = loop.create_future()
        cpu0 = time.process_time()
        conn.send(("reading",))
        if self.remaining > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.waiting), timeout)
        cpu = time.process_time() - cpu0
        errors = [s.error for s in streams if s.error]
        pending = sum(1 for s in streams if s.error is None and s.done_at is None)
        if pending:
            errors.insert(0, f"{pending} of {len(streams)} streams timed out")
        last_seq = events if mode != "final" else None
        for stream in streams:
            if stream.done_at is None:
                continue
            seq = (
                None
                if last_seq is None
                else self.stubs.messages.Response.FromString(stream.last).seq
            )
            if stream.count != events or seq != last_seq:
                errors.append(
                    f"{stream.count} messages, message {events} with seq {seq}; expected "
                    f"{events}" + ("" if last_seq is None else f", the last with seq {last_seq}")
                )
        result: dict[str, Any] = {
            "t_last": max((s.done_at for s in streams if s.done_at is not None), default=0.0),
            "cpu": cpu,
            "received": sum(s.count for s in streams),
            "last_bytes": next((len(s.last) for s in streams if s.done_at is not None), None),
            "errors": errors[:10],
        }
        if self.stamp:
            result["latency_ms"] = summary(self.latencies)
        return result

    async def close(self) -> None:
        connections, self.connections = self.connections, []
        for connection in connections:
            if connection.transport is not None:
                connection.transport.close()
        if connections:
            await asyncio.wait([c.closed for c in connections])
