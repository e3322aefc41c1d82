"""Reading requests and writing messages on a grpclib server stream, with bounds.

grpclib reads a request of any declared length into memory and cannot abandon a write to
a peer that stopped reading. These helpers do both: a request is checked from its 5-byte
prefix before its body is read, and a message is written in flow-control-sized pieces that
stop as soon as the subscriber is aborted.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from typing import Any

import grpclib.server
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from longlived._grpc import decode_request, too_large

__all__ = ["end_stream", "recv_request", "write_message", "write_messages"]

log = logging.getLogger(__name__)


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
