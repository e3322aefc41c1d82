"""The floor: what delivering a message costs with no gRPC or HTTP/2 machinery per message.

A raw asyncio server that does the minimal HTTP/2 handshake with h2 (SETTINGS, the
request's HEADERS and DATA, response headers, PINGs and WINDOW_UPDATEs), then writes
each event as a pre-framed HTTP/2 DATA frame (9-byte frame header, 5-byte gRPC prefix, the
encoded ``Response``) straight to the socket: one ``transport.write`` per message per
subscriber, h2 never sees them. It respects the client's flow-control windows (counted
here, from h2's WINDOW_UPDATE and SETTINGS events), and the event is encoded once, by hand
(three fields). It is not a usable server (no status, no trailers, no limits); it shows
how far below the servers' costs the machine's own floor is, in the same run.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings

__all__ = ["Floor"]

_HEADERS = [(b":status", b"200"), (b"content-type", b"application/grpc")]


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(number: int, data: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def encode(data: str, seq: int, token: str) -> bytes:
    """``Response(data=data, seq=seq, token=token)``, as protobuf encodes it."""
    return _field(1, data.encode()) + b"\x10" + _varint(seq) + _field(3, token.encode())


class _Connection(asyncio.Protocol):
    """One client connection: h2 for everything but the events' DATA frames."""

    def __init__(self, floor: Floor) -> None:
        self.floor = floor
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        self.h2 = h2.connection.H2Connection(config)
        self.transport: Any = None
        self.window = 65_535  # the connection's send window
        self.streams: dict[int, int] = {}  # stream id -> its send window, once subscribed
        self.pending: list[tuple[int, bytes]] = []  # frames waiting for window

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.h2.initiate_connection()
        transport.write(self.h2.data_to_send())

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except Exception:  # a protocol error: the floor just drops the connection
            self.transport.close()
            return
        for event in events:
            self._event(event)
        if out := self.h2.data_to_send():
            self.transport.write(out)
        if self.pending:
            self._flush()

    def _event(self, event: Any) -> None:
        if isinstance(event, h2.events.DataReceived):
            if event.flow_controlled_length:
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded):  # the request is in: subscribed
            self.h2.send_headers(event.stream_id, _HEADERS)
            self.streams[event.stream_id] = self.h2.remote_settings.initial_window_size
            self.floor.subscribers[(self, event.stream_id)] = None
            self.floor.changed.set()
        elif isinstance(event, h2.events.WindowUpdated):
            if event.stream_id == 0:
                self.window += event.delta
            elif event.stream_id in self.streams:
                self.streams[event.stream_id] += event.delta
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            changed = event.changed_settings.get(h2.settings.SettingCodes.INITIAL_WINDOW_SIZE)
            if changed is not None and changed.original_value is not None:
                delta = changed.new_value - changed.original_value
                for stream_id in self.streams:
                    self.streams[stream_id] += delta
        elif isinstance(event, h2.events.StreamReset):
            self._forget(event.stream_id)

    def send(self, stream_id: int, frame: bytes) -> None:
        """Write ``frame`` now if the windows allow, else queue it."""
        size = len(frame) - 9
        if not self.pending and self.window >= size and self.streams[stream_id] >= size:
            self.window -= size
            self.streams[stream_id] -= size
            self.transport.write(frame)
        else:
            self.pending.append((stream_id, frame))

    def _flush(self) -> None:
        while self.pending:
            stream_id, frame = self.pending[0]
            size = len(frame) - 9
            if stream_id not in self.streams:
                self.pending.pop(0)
                continue
            if self.window < size or self.streams[stream_id] < size:
                return
            self.pending.pop(0)
            self.window -= size
            self.streams[stream_id] -= size
            self.transport.write(frame)

    def _forget(self, stream_id: int) -> None:
        self.streams.pop(stream_id, None)
        if self.floor.subscribers.pop((self, stream_id), 0) is None:
            self.floor.changed.set()

    def connection_lost(self, exc: Exception | None) -> None:
        for stream_id in list(self.streams):
            self._forget(stream_id)


class Floor:
    """The floor server: pre-framed DATA frames written straight to the sockets."""

    name = "floor"

    def __init__(self) -> None:
        self.subscribers: dict[tuple[_Connection, int], None] = {}
        self.changed = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._epoch = secrets.token_hex(8)

    async def start(self, port: int = 0) -> int:
        loop = asyncio.get_running_loop()
        sock = socket.create_server(("127.0.0.1", port))
        self._server = await loop.create_server(lambda: _Connection(self), sock=sock)
        bound: int = sock.getsockname()[1]
        return bound

    def subscribed(self) -> int:
        return len(self.subscribers)

    async def wait_subscribed(self, count: int) -> None:
        while len(self.subscribers) < count:
            self.changed.clear()
            await self.changed.wait()

    def publish(self, data: str, index: int) -> None:
        """Encode once, frame once per stream id, one write per subscriber."""
        message = encode(data, index, f"{self._epoch}:{index}")
        body = b"\x00" + len(message).to_bytes(4, "big") + message
        head = len(body).to_bytes(3, "big") + b"\x00\x00"
        frames: dict[int, bytes] = {}
        for connection, stream_id in self.subscribers:
            frame = frames.get(stream_id)
            if frame is None:
                frame = frames[stream_id] = head + stream_id.to_bytes(4, "big") + body
            connection.send(stream_id, frame)

    async def emit(self, data: str, index: int) -> None:
        self.publish(data, index)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for connection, _ in list(self.subscribers):
                connection.transport.close()
            self.subscribers.clear()
            await self._server.wait_closed()
