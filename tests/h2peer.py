"""Hostile HTTP/2 peers for tests, over loopback sockets.

``H2Peer`` speaks through the h2 library's state machine: it does what well-behaved gRPC
clients never do (opens streams and abandons them, resets them by the thousand, grants huge
windows and then stops reading) but always sends valid HTTP/2. ``RawPeer`` writes any bytes
at all (broken frames, header blocks of any size, frames out of order) and reads the
server's answers as frames, without a state machine to object to them.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Callable, Iterable
from urllib.parse import unquote

import h2.config
import h2.connection
import h2.events
import h2.settings
import hpack
from hyperframe.frame import (
    ContinuationFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
)

from longlived import Request, Settings

__all__ = [
    "PREFACE",
    "H2Peer",
    "RawPeer",
    "frame",
    "grpc_body",
    "header_frames",
    "request_headers",
]

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
"""The client connection preface (RFC 9113 3.4), without its SETTINGS frame."""

DATA, HEADERS, RST_STREAM, SETTINGS, PING, CONTINUATION = 0x0, 0x1, 0x3, 0x4, 0x6, 0x9
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1


def request_headers(
    path: str = "/longlived.Longlived/Subscribe", **extra: str
) -> list[tuple[str, str]]:
    """The headers of a gRPC call to ``path``."""
    return [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "127.0.0.1"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        *extra.items(),
    ]


def grpc_body(request: Request) -> bytes:
    """One length-prefixed gRPC message."""
    data = bytes(request)
    return struct.pack(">?I", False, len(data)) + data


class H2Peer:
    """One raw HTTP/2 client connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.events: list[h2.events.Event] = []

    @classmethod
    async def connect(cls, settings: Settings, *, window: int | None = None) -> H2Peer:
        """Connect to ``settings.address``; ``window``: the flow-control windows granted."""
        reader, writer = await asyncio.open_connection(settings.host, settings.port)
        peer = cls(reader, writer)
        peer.h2.initiate_connection()
        if window is not None:
            peer.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
            peer.h2.increment_flow_control_window(window - 65_535)
        await peer.flush()
        return peer

    async def flush(self) -> None:
        self.writer.write(self.h2.data_to_send())
        await self.writer.drain()

    def open(self, headers: Iterable[tuple[str, str]], body: bytes | None = None) -> int:
        """Start a stream (send nothing more if ``body`` is None); its id."""
        stream_id = self.h2.get_next_available_stream_id()
        self.h2.send_headers(stream_id, list(headers), end_stream=False)
        if body is not None:
            self.h2.send_data(stream_id, body, end_stream=True)
        return stream_id

    async def read_until(
        self, kind: type[h2.events.Event], *, stream_id: int | None = None
    ) -> h2.events.Event:
        """Read and answer frames until an event of ``kind`` (on ``stream_id``) arrives."""
        while True:
            for event in self.events:
                if isinstance(event, kind) and (
                    stream_id is None or getattr(event, "stream_id", None) == stream_id
                ):
                    return event
            data = await self.reader.read(65_536)
            if not data:
                raise ConnectionResetError("the server closed the connection")
            self.events += self.h2.receive_data(data)
            self.writer.write(self.h2.data_to_send())  # settings acks, pings

    async def read_data(self, stream_id: int, *, until: bytes) -> bytes:
        """Read ``stream_id``'s DATA, granting window as it arrives, until ``until`` appears."""
        received = bytearray()
        while until not in received:
            data = await self.reader.read(65_536)
            if not data:
                raise ConnectionResetError("the server closed the connection")
            for event in self.h2.receive_data(data):
                if isinstance(event, h2.events.DataReceived) and event.stream_id == stream_id:
                    received += event.data
                    self.h2.acknowledge_received_data(event.flow_controlled_length, stream_id)
            self.writer.write(self.h2.data_to_send())
        return bytes(received)

    async def status(self, stream_id: int) -> tuple[int, str]:
        """``grpc-status`` and ``grpc-message`` of ``stream_id`` (trailers-only or trailers)."""
        await self.read_until(h2.events.StreamEnded, stream_id=stream_id)
        headers: dict[bytes, bytes] = {}
        for event in self.events:
            if (
                isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived))
                and event.stream_id == stream_id
            ):
                headers.update(dict(event.headers or []))
        return int(headers[b"grpc-status"]), unquote(headers.get(b"grpc-message", b"").decode())

    def close(self) -> None:
        self.writer.transport.abort()


def frame(kind: int, stream_id: int = 0, payload: bytes = b"", *, flags: int = 0) -> bytes:
    """One HTTP/2 frame as bytes, whatever its fields (nothing is checked)."""
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(
        ">I", stream_id
    ) + payload  # fmt: skip


def header_frames(
    stream_id: int, headers: Iterable[tuple[str, str]], *, end_stream: bool = False
) -> bytes:
    """HEADERS (and CONTINUATION) frames of ``headers``, each field a literal that is never
    indexed and not Huffman-coded: no HPACK state, and fast at any size (hpack's Huffman
    encoder is quadratic)."""
    fields = [hpack.NeverIndexedHeaderTuple(name, value) for name, value in headers]
    block = hpack.Encoder().encode(fields, huffman=False)
    step = 16_384
    chunks = [block[start : start + step] for start in range(0, len(block), step)] or [b""]
    out = []
    for n, chunk in enumerate(chunks):
        last = END_HEADERS if n == len(chunks) - 1 else 0
        if n == 0:
            out.append(frame(HEADERS, stream_id, chunk, flags=last | (END_STREAM * end_stream)))
        else:
            out.append(frame(CONTINUATION, stream_id, chunk, flags=last))
    return b"".join(out)


class RawPeer:
    """One client connection that writes any bytes and reads the server's frames.

    The server's header blocks are decoded in order (its HPACK state is the connection's);
    ``statuses`` holds each stream's ``grpc-status`` once one arrived.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.frames: list[Frame] = []
        self.headers: dict[int, dict[bytes, bytes]] = {}
        """Each stream's header fields so far (the initial ones and the trailers)."""
        self.eof = False
        self.reset_by_server = False
        """The connection ended with a reset (TCP RST), not a close."""
        self._buffer = b""
        self._block: list[bytes] = []
        self._decoder = hpack.Decoder(max_header_list_size=1 << 30)
        self._decoder.max_allowed_table_size = 1 << 30

    @classmethod
    async def connect(cls, settings: Settings, *, preface: bool = True) -> RawPeer:
        """Connect to ``settings.address``; with ``preface``, send the connection preface
        and an empty SETTINGS frame."""
        reader, writer = await asyncio.open_connection(settings.host, settings.port)
        peer = cls(reader, writer)
        if preface:
            peer.write(PREFACE + frame(SETTINGS))
        return peer

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    def half_close(self) -> None:
        """Send what is written, then end the connection's sending side (FIN)."""
        if not self.writer.is_closing() and self.writer.can_write_eof():
            with contextlib.suppress(OSError):  # the server has closed it already
                self.writer.write_eof()

    def close(self) -> None:
        self.writer.transport.abort()

    def status(self, stream_id: int) -> int | None:
        """``stream_id``'s ``grpc-status``, if it arrived."""
        value = self.headers.get(stream_id, {}).get(b"grpc-status")
        return int(value) if value is not None else None

    def goaway(self) -> GoAwayFrame | None:
        return next((f for f in self.frames if isinstance(f, GoAwayFrame)), None)

    def reset(self, stream_id: int) -> RstStreamFrame | None:
        return next(
            (f for f in self.frames if isinstance(f, RstStreamFrame) and f.stream_id == stream_id),
            None,
        )

    def pinged(self, opaque: bytes = bytes(8)) -> bool:
        """Whether the PING ACK of ``opaque`` arrived."""
        return any(
            isinstance(f, PingFrame) and "ACK" in f.flags and f.opaque_data == opaque
            for f in self.frames
        )

    async def until(self, done: Callable[[RawPeer], bool]) -> bool:
        """Read until ``done(self)`` holds (True) or the server closes the connection (then
        ``done`` once more). Unbounded by itself: the caller bounds it."""
        while not done(self):
            if self.eof:
                return False
            try:
                data = await self.reader.read(65_536)
            except OSError:  # reset by the server
                data = b""
                self.reset_by_server = True
            if not data:
                self.eof = True
                continue
            self._feed(data)
        return True

    def _feed(self, data: bytes) -> None:
        self._buffer += data
        while len(self._buffer) >= 9:
            header, length = Frame.parse_frame_header(memoryview(self._buffer[:9]))
            if len(self._buffer) < 9 + length:
                return
            header.parse_body(memoryview(self._buffer[9 : 9 + length]))
            self._buffer = self._buffer[9 + length :]
            self.frames.append(header)
            if isinstance(header, (HeadersFrame, ContinuationFrame)):
                self._block.append(header.data)
                if "END_HEADERS" in header.flags:
                    fields = self._decoder.decode(b"".join(self._block), raw=True)
                    self._block = []
                    self.headers.setdefault(header.stream_id, {}).update(
                        (bytes(name), bytes(value)) for name, value in fields
                    )
