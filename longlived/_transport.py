"""The transport: the one module that touches grpclib and h2 internals.

Everything grpclib 0.4 does not offer as public API lives here, and
``tests/test_transport_contract.py`` pins each assumption it makes:

- keepalive (grpclib has it only as private ``Configuration`` fields);
- the codec that passes encoded bytes through, so an event is encoded once;
- per-connection limits, enforced when a stream arrives: streams whose request has not
  fully arrived, request metadata size, and the rate of streams the peer resets (the
  HTTP/2 "rapid reset" pattern gets GOAWAY ENHANCE_YOUR_CALM, as grpc-go and nginx do);
- ``StreamCall``: a ``CallTransport`` over a grpclib server stream. Requests are checked
  from their 5-byte prefix before the body is read. Writes follow grpclib's rule (send as
  soon as the flow-control window is positive, check write readiness before every write)
  and hand the socket at most ``WRITE_CAP`` bytes per write, so a peer that stops reading
  holds at most about that much per connection in userspace buffers. A subscriber that
  keeps up has each event written by the publish itself (``try_write``): one DATA frame
  built by ``data_frame``, with h2 told only the windows it tracks;
- GOAWAY, drain and the registry of open connections;
- TLS handshakes run by ``_TlsProtocol`` (asyncio's own TLS protocol), which logs the
  ones that fail: asyncio reports them only in debug mode;
- ``ResilientChannel``: grpclib's client ``Channel``, never reusing a closing connection
  and stopping a connect that ``close()`` overtakes; ``final_metadata``: the trailers of a
  call the server ended while its request was still being sent.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import contextlib
import functools
import logging
import socket
import ssl
import struct
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import betterproto2
import grpclib.const
import grpclib.server
from grpclib.client import Channel
from grpclib.client import Stream as ClientStream
from grpclib.config import Configuration
from grpclib.const import Status
from grpclib.encoding.base import CodecBase
from grpclib.exceptions import GRPCError
from grpclib.metadata import decode_metadata, encode_grpc_message
from grpclib.protocol import Connection, H2Protocol
from grpclib.protocol import Stream as H2Stream
from h2.connection import ConnectionState
from h2.errors import ErrorCodes
from h2.events import UnknownFrameReceived
from h2.exceptions import ProtocolError as H2ProtocolError
from h2.exceptions import StreamClosedError as H2StreamClosedError
from h2.settings import SettingCodes
from h2.stream import StreamState

from longlived._aio import SparseEvent, wait_first
from longlived._call import CallHost, PublishCall, SubscribeCall, UnsubscribeCall
from longlived._logfields import fields
from longlived._proto.longlived import PublishReply, PublishRequest, Request, Response
from longlived._status import CallError, Code
from longlived._wire import NO_RETRY_HEADER, PACKAGES, decode_request, too_large

if TYPE_CHECKING:
    from longlived.settings import KeepaliveSettings

__all__ = [
    "LISTEN_BACKLOG",
    "WHOLE_WAIT",
    "WRITE_CAP",
    "ConnectionLimits",
    "GrpcServer",
    "PassThroughCodec",
    "ResilientChannel",
    "Servable",
    "StreamCall",
    "data_frame",
    "final_metadata",
    "grpc_config",
    "guarded",
    "longlived_mapping",
]

log = logging.getLogger(__name__)

M = TypeVar("M", bound=betterproto2.Message)

WRITE_CAP = 65_536
"""Bytes one stream hands the socket per write; readiness is checked before each write."""

WHOLE_WAIT = 1.0
"""Seconds a message waits for the window to take it whole before it goes out in pieces."""

LISTEN_BACKLOG = 4096
"""Connections the kernel queues before the server accepts them (capped by
``net.core.somaxconn``). Every client comes back at once after a restart: with grpclib's
100, most of a thousand clients' SYNs were dropped, and each waited for TCP to retry."""

_HIGH_WATER = 65_536
"""Connection write buffer at which writers pause (asyncio's default, set explicitly)."""

_HEADER_LIST_HARD_LIMIT = 1 << 20
"""Decoded header block size at which the connection is dropped (HPACK state cannot be
skipped); below it, ``ConnectionLimits.max_metadata_size`` fails just the one stream."""

_PREFIX = struct.Struct(">?I").pack


class _Values(list[int]):
    """A setting's values in h2's ``Settings`` (the current one, then those awaiting the
    peer's ACK): the ``deque`` operations h2 uses, on a list. An empty deque takes about
    600 bytes, and h2 keeps fourteen per connection."""

    __slots__ = ()

    def popleft(self) -> int:
        return self.pop(0)


class _Drained:
    """A server stream's receive buffer once its one request is read: what else the peer
    sends is not read, only counted, so that releasing the stream acknowledges it, as
    grpclib's ``Buffer`` (an ``asyncio.Queue``, about 3 KB) would."""

    __slots__ = ("_eof", "_unacked")

    def __init__(self, *, eof: bool, unacked: int) -> None:
        self._eof = eof
        self._unacked = unacked

    def add(self, data: bytes, ack_size: int) -> None:
        self._unacked += ack_size

    def eof(self) -> None:
        self._eof = True

    def unacked_size(self) -> int:
        unacked, self._unacked = self._unacked, 0
        return unacked

    async def read(self, size: int) -> bytes:
        return b""


_UNUSED = asyncio.Event()
"""Stands in for a server stream's ``headers_received`` and ``trailers_received``, which
only a client waits on: two fewer events per stream."""

_SENDING = (StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE)
"""h2 stream states in which sending DATA changes nothing but the windows."""

_framed: tuple[bytes, bytes] = (b"", b"")
"""The last message ``data_frame`` framed, and that framing: a fan-out sends the same
message object to every subscriber, so it is framed once. Replaced whole, never changed,
so servers on two threads can only miss it, never mix two messages."""


class Servable(Protocol):
    """A gRPC service as grpclib serves it: a mapping of paths to handlers."""

    def __mapping__(self) -> Mapping[str, grpclib.const.Handler]: ...


def grpc_config(
    keepalive: KeepaliveSettings,
    *,
    server_name: str | None = None,
    max_request: int | None = None,
) -> Configuration:
    """grpclib ``Configuration`` with these keepalive settings (for servers and channels).

    ``server_name`` (clients) is the name the server's TLS certificate is checked against.
    ``max_request`` (servers): the largest request message; the receive windows are sized
    for it (a stream window that takes one whole request, 1 MiB per connection) instead of
    grpclib's 4 MiB, so a peer can make the server hold at most that much unread.
    """
    windows = {}
    if max_request is not None:
        stream = max(65_535, max_request + 5)
        windows = {
            "http2_stream_window_size": stream,
            "http2_connection_window_size": max(1 << 20, stream),
        }
    return Configuration(
        **windows,
        ssl_target_name_override=server_name,
        _keepalive_time=keepalive.time,
        _keepalive_timeout=keepalive.timeout,
        _keepalive_permit_without_calls=keepalive.permit_without_calls,
        _http2_max_pings_without_data=keepalive.max_pings_without_data,
        # grpclib otherwise waits 300 s between pings while no data flows
        _http2_min_sent_ping_interval_without_data=keepalive.time or 300.0,
    )


def _grpc_error(exc: CallError) -> GRPCError:
    return GRPCError(Status(exc.code.value), exc.message)


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
        # used by the services grpclib runs itself (health, reflection: protobuf classes)
        try:
            if isinstance(message_type, type) and issubclass(message_type, betterproto2.Message):
                return decode_request(data, message_type, max_size=self.max_size)
            if len(data) > self.max_size:
                raise too_large(len(data), self.max_size)
            try:
                return message_type.FromString(data)
            except Exception as exc:
                raise CallError(
                    Code.INVALID_ARGUMENT, f"malformed {message_type.__name__} message: {exc}"
                ) from None
        except CallError as exc:
            log.warning("Rejected a request: %s (%s)", exc.message, exc.code.name)
            raise _grpc_error(exc) from None


# ------------------------------------------------------------------- connections


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """What one client connection may hold or do (see ``LimitSettings``)."""

    max_streams: int = 1024
    """HTTP/2 MAX_CONCURRENT_STREAMS the server advertises and enforces."""
    max_pending: int = 100
    """Streams whose request has not fully arrived yet; more are refused."""
    max_metadata_size: int = 16_384
    """Request metadata bytes (HPACK-decoded size) per stream; more fail that stream."""
    resets_per_second: float = 100.0
    """Sustained rate of streams the peer may reset before it gets GOAWAY."""
    reset_burst: int = 1000
    """Resets allowed at once on top of the rate."""


class _Bucket:
    """A token bucket: ``rate`` per second, at most ``burst`` saved up."""

    __slots__ = ("_clock", "_stamp", "_tokens", "burst", "rate")

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._stamp = clock()

    def take(self) -> bool:
        """Spend one token; False if there is none."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


def _peer_name(peer: object) -> str:
    """``host:port`` of a peer address tuple."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return "unknown peer"


class _Connection(Connection):
    """grpclib's connection, but a close (keepalive timeout) never waits on a frozen peer,
    a flush after the close is harmless, and bytes that are not HTTP/2 get a log line."""

    handler: _Handler

    def feed(self, data: bytes) -> list[Any]:
        try:
            events = super().feed(data)
        except H2ProtocolError as exc:
            log.warning("Closing the connection from %s: not valid HTTP/2 (%s)", self.peer, exc)
            self.flush()  # the GOAWAY with the error's code that h2 queued (RFC 9113 5.4.1)
            raise
        # RFC 9113 5.5: frames of unknown types are ignored (grpclib has no processor for
        # them: the connection would be dropped with a traceback)
        return [event for event in events if not isinstance(event, UnknownFrameReceived)]

    @property
    def peer(self) -> str:
        """The peer's address (also after the connection closed)."""
        return self.handler.peer

    def flush(self) -> None:
        if hasattr(self, "_transport"):  # grpclib deletes it on close
            super().flush()

    def buffered(self) -> int:
        """Bytes written but not yet taken by the socket."""
        transport = getattr(self, "_transport", None)
        return int(transport.get_write_buffer_size()) if transport is not None else 0

    def abort(self) -> None:
        """Drop the connection at once, discarding what is buffered."""
        transport = getattr(self, "_transport", None)
        if transport is not None:
            transport.abort()
        self.close()

    def close(self) -> None:
        # transport.close() flushes first: with a peer that stopped reading it never ends.
        transport = getattr(self, "_transport", None)
        if transport is not None and transport.get_write_buffer_size():
            transport.abort()
        super().close()


class _Handler(grpclib.server.Handler):
    """grpclib's per-connection handler, with the connection's limits enforced at the door."""

    connection: _Connection
    protocol: _Protocol
    limits: ConnectionLimits
    peer: str = "unknown peer"

    def setup(self, protocol: _Protocol, limits: ConnectionLimits) -> None:
        """Attach to ``protocol``'s connection (called once it is made)."""
        self.protocol = protocol
        self.connection = protocol.connection  # type: ignore[assignment]  # class swapped
        self.limits = limits
        self.peer = _peer_name(protocol.connection.get_peer().addr())
        self._incomplete: set[H2Stream] = set()
        # refused streams count like resets: neither may come faster than this
        self._resets = _Bucket(limits.resets_per_second, limits.reset_burst)
        self._refusals = 0
        self._refusal_logged = -1.0

    def accept(
        self, stream: H2Stream, headers: list[tuple[str, str]], release_stream: Callable[[], Any]
    ) -> None:
        if self.closing:  # after GOAWAY: the rest of what the peer sent is not served
            release_stream()
            return
        path = next((value for name, value in headers if name == ":path"), "")
        if path not in self.mapping:  # grpclib's own answer lacks a content-type
            # quoted: a path that is empty or ends in a space must not end the grpc-message
            # in whitespace, which HTTP/2 forbids
            self._refuse(stream, release_stream, f"no method {path[:200]!r}", Status.UNIMPLEMENTED)
            return
        size = sum(len(name) + len(value) + 32 for name, value in headers)  # RFC 7541 size
        if size > self.limits.max_metadata_size:
            limit = self.limits.max_metadata_size
            self._refuse(stream, release_stream, f"request metadata of {size} bytes exceeds "
                         f"the limit of {limit}")  # fmt: skip
            return
        incomplete = self._incomplete
        if len(incomplete) >= self.limits.max_pending:
            # a request counts until its body has fully arrived (or its call admitted it)
            incomplete -= {s for s in incomplete if s.buffer._eof}
            if len(incomplete) >= self.limits.max_pending:
                self._refuse(stream, release_stream, "too many streams awaiting their request "
                             f"on this connection (limit {self.limits.max_pending})")  # fmt: skip
                return
        incomplete.add(stream)
        stream.headers_received = stream.trailers_received = _UNUSED
        if not stream.window_updated.is_set():  # what grpclib made: a fresh one, unset
            stream.window_updated = SparseEvent()

        def release() -> None:
            incomplete.discard(stream)
            release_stream()

        super().accept(stream, headers, release)
        task = self._tasks.get(stream)
        if task is not None:
            task.add_done_callback(functools.partial(self._ended, stream))

    def _ended(self, stream: H2Stream, task: asyncio.Task[None]) -> None:
        """Forget a finished stream at once: grpclib does it only at the connection's tenth
        next stream, and forgets a closed connection's handler (every stream it served)
        only at the server's tenth next connection."""
        if self._tasks.get(stream) is task:
            del self._tasks[stream]
        self._cancelled.discard(task)
        if self.closing and not self._tasks and not self._cancelled:
            self.forget(self)

    def forget(self, handler: _Handler) -> None:
        """Called once the connection is closed and every task of it has finished."""

    def close(self) -> None:
        super().close()
        if not self._tasks and not self._cancelled:
            self.forget(self)

    def admitted(self, stream: H2Stream) -> None:
        """``stream``'s request has been read and accepted."""
        self._incomplete.discard(stream)

    def cancel(self, stream: H2Stream) -> None:
        # the peer reset the stream (or broke the protocol on it)
        self._incomplete.discard(stream)
        super().cancel(stream)
        self._spend("stream resets")

    def _spend(self, what: str) -> None:
        """One more reset or refused stream; GOAWAY once the bucket is empty."""
        if not self._resets.take() and not self.closing:
            log.warning("Closing the connection from %s: more than %d %s (%.0f/s sustained)",
                        self.peer, self._resets.burst, what, self._resets.rate)  # fmt: skip
            self.protocol.goaway(ErrorCodes.ENHANCE_YOUR_CALM, f"too many {what}".encode())

    def _refuse(
        self,
        stream: H2Stream,
        release: Callable[[], Any],
        message: str,
        status: Status = Status.RESOURCE_EXHAUSTED,
    ) -> None:
        """Answer ``stream`` at once with ``status``; no handler runs for it."""
        self._refusals += 1
        now = time.monotonic()
        if now - self._refusal_logged >= 1.0:  # one line a second per connection at most
            self._refusal_logged = now
            log.warning("Refused a stream from %s: %s (%d refused on this connection)",
                        self.peer, message, self._refusals,
                        extra=fields(peer=self.peer, status=status.name))  # fmt: skip
        assert stream.id is not None
        h2_conn = self.connection._connection
        h2_stream = h2_conn.streams.get(stream.id)
        if h2_stream is not None and not h2_stream.closed:  # else the peer reset it already
            h2_conn.send_headers(
                stream.id,
                [
                    (":status", "200"),
                    ("content-type", "application/grpc+proto"),
                    ("grpc-status", str(status.value)),
                    ("grpc-message", encode_grpc_message(message)),
                ],
                end_stream=True,
            )
            if not h2_stream.closed:  # the rest of the request is not wanted
                h2_conn.reset_stream(stream.id, ErrorCodes.NO_ERROR)
            self.connection.flush()
        release()
        if self.connection.buffered() > _HIGH_WATER + WRITE_CAP:  # refusals it does not read
            log.warning("Closing the connection from %s: it does not read its refusals",
                        self.peer)  # fmt: skip
            self.protocol.processor.close("not reading")  # nothing more of it is processed
            return
        self._spend("refused streams")


class _Protocol(H2Protocol):
    """grpclib's protocol with the connection limits, TCP_NODELAY and a registry of peers."""

    handler: _Handler
    limits: ConnectionLimits
    registry: set[_Protocol]
    idle: asyncio.Event
    reading_paused = False

    def connection_made(self, transport: Any) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # grpclib sets it only when the socket's proto is IPPROTO_TCP, which a socket
            # from socket.create_server() (proto 0) is not; small writes must not wait
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.set_write_buffer_limits(high=_HIGH_WATER)
        super().connection_made(transport)
        self.connection.__class__ = _Connection
        self.handler.setup(self, self.limits)
        self.connection.handler = self.handler  # type: ignore[attr-defined]  # class swapped
        h2_conn = self.connection._connection
        limit = self.limits.max_streams
        # h2 advertises 100 by default: a client's 101st stream on one connection would hang.
        h2_conn.update_settings(
            {
                SettingCodes.MAX_CONCURRENT_STREAMS: limit,
                SettingCodes.MAX_HEADER_LIST_SIZE: _HEADER_LIST_HARD_LIMIT,
            }
        )
        # h2 enforces its new limits only once the peer acknowledges them, so a client that
        # opens streams before reading this SETTINGS frame would be cut off at 100 (or
        # dropped for a large header). Raising our own limits at once is safe.
        h2_conn.local_settings._settings[SettingCodes.MAX_CONCURRENT_STREAMS][0] = limit
        h2_conn.decoder.max_header_list_size = _HEADER_LIST_HARD_LIMIT
        for settings in (h2_conn.local_settings, h2_conn.remote_settings):
            settings._settings = {code: _Values(v) for code, v in settings._settings.items()}  # type: ignore[misc]  # typed as deques; h2 calls only what _Values has
        self.connection.flush()
        self.registry.add(self)
        self.idle.clear()

    @property
    def conn(self) -> _Connection:
        """The connection, as the class it was swapped to."""
        return self.connection  # type: ignore[return-value]  # swapped in connection_made

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # h2 answers what the peer sends (PINGs, SETTINGS) whether or not the peer reads
        # its socket: stop reading a peer whose answers pile up, until its buffer drains
        # (a peer that never drains then misses keepalive and is dropped)
        if self.conn.buffered() > _HIGH_WATER + WRITE_CAP and not self.reading_paused:
            self.reading_paused = True
            self.connection._transport.pause_reading()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.reading_paused and not self.connection.is_closing():
            self.reading_paused = False
            self.connection._transport.resume_reading()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.registry.discard(self)
        if not self.registry:
            self.idle.set()
        super().connection_lost(exc)

    def busy(self) -> bool:
        """Whether any stream on this connection is open."""
        return any(stream.open for stream in self.connection._connection.streams.values())

    def goaway(self, error: ErrorCodes = ErrorCodes.NO_ERROR, reason: bytes = b"") -> None:
        """Tell the peer no new streams will be accepted, then close the connection.

        With an error, streams still open are ended at once and nothing more on this
        connection is processed.
        """
        if self.connection.is_closing():
            return
        self.connection._connection.close_connection(error, reason or None)
        self.connection.flush()
        if error is ErrorCodes.NO_ERROR:
            self.connection.close()
            return
        # end every stream now and read nothing more; the GOAWAY gets a second to go out
        self.handler.close()
        transport = self.connection._transport
        transport.close()
        asyncio.get_running_loop().call_later(1.0, transport.abort)


# ----------------------------------------------------------------------- streams


def data_frame(h2_conn: Any, stream: Any, tail: bytes, message: bytes) -> bytes | None:
    """What h2's ``send_data`` of ``message`` (length-prefixed) would add to the bytes to
    send, preceded by what h2 already holds; h2's windows shrink as ``send_data`` shrinks
    them. None (h2 untouched) unless the message fits the windows and one frame, the
    connection is open and the stream open for sending: in those states the windows are
    all that ``send_data`` changes. ``tail``: the frame header after its length (type,
    flags, stream id). ``tests/test_transport_contract.py`` holds it to h2's own output.
    """
    global _framed
    size = len(message) + 5
    if (
        size > WRITE_CAP  # a larger one goes out in pieces, readiness checked before each
        or size > h2_conn.outbound_flow_control_window
        or size > stream.outbound_flow_control_window
        or size > h2_conn.max_outbound_frame_size
        or stream.state_machine.state not in _SENDING
        or h2_conn.state_machine.state is not ConnectionState.SERVER_OPEN
    ):
        return None
    framed = _framed
    if framed[0] is not message:
        _framed = framed = (message, _PREFIX(False, len(message)) + message)
    stream.outbound_flow_control_window -= size
    h2_conn.outbound_flow_control_window -= size
    frame = size.to_bytes(3, "big") + tail + framed[1]
    return h2_conn.data_to_send() + frame if h2_conn._data_to_send else frame


class StreamCall:
    """A ``CallTransport`` over one grpclib server stream.

    Fires grpclib's ``RecvMessage`` and ``SendMessage`` events (decoding the pre-encoded
    bytes only when someone listens), so middleware built on them sees these calls too.
    """

    __slots__ = (
        "_conn",
        "_direct",
        "_dispatch",
        "_h2",
        "_h2_stream",
        "_initial",
        "_peak",
        "_proto",
        "_stream",
        "_tail",
    )

    def __init__(self, stream: grpclib.server.Stream[Any, Any]) -> None:
        self._stream = stream
        self._proto: H2Stream = stream._stream
        self._conn: _Connection = stream._stream.connection  # type: ignore[assignment]
        self._h2 = self._proto._h2_connection
        self._dispatch = stream._dispatch
        self._peak = 0  # the largest window seen: what a peer that reads will open again
        self._initial = self._h2.remote_settings.initial_window_size
        self._direct = False  # try_write may write (set once the headers are out)
        self._h2_stream: Any = None
        self._tail = b""

    @property
    def peer(self) -> str:
        return self._conn.peer

    @property
    def metadata(self) -> Mapping[str, str | bytes]:
        return self._stream.metadata or {}

    def _listening(self, method: str) -> bool:
        # grpclib installs a no-op in the instance dict until a listener is added
        return method not in self._dispatch.__dict__

    async def read_request(self, message_type: type[M], *, max_size: int) -> M:
        prefix = await self._read(5)
        if not prefix:
            raise CallError(Code.INVALID_ARGUMENT, f"a {message_type.__name__} message is required")
        if len(prefix) < 5:
            raise CallError(Code.INVALID_ARGUMENT, "truncated message prefix")
        compressed, size = struct.unpack(">?I", prefix)
        if compressed:
            raise CallError(Code.UNIMPLEMENTED, "compressed requests are not supported")
        if size > max_size:  # judged from the prefix, before the body is read into memory
            raise too_large(size, max_size)
        body = await self._read(size)
        if len(body) != size:
            raise CallError(
                Code.INVALID_ARGUMENT, f"truncated request: {len(body)} of {size} bytes"
            )
        request = decode_request(body, message_type, max_size=max_size)
        if self._listening("recv_message"):
            (request,) = await self._dispatch.recv_message(request)
        return request

    async def _read(self, size: int) -> bytes:
        """Up to ``size`` bytes of the request body (fewer if the peer ended the stream early)."""
        try:
            return bytes(await self._proto.recv_data(size))
        except AssertionError:  # grpclib's buffer asserts when the stream ends short
            return b"\x00"  # never the requested length: reported as truncated

    def admitted(self) -> None:
        self._conn.handler.admitted(self._proto)

    async def _ready(self, abort: asyncio.Event) -> bool:
        """Wait until the connection takes writes; False if ``abort`` was set first."""
        ready = self._conn.write_ready
        while not ready.is_set():
            if abort.is_set():
                return False
            await wait_first(ready, abort)
        return not abort.is_set()

    async def start(self, metadata: Mapping[str, str] | None, abort: asyncio.Event) -> bool:
        if not await self._ready(abort):
            return False
        await self._stream.send_initial_metadata(metadata=metadata)
        # a server-streaming call has read its one request: its buffer is not needed again
        buffer = self._proto.buffer
        self._proto.buffer = _Drained(  # type: ignore[assignment]  # what grpclib calls
            eof=buffer._eof, unacked=buffer.unacked_size()
        )
        stream_id = self._proto.id
        assert stream_id is not None
        self._h2_stream = self._h2.streams.get(stream_id)
        # a DATA frame's header after its 3-byte length: type 0, no flags, the stream id
        self._tail = b"\x00\x00" + stream_id.to_bytes(4, "big")
        self._direct = self._h2_stream is not None and not self._listening("send_message")
        # what the writer knows of the window when it first writes: messages that went out
        # at once never passed through _room(), which learns it
        self._peak = max(self._peak, int(self._h2.local_flow_control_window(stream_id)))
        return True

    def try_write(self, message: bytes) -> bool:
        """Write ``message`` now as one DATA frame, if it fits the window and a frame and
        the connection takes writes; False (nothing written) otherwise: the fast path of
        a subscriber that keeps up, with no queue, task switch or h2 frame objects."""
        if not self._direct:
            return False
        transport = self._proto._transport
        conn = self._conn
        if not conn.write_ready.is_set() or transport.is_closing():
            return False
        frame = data_frame(self._h2, self._h2_stream, self._tail, message)
        if frame is None:
            return False
        transport.write(frame)
        size = len(message) + 5
        self._proto.data_sent += size
        conn.data_sent += size
        conn.data_send_process()
        return True

    async def _room(self, abort: asyncio.Event) -> int:
        """Wait until the window is positive and the connection takes writes; the window
        then, or 0 if aborted. h2's window is min(stream window, connection window)."""
        proto, h2_conn = self._proto, self._h2
        assert proto.id is not None
        while await self._ready(abort):
            window = int(h2_conn.local_flow_control_window(proto.id))
            if window > 0:
                initial = h2_conn.remote_settings.initial_window_size
                if initial != self._initial:  # the peer resized its windows: forget the peak
                    self._initial, self._peak = initial, window
                self._peak = max(self._peak, window)
                return window
            proto.window_updated.clear()
            await wait_first(proto.window_updated, abort)
        return 0

    async def write(self, messages: Sequence[bytes], abort: asyncio.Event) -> int:
        """Write ``messages`` in order; how many were written (fewer only if aborted).

        As many whole messages as the window and ``WRITE_CAP`` allow go out in one write
        (gRPC allows several length-prefixed messages in a DATA frame), so a subscriber that
        is behind catches up with few writes, and one that is current pays one write.

        A message is started once the window takes it whole, so an abort rarely leaves one
        half-written (the stream would have to be reset rather than told its status). One
        larger than any window this peer has opened, or still not fitting after
        ``WHOLE_WAIT`` seconds (a window that shrank for good, or that streams sharing the
        connection hold), goes out as soon as the window is positive, in pieces, as
        grpclib's own writer does: a stream never waits for room that will not come.
        """
        if self._listening("send_message"):
            messages = await self._dispatch_sends(messages)
        written, count = 0, len(messages)
        waiting_since: float | None = None
        while written < count:
            window = await self._room(abort)
            if not window:
                return written
            need = len(messages[written]) + 5
            if window < need <= self._peak:  # the window should reopen to take it whole
                loop = asyncio.get_running_loop()
                if waiting_since is None:
                    waiting_since = loop.time()
                if loop.time() < waiting_since + WHOLE_WAIT:
                    self._proto.window_updated.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout_at(waiting_since + WHOLE_WAIT):
                            await wait_first(self._proto.window_updated, abort)
                    continue
                self._peak = window  # it did not reopen: do not wait on it for the next ones
            waiting_since = None
            cap = min(window, WRITE_CAP)
            if need > cap:  # larger than the window (or the cap): in pieces
                if not await self._write_large(messages[written], abort):
                    return written
                written += 1
                continue
            parts: list[bytes] = []
            size = 0
            while written < count:
                message = messages[written]
                if size + len(message) + 5 > cap:
                    break
                parts += (_PREFIX(False, len(message)), message)
                size += len(message) + 5
                written += 1
            self._send(b"".join(parts))
        return written

    async def _dispatch_sends(self, messages: Sequence[bytes]) -> list[bytes]:
        out = []
        for data in messages:
            message = Response.FromString(data)
            (sent,) = await self._dispatch.send_message(message)
            out.append(data if sent is message else bytes(sent))
        return out

    async def _write_large(self, message: bytes, abort: asyncio.Event) -> bool:
        """Write one message in window-sized pieces; an abort between pieces resets the
        stream (the peer retries and resumes). False if aborted."""
        data = memoryview(_PREFIX(False, len(message)) + message)
        sent = 0
        while sent < len(data):
            window = await self._room(abort)
            if not window:
                if sent:
                    await self._reset()
                return False
            size = min(window, WRITE_CAP, len(data) - sent)
            self._send(data[sent : sent + size])
            sent += size
        return True

    def _send(self, data: bytes | memoryview) -> None:
        """Hand ``data`` (which fits the window) to h2 in frame-sized pieces; one socket write."""
        proto, h2_conn = self._proto, self._h2
        assert proto.id is not None
        step = h2_conn.max_outbound_frame_size
        if len(data) <= step:
            h2_conn.send_data(proto.id, data)
        else:
            for start in range(0, len(data), step):
                h2_conn.send_data(proto.id, data[start : start + step])
        proto._transport.write(h2_conn.data_to_send())
        proto.data_sent += len(data)
        self._conn.data_sent += len(data)
        self._conn.data_send_process()

    async def _reset(self) -> None:
        """Reset a stream left with a partial message; drop the connection if even that blocks."""
        try:
            async with asyncio.timeout(1.0):
                await self._stream.cancel()
        except TimeoutError:
            self._conn.abort()

    async def reply(self, message: bytes, *, timeout: float) -> None:
        try:
            async with asyncio.timeout(timeout):
                await self._stream.send_message(message)
        except TimeoutError:
            log.warning("Peer %s did not take its answer in %.1fs; closing its connection",
                        self.peer, timeout)  # fmt: skip
            self._conn.abort()

    async def finish(
        self, code: Code, message: str | None, *, final: bool = False, timeout: float
    ) -> None:
        """Send the final status; if the peer cannot take it within ``timeout``, drop its
        connection. Trailers are not flow-controlled, but a peer that stopped reading its
        socket can leave the transport paused forever."""
        stream = self._stream
        if stream._cancel_done or stream._send_trailing_metadata_done:
            return
        metadata = {NO_RETRY_HEADER: "request can never be accepted"} if final else None
        try:
            async with asyncio.timeout(timeout):
                await stream.send_trailing_metadata(
                    status=Status(code.value), status_message=message, metadata=metadata
                )
        except TimeoutError:
            log.warning("Peer %s did not take the final status in %.1fs; closing its "
                        "connection", self.peer, timeout)  # fmt: skip
            self._conn.abort()
        except (H2StreamClosedError, H2ProtocolError):
            pass  # the peer reset the stream or the connection is gone: nobody to tell


def longlived_mapping(host: CallHost) -> dict[str, grpclib.const.Handler]:
    """The ``Longlived`` RPCs of ``host``, on every package's paths."""

    async def subscribe(stream: grpclib.server.Stream[Any, Any]) -> None:
        await SubscribeCall(host, StreamCall(stream)).run()

    async def unsubscribe(stream: grpclib.server.Stream[Any, Any]) -> None:
        await UnsubscribeCall(host, StreamCall(stream)).run()

    async def publish(stream: grpclib.server.Stream[Any, Any]) -> None:
        await PublishCall(host, StreamCall(stream)).run()

    mapping = {}
    for package in PACKAGES:
        mapping[f"/{package}.Longlived/Subscribe"] = grpclib.const.Handler(
            subscribe, grpclib.const.Cardinality.UNARY_STREAM, Request, Response
        )
        mapping[f"/{package}.Longlived/Unsubscribe"] = grpclib.const.Handler(
            unsubscribe, grpclib.const.Cardinality.UNARY_UNARY, Request, Response
        )
    # Publish is ours alone: the original proto has no such method
    mapping["/longlived.Longlived/Publish"] = grpclib.const.Handler(
        publish, grpclib.const.Cardinality.UNARY_UNARY, PublishRequest, PublishReply
    )
    return mapping


class _Guarded:
    """Another service (health, reflection) behind the same door: authentication unless
    the method is public, and its first request message within the admission timeout."""

    def __init__(self, service: Servable, host: CallHost, public: Collection[str]) -> None:
        self._service = service
        self._host = host
        self._public = frozenset(public)

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        return {
            path: grpclib.const.Handler(
                self._wrap(path, handler.func),
                handler.cardinality,
                handler.request_type,
                handler.reply_type,
            )
            for path, handler in self._service.__mapping__().items()
        }

    def _wrap(self, path: str, func: Callable[[Any], Any]) -> Callable[[Any], Any]:
        host, public = self._host, path in self._public

        async def guarded(stream: grpclib.server.Stream[Any, Any]) -> None:
            call = StreamCall(stream)
            limit = host.settings.limits.admission_timeout
            if not public:
                try:
                    async with asyncio.timeout(limit):
                        caller = await host.authenticate(call.metadata)
                except TimeoutError:
                    text = f"not authenticated within {limit:g}s of the call"
                    host.refused(Code.DEADLINE_EXCEEDED, text, call.peer)
                    raise GRPCError(Status.DEADLINE_EXCEEDED, text) from None
                if caller is None:
                    message = "missing or invalid bearer token"
                    host.refused(Code.UNAUTHENTICATED, message, call.peer)
                    raise GRPCError(Status.UNAUTHENTICATED, message)
            receive = stream.recv_message

            async def first_message() -> Any:
                try:
                    async with asyncio.timeout(limit):
                        message = await receive()
                except TimeoutError:
                    text = f"no complete request within {limit:g}s of the call"
                    host.refused(Code.DEADLINE_EXCEEDED, text, call.peer)
                    raise GRPCError(Status.DEADLINE_EXCEEDED, text) from None
                del stream.recv_message  # back to grpclib's own method
                call.admitted()
                return message

            # the instance attribute shadows the method for the first message only
            stream.recv_message = first_message  # type: ignore[method-assign]
            await func(stream)

        return guarded


def guarded(
    services: Iterable[Servable], host: CallHost, *, public: Collection[str]
) -> list[Servable]:
    """``services`` behind ``host``'s authentication and admission timeout."""
    return [_Guarded(service, host, public) for service in services]


# ------------------------------------------------------------------------ server


class _TlsProtocol(asyncio.sslproto.SSLProtocol):
    """asyncio's server-side TLS, plus a WARNING naming the peer and the reason when a
    handshake fails (a client without the certificate mutual TLS asks for, plain HTTP/2 on
    a TLS port): asyncio itself logs those only in debug mode."""

    _transport: asyncio.Transport | None

    def _on_handshake_complete(self, handshake_exc: BaseException | None) -> None:
        if handshake_exc is not None:
            transport = self._transport
            peer = _peer_name(transport.get_extra_info("peername") if transport else None)
            log.warning("TLS handshake with %s failed: %s", peer, handshake_exc,
                        extra=fields(peer=peer))  # fmt: skip
        super()._on_handshake_complete(handshake_exc)


class GrpcServer(grpclib.server.Server):
    """A grpclib ``Server`` with connection limits that can drain and close its connections."""

    def __init__(
        self,
        handlers: Collection[Servable],
        *,
        limits: ConnectionLimits,
        max_message_size: int = 65_536,
        config: Configuration | None = None,
    ) -> None:
        super().__init__(handlers, codec=PassThroughCodec(max_size=max_message_size), config=config)
        self._limits = limits
        self._protocols: set[_Protocol] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._tls: ssl.SSLContext | None = None

    async def start(self, *args: Any, ssl: ssl.SSLContext | None = None, **kwargs: Any) -> None:
        """grpclib's ``start``; with ``ssl``, each connection's handshake goes through
        ``_TlsProtocol`` (the listener itself is plain TCP). The listen backlog is
        ``LISTEN_BACKLOG`` (also for a socket handed in: asyncio calls ``listen`` again)."""
        self._tls = ssl
        kwargs.setdefault("backlog", LISTEN_BACKLOG)
        await super().start(*args, **kwargs)

    def _protocol_factory(self) -> Any:  # an H2Protocol, or a _TlsProtocol around one
        if self._tls is None:
            return self._h2_protocol()
        waiter: Any = None  # asyncio takes None (typeshed says a Future): nobody waits
        loop = asyncio.get_running_loop()
        return _TlsProtocol(loop, self._h2_protocol(), self._tls, waiter, server_side=True)

    def _h2_protocol(self) -> _Protocol:
        # grpclib's own factory, with our handler and protocol classes
        self.__gc_step__()
        handler = _Handler(
            self._mapping, self._codec, self._status_details_codec, self.__dispatch__
        )
        self._handlers.add(handler)
        handler.forget = self._forget  # type: ignore[method-assign]  # set per instance
        proto = _Protocol(handler, self._config, self._h2_config)
        proto.limits = self._limits
        proto.registry = self._protocols
        proto.idle = self._idle
        return proto

    def _forget(self, handler: _Handler) -> None:
        # a new set, as grpclib's own __gc_collect__ makes: close() may be iterating this one
        self._handlers = self._handlers - {handler}

    @property
    def address(self) -> tuple[str, int] | None:
        """``(host, port)`` of the listening socket, once started."""
        # no isinstance check: uvloop's Server is not an asyncio.Server
        sockets = getattr(self._server, "sockets", None)
        if not sockets:
            return None
        host, port = sockets[0].getsockname()[:2]
        return str(host), int(port)

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

    def buffered(self) -> int:
        """Bytes written to client connections and not yet taken by their sockets."""
        return sum(proto.conn.buffered() for proto in self._protocols)

    def idle_connections(self) -> set[_Protocol]:
        """Open connections that carry no stream right now."""
        return {proto for proto in self._protocols if not proto.busy()}

    async def drain(self, idle: Collection[object], *, grace: float, timeout: float) -> None:
        """Stop listening, then close connections: ``idle`` ones (no streams when the drain
        began) at once, the others after up to ``grace`` seconds, all with GOAWAY; then wait
        up to ``timeout`` seconds in all for the handlers."""
        deadline = asyncio.get_running_loop().time() + timeout
        self.close()
        for proto in self.idle_connections():
            if proto in idle:
                proto.goaway()
        # Clients that read their final status close their connections themselves; a GOAWAY
        # arriving together with the status would make some clients drop it unread.
        await self.wait_disconnected(min(grace, timeout))
        self.goaway_all()
        try:
            async with asyncio.timeout_at(deadline):
                await self.wait_closed()
        except TimeoutError:
            log.warning("Handlers did not finish within %.1fs", timeout)

    def goaway_all(self) -> None:
        """Send GOAWAY on and close every open connection."""
        for proto in list(self._protocols):
            proto.goaway()

    def stop(self) -> None:
        """Stop listening and cancel every handler (idempotent; a no-op before ``start``)."""
        if self._server is not None:
            self.close()


# ---------------------------------------------------------------- client side


class ResilientChannel(Channel):
    """grpclib's ``Channel``, but it never hands out a connection that is closed or closing.

    grpclib's ``Connection.close()`` (a keepalive ping left unanswered) drops the transport
    at once, while ``Channel`` only learns of the loss when asyncio reports it, later: a
    stream opened in between fails with ``AttributeError`` instead of a connection error.
    Here a closing connection counts as lost, so the next stream gets a fresh one.

    A connection lost between its opening and the first stream counts as lost too.

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
        protocol = connecting.result()
        if protocol.connection.is_closing():
            # lost as soon as it opened (a proxy whose upstream is down): grpclib has dropped
            # its transport, and a stream on it would fail with AttributeError
            raise ConnectionResetError("the connection was lost as soon as it opened")
        return protocol

    def close(self) -> None:
        """Close the connection, or stop the one being made."""
        self._closing.set()
        super().close()


def final_metadata(stream: ClientStream[Any, Any]) -> Mapping[str, str | bytes]:
    """The trailing metadata of a finished client call, even one the server ended while the
    request was still being sent.

    A request larger than the stream window is still going out when the server refuses it
    and resets the stream: grpclib then raises the status from the headers it received, but
    decodes their metadata only in ``recv_initial_metadata`` / ``recv_trailing_metadata``,
    which a reset stream no longer runs. A no-retry trailer would be lost.
    """
    if stream.trailing_metadata is not None:
        return stream.trailing_metadata
    h2_stream = getattr(stream, "_stream", None)  # absent if the request was never sent
    if h2_stream is None:
        return {}
    raw = h2_stream.trailers if h2_stream.trailers is not None else h2_stream.headers
    return decode_metadata(raw) if raw is not None else {}
