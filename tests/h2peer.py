"""A hostile HTTP/2 peer for tests: raw frames from the h2 library over a loopback socket.

It does what well-behaved gRPC clients never do: opens streams and abandons them, resets
them by the thousand, grants huge windows and then stops reading.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Iterable
from urllib.parse import unquote

import h2.config
import h2.connection
import h2.events
import h2.settings

from longlived import Request, Settings

__all__ = ["H2Peer", "grpc_body", "request_headers"]


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
