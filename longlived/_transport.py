"""The transport: the one module that touches grpclib and h2 internals.

Codec, HTTP/2 settings, keepalive (grpclib exposes it only as private ``Configuration``
fields), the connection registry, bounded request reads and abortable writes.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import struct
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any

import betterproto2
import grpclib.server
from google.protobuf import message_factory
from grpclib.client import Channel
from grpclib.config import Configuration
from grpclib.const import Status
from grpclib.encoding.base import CodecBase
from grpclib.exceptions import GRPCError
from grpclib.protocol import Connection, H2Protocol
from h2.exceptions import ProtocolError as H2ProtocolError
from h2.settings import SettingCodes

if TYPE_CHECKING:
    from grpclib._typing import IServable

    from longlived.settings import KeepaliveSettings

__all__ = [
    "GrpcServer",
    "PassThroughCodec",
    "ResilientChannel",
    "decode_request",
    "end_stream",
    "grpc_config",
    "recv_request",
    "too_large",
    "write_message",
    "write_messages",
]


def grpc_config(keepalive: KeepaliveSettings, *, server_name: str | None = None) -> Configuration:
    """grpclib ``Configuration`` with these keepalive settings (for servers and channels).

    ``server_name`` (clients) is the name the server's TLS certificate is checked against.
    """
    return Configuration(
        ssl_target_name_override=server_name,
        _keepalive_time=keepalive.time,
        _keepalive_timeout=keepalive.timeout,
        _keepalive_permit_without_calls=keepalive.permit_without_calls,
        _http2_max_pings_without_data=keepalive.max_pings_without_data,
        # grpclib otherwise waits 300 s between pings while no data flows
        _http2_min_sent_ping_interval_without_data=keepalive.time or 300.0,
    )


log = logging.getLogger(__name__)


class PassThroughCodec(CodecBase):
    """Protobuf codec that sends ``bytes`` as they are, so an event is encoded only once.

    Requests larger than ``max_size`` or that do not parse get a clear status, not a crash.
    """

    __content_subtype__ = "proto"

    def __init__(self, *, max_size: int = 65_536) -> None:
        self.max_size = max_size

    def encode(self, message: Any, message_type: Any) -> bytes:
        if isinstance(message, bytes):
            return message
        if not isinstance(message, message_type):
            raise TypeError(f"Message must be of type {message_type!r}, not {type(message)!r}")
        return message.SerializeToString()  # type: ignore[no-any-return]  # any protobuf message

    def decode(self, data: bytes, message_type: Any) -> Any:
        # used for the services grpclib runs itself (health, reflection); the Longlived
        # handlers read their request with _streamio.recv_request, which logs on refusal
        try:
            return decode_request(data, message_type, max_size=self.max_size)
        except GRPCError as exc:
            log.warning("Rejected a request: %s (%s)", exc.message, exc.status.name)
            raise


def too_large(size: int, max_size: int) -> GRPCError:
    """The status for a request of ``size`` bytes over the limit."""
    return GRPCError(
        Status.RESOURCE_EXHAUSTED, f"request of {size} bytes exceeds the limit of {max_size}"
    )


def decode_request(data: bytes, message_type: Any, *, max_size: int) -> Any:
    """Decode one request body, or raise the status that names what is wrong with it."""
    if len(data) > max_size:
        raise too_large(len(data), max_size)
    try:
        if isinstance(message_type, type) and issubclass(message_type, betterproto2.Message):
            # betterproto2 skips what it cannot read; protobuf's parser is strict about the wire
            _strict_class(message_type).FromString(data)
        return message_type.FromString(data)
    except Exception as exc:
        raise GRPCError(
            Status.INVALID_ARGUMENT, f"malformed {message_type.__name__} message: {exc}"
        ) from None


@functools.cache
def _strict_class(message_type: Any) -> Any:
    """protobuf's own message class for a generated betterproto2 message type."""
    return message_factory.GetMessageClass(message_type.DESCRIPTOR)


class _Connection(Connection):
    """grpclib's connection, but a close (keepalive timeout) never waits on a frozen peer,
    and bytes that are not HTTP/2 get a log line before the connection is dropped."""

    def feed(self, data: bytes) -> list[Any]:
        try:
            return super().feed(data)
        except H2ProtocolError as exc:
            peer = self.get_peer().addr() if hasattr(self, "_transport") else "?"
            log.warning("Closing the connection from %s: not valid HTTP/2 (%s)", peer, exc)
            raise

    def close(self) -> None:
        # transport.close() flushes first: with a peer that stopped reading it never ends.
        transport = getattr(self, "_transport", None)
        if transport is not None and transport.get_write_buffer_size():
            transport.abort()
        super().close()


class _Protocol(H2Protocol):
    """grpclib's protocol with a raised MAX_CONCURRENT_STREAMS and a registry of live peers."""

    max_streams: int = 100
    registry: set[_Protocol]
    idle: asyncio.Event

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self.connection.__class__ = _Connection
        # h2 advertises 100 by default: a client's 101st stream on one connection would hang.
        h2_conn = self.connection._connection
        h2_conn.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: self.max_streams})
        # h2 enforces its own new limit only once the peer acknowledges it, so a client that
        # opens streams before reading this SETTINGS frame would be cut off at 100. Raising
        # our own limit at once is safe.
        h2_conn.local_settings._settings[SettingCodes.MAX_CONCURRENT_STREAMS][0] = self.max_streams
        self.connection.flush()
        self.registry.add(self)
        self.idle.clear()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.registry.discard(self)
        if not self.registry:
            self.idle.set()
        super().connection_lost(exc)

    def busy(self) -> bool:
        """Whether any stream on this connection is open."""
        return any(stream.open for stream in self.connection._connection.streams.values())

    def goaway(self) -> None:
        """Tell the peer no new streams will be accepted, then close the connection."""
        if self.connection.is_closing():
            return
        self.connection._connection.close_connection()
        self.connection.flush()
        self.connection.close()


class GrpcServer(grpclib.server.Server):
    """A grpclib ``Server`` that advertises ``max_streams`` and can close its connections."""

    def __init__(
        self,
        handlers: Collection[IServable],
        *,
        max_streams: int,
        max_message_size: int = 65_536,
        config: Configuration | None = None,
    ) -> None:
        super().__init__(handlers, codec=PassThroughCodec(max_size=max_message_size), config=config)
        self._max_streams = max_streams
        self._protocols: set[_Protocol] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    def _protocol_factory(self) -> H2Protocol:
        base = super()._protocol_factory()
        proto = _Protocol(base.handler, base.config, base.h2_config)
        proto.max_streams = self._max_streams
        proto.registry = self._protocols
        proto.idle = self._idle
        return proto

    async def wait_disconnected(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for every client to close its connection."""
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    @property
    def connections(self) -> int:
        """Open client connections."""
        return len(self._protocols)

    def idle_connections(self) -> list[_Protocol]:
        """Open connections that carry no stream right now."""
        return [proto for proto in self._protocols if not proto.busy()]

    async def drain(self, idle: Sequence[object], *, grace: float, timeout: float) -> None:
        """Stop listening, then close connections: ``idle`` ones (no streams when the drain
        began) at once, the others after up to ``grace`` seconds, all with GOAWAY."""
        self.close()
        for proto in self.idle_connections():
            if proto in idle:
                proto.goaway()
        # Clients that read their final status close their connections themselves; a GOAWAY
        # arriving together with the status would make some clients drop it unread.
        await self.wait_disconnected(grace)
        self.goaway_all()
        try:
            async with asyncio.timeout(timeout):
                await self.wait_closed()
        except TimeoutError:
            log.warning("Handlers did not finish within %.1fs", timeout)

    def goaway_all(self) -> None:
        """Send GOAWAY on and close every open connection."""
        for proto in list(self._protocols):
            proto.goaway()


async def recv_request(
    stream: grpclib.server.Stream[Any, Any], message_type: Any, *, max_size: int
) -> Any:
    """Read the single request message, or raise a status that names what is wrong."""
    proto = stream._stream
    prefix = await _read(proto, 5)
    if not prefix:
        raise GRPCError(Status.INVALID_ARGUMENT, f"a {message_type.__name__} message is required")
    if len(prefix) < 5:
        raise GRPCError(Status.INVALID_ARGUMENT, "truncated message prefix")
    compressed, size = struct.unpack(">?I", prefix)
    if compressed:
        raise GRPCError(Status.UNIMPLEMENTED, "compressed requests are not supported")
    if size > max_size:  # judged from the prefix, before the body is read into memory
        raise too_large(size, max_size)
    body = await _read(proto, size)
    if len(body) != size:
        raise GRPCError(Status.INVALID_ARGUMENT, f"truncated request: {len(body)} of {size} bytes")
    return decode_request(body, message_type, max_size=max_size)


async def _read(proto: Any, size: int) -> bytes:
    """Up to ``size`` bytes of the request body (fewer if the peer ended the stream early)."""
    try:
        return bytes(await proto.recv_data(size))
    except AssertionError:  # grpclib's buffer asserts when the stream ends short
        return b"\x00"  # never the requested length: reported as truncated


async def _room(proto: Any, need: int, abort: asyncio.Event) -> int:
    """Wait until ``need`` bytes (at least 1) may be sent; the window then, or 0 if aborted."""
    conn, h2_conn = proto.connection, proto._h2_connection
    while not abort.is_set():
        if not conn.write_ready.is_set():
            ready = conn.write_ready
        else:
            window = int(h2_conn.local_flow_control_window(proto.id))
            if window >= max(need, 1):
                return window
            proto.window_updated.clear()
            ready = proto.window_updated
        await _first(ready, abort)
    return 0


async def _first(*events: asyncio.Event) -> None:
    """Wait until any of ``events`` is set."""
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waits:
            waiter.cancel()


async def write_message(
    stream: grpclib.server.Stream[Any, Any], message: bytes, abort: asyncio.Event
) -> bool:
    """Write one encoded message; False if ``abort`` was set first.

    A message that fits the peer's window is only started once it fits whole, so an abort
    never leaves it half-written; a larger one goes out in pieces and an abort between them
    resets the stream (the peer retries and resumes).
    """
    proto = stream._stream
    assert proto.id is not None
    if not stream._send_initial_metadata_done:
        await stream.send_initial_metadata()
    h2_conn = proto._h2_connection
    data = memoryview(struct.pack(">?I", False, len(message)) + message)
    need = min(len(data), h2_conn.remote_settings.initial_window_size)
    sent = 0
    while sent < len(data):
        window = await _room(proto, need if sent == 0 else 1, abort)
        if not window:
            if sent:
                await _reset(stream)
            return False
        size = min(window, len(data) - sent)
        _send(proto, data[sent : sent + size])
        sent += size
    return True


async def write_messages(
    stream: grpclib.server.Stream[Any, Any], messages: list[bytes], abort: asyncio.Event
) -> int:
    """Write ``messages`` in order; how many were written (fewer only if ``abort`` was set).

    As many whole messages as the peer's window takes go out in one write (gRPC allows
    several length-prefixed messages in a DATA frame), so a subscriber that is behind
    catches up with few writes, and one that is current pays one write per message.
    """
    proto = stream._stream
    assert proto.id is not None
    if not stream._send_initial_metadata_done:
        await stream.send_initial_metadata()
    h2_conn = proto._h2_connection
    written = 0
    while written < len(messages):
        first = len(messages[written]) + 5
        window = await _room(proto, min(first, h2_conn.remote_settings.initial_window_size), abort)
        if not window:
            return written
        if first > window:  # larger than the whole window: in pieces
            if not await write_message(stream, messages[written], abort):
                return written
            written += 1
            continue
        parts: list[bytes] = []
        size = 0
        while written < len(messages) and size + len(messages[written]) + 5 <= window:
            message = messages[written]
            parts += (struct.pack(">?I", False, len(message)), message)
            size += len(message) + 5
            written += 1
        _send(proto, memoryview(b"".join(parts)))
    return written


def _send(proto: Any, data: memoryview) -> None:
    """Hand ``data`` (which fits the window) to h2 in frame-sized pieces; one socket write."""
    h2_conn = proto._h2_connection
    step = h2_conn.max_outbound_frame_size
    for start in range(0, len(data), step):
        h2_conn.send_data(proto.id, bytes(data[start : start + step]))
    proto._transport.write(h2_conn.data_to_send())
    proto.data_sent += len(data)
    proto.connection.data_sent += len(data)
    proto.connection.data_send_process()


async def _reset(stream: grpclib.server.Stream[Any, Any]) -> None:
    """Reset a stream left with a partial message; drop the connection if even that blocks."""
    try:
        async with asyncio.timeout(1.0):
            await stream.cancel()
    except TimeoutError:
        stream._stream.connection._transport.abort()


async def end_stream(
    stream: grpclib.server.Stream[Any, Any], status: Status, message: str, *, timeout: float
) -> None:
    """Send the final status; if the peer cannot take it within ``timeout``, drop its connection.

    Trailers are not flow-controlled, but a peer that stopped reading its socket can leave
    the transport paused forever; aborting then frees the server's side.
    """
    if stream._cancel_done:
        return
    try:
        async with asyncio.timeout(timeout):
            await stream.send_trailing_metadata(status=status, status_message=message)
    except TimeoutError:
        log.warning("Peer %s did not take the final status in %.1fs; closing its connection",
                    stream.peer.addr() if stream.peer else "?", timeout)  # fmt: skip
        stream._stream.connection._transport.abort()


# ---------------------------------------------------------------- client side


class ResilientChannel(Channel):
    """grpclib's ``Channel``, but it never hands out a connection that is closed or closing.

    grpclib's ``Connection.close()`` (a keepalive ping left unanswered) drops the transport
    at once, while ``Channel`` only learns of the loss when asyncio reports it, later: a
    stream opened in between fails with ``AttributeError`` instead of a connection error.
    Here a closing connection counts as lost, so the next stream gets a fresh one.

    And grpclib's ``close()`` does nothing while a connection is being made, which then
    opens after all. Here ``close()`` also stops a connect under way: the stream waiting
    for it, and any opened later, get ``ConnectionAbortedError``.
    """

    _protocol: H2Protocol | None  # grpclib declares only its default, None

    def __init__(self, host: str, port: int, **options: Any) -> None:
        """``options`` are grpclib's ``Channel`` keyword arguments (``ssl``, ``config``)."""
        super().__init__(host, port, **options)
        self._closing = asyncio.Event()

    @property
    def _connected(self) -> bool:
        # grpclib checks only handler.connection_lost, which asyncio's connection_lost sets
        protocol = self._protocol
        return super()._connected and protocol is not None and not protocol.connection.is_closing()

    async def __connect__(self) -> H2Protocol:
        """The open connection, or a new one unless ``close()`` is called first."""
        if self._closing.is_set():
            raise ConnectionAbortedError("the channel is closed")
        if self._connected:
            assert self._protocol is not None
            return self._protocol
        connecting = asyncio.ensure_future(super().__connect__())
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            await asyncio.wait((connecting, closing), return_when=asyncio.FIRST_COMPLETED)
        finally:
            connecting.cancel()  # close(), or the caller's own cancellation (a timeout)
            closing.cancel()
        if self._closing.is_set():
            if connecting.done() and not connecting.cancelled() and connecting.exception() is None:
                self.close()  # it connected just as close() was called: close it too
            raise ConnectionAbortedError("the channel was closed while connecting")
        return connecting.result()

    def close(self) -> None:
        """Close the connection, or stop the one being made."""
        self._closing.set()
        super().close()
