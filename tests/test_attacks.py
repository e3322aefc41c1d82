"""Unlucky and hostile peers: each test once stalled, crashed or starved a real server.

A canary subscriber on its own connection checks that nobody else is hurt: it must get
every event, once, in order, while the attack runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator
from urllib.parse import unquote

import h2.errors
import h2.events
import h2.settings
import pytest
from grpclib.client import Channel
from grpclib.config import Configuration
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError
from grpclib.health.v1.health_grpc import HealthStub
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse

from longlived import (
    AuthSettings,
    EndReason,
    KeepaliveSettings,
    LimitSettings,
    ReplaySettings,
    Request,
    Response,
    Settings,
    SubscriptionManager,
)
from longlived._transport import WRITE_CAP
from tests.h2peer import H2Peer, RawPeer, frame, grpc_body, header_frames, request_headers
from tests.helpers import Subscription, channel_for, receive, running, subscription

TIMEOUT = 20


@contextlib.asynccontextmanager
async def canary(settings: Settings, id: int = 999) -> AsyncIterator[Subscription]:
    """A subscriber on a connection of its own."""
    channel = channel_for(settings)
    try:
        async with subscription(channel, id) as stream:
            yield stream
    finally:
        channel.close()


async def numbered(server: SubscriptionManager, stream: Subscription, count: int) -> None:
    """Publish ``count`` numbered events; the canary must get each, in order."""
    for n in range(count):
        server.publish(str(n))
        assert await receive(stream, 1, timeout=TIMEOUT) == [str(n)]


async def stack_subscription(channel: Channel, id: int) -> Subscription:
    """A registered subscription left open (the test's channel closes it)."""
    stream = channel.request(
        "/longlived.Longlived/Subscribe", Cardinality.UNARY_STREAM, Request, Response
    )
    await stream.__aenter__()
    await stream.send_message(Request(id=id), end=True)
    await stream.recv_initial_metadata()
    return stream


async def refusal(channel: Channel, request: Request | None, **metadata: str) -> GRPCError:
    """The status a Subscribe gets; ``request=None`` sends headers and nothing more."""
    async with channel.request(
        "/longlived.Longlived/Subscribe", Cardinality.UNARY_STREAM, Request, Response,
        metadata=metadata or None,
    ) as stream:  # fmt: skip
        if request is None:
            await stream.send_request()
        else:
            await stream.send_message(request, end=True)
        with pytest.raises(GRPCError) as info:
            async with asyncio.timeout(TIMEOUT):
                await stream.recv_initial_metadata()
                await stream.recv_message()
    return info.value


async def lone_status(settings: Settings, body: bytes | None = None) -> tuple[int, str]:
    """The status of a Subscribe that sends its headers, then ``body`` (without ending the
    stream) or nothing at all; on a raw connection of its own."""
    peer = await H2Peer.connect(settings)
    try:
        stream_id = peer.open(request_headers())
        if body is not None:
            peer.h2.send_data(stream_id, body)  # no END_STREAM
        await peer.flush()
        async with asyncio.timeout(TIMEOUT):
            return await peer.status(stream_id)
    finally:
        peer.close()


# ------------------------------------------------------------------ item 1: one large event


async def test_an_event_larger_than_the_connection_window_is_delivered(
    server: SubscriptionManager, quiet: Settings
) -> None:
    """A peer with a large stream window and the 64 KiB connection window used to wedge."""
    config = Configuration(http2_connection_window_size=65_535, http2_stream_window_size=1 << 20)
    channel = Channel(quiet.host, quiet.port, config=config)
    try:
        async with subscription(channel, 1) as stream:
            server.publish("x" * 100_000)
            server.publish("small")
            assert await receive(stream, 2, timeout=TIMEOUT) == ["x" * 100_000, "small"]
    finally:
        channel.close()


async def test_a_stream_is_not_stuck_behind_a_sibling_holding_the_connection_window(
    server: SubscriptionManager, quiet: Settings
) -> None:
    """A stream that waits for its message to fit whole must not wait for ever: here a
    sibling that does not read holds most of the shared connection window."""
    config = Configuration(http2_connection_window_size=131_072, http2_stream_window_size=1 << 20)
    channel = Channel(quiet.host, quiet.port, config=config)
    try:
        async with subscription(channel, 1) as reader, subscription(channel, 2):
            server.send(1, "first")  # the reader sees the whole connection window open
            assert await receive(reader, 1, timeout=TIMEOUT) == ["first"]
            server.send(2, "h" * 100_000)  # id 2 never reads: it holds 100 KB of the window
            for n in range(3):
                server.send(1, f"{n}:" + "r" * 60_000)  # never fits whole in what is left
            got = await receive(reader, 3, timeout=TIMEOUT)
            assert got == [f"{n}:" + "r" * 60_000 for n in range(3)]
    finally:
        channel.close()


async def test_events_written_at_once_keep_to_a_small_window_and_to_their_order(
    server: SubscriptionManager, quiet: Settings
) -> None:
    """A subscriber that keeps up gets each event written by the publish itself, past h2's
    send_data: the windows h2 tracks must shrink as if it had sent them (the peer's h2
    checks its own window and fails the connection otherwise), and what queues once the
    window is used up must not be overtaken."""
    reader, writer = await asyncio.open_connection(quiet.host, quiet.port)
    peer = H2Peer(reader, writer)
    peer.h2.initiate_connection()
    peer.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1_000})
    try:
        stream_id = peer.open(request_headers(), grpc_body(Request(id=1)))
        await peer.flush()
        async with asyncio.timeout(TIMEOUT):
            await peer.read_until(h2.events.ResponseReceived, stream_id=stream_id)
        for n in range(40):  # one event per loop turn: each finds the writer idle
            server.publish(f"{n:03}" + "x" * 60)
            await asyncio.sleep(0)
        received = 0
        async with asyncio.timeout(TIMEOUT):
            while received < 1_000 - 100:  # read, granting nothing, until the window is used
                for event in peer.h2.receive_data(await reader.read(65_536)):
                    if isinstance(event, h2.events.DataReceived):
                        received += event.flow_controlled_length
                        peer.events.append(event)
        assert received <= 1_000
        for event in peer.events:  # now grant it all back, and read the rest
            if isinstance(event, h2.events.DataReceived):
                peer.h2.acknowledge_received_data(event.flow_controlled_length, stream_id)
        await peer.flush()
        async with asyncio.timeout(TIMEOUT):
            rest = await peer.read_data(stream_id, until=b"039" + b"x" * 60)
        first = b"".join(e.data for e in peer.events if isinstance(e, h2.events.DataReceived))
        data = first + rest
        messages = []
        while data:
            size = int.from_bytes(data[1:5], "big")
            messages.append(Response.FromString(data[5 : 5 + size]).data)
            data = data[5 + size :]
        assert messages == [f"{n:03}" + "x" * 60 for n in range(40)]
    finally:
        peer.close()


async def test_a_stream_ended_after_direct_writes_gets_its_status_not_a_reset(
    server: SubscriptionManager, quiet: Settings
) -> None:
    """Events that went out at once never taught the writer the window's size: the first
    one it wrote was split at a small window, and an end then reset the stream."""
    reader, writer = await asyncio.open_connection(quiet.host, quiet.port)
    peer = H2Peer(reader, writer)
    peer.h2.initiate_connection()
    peer.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1_000})
    try:
        stream_id = peer.open(request_headers(), grpc_body(Request(id=1)))  # the seed's
        await peer.flush()
        async with asyncio.timeout(TIMEOUT):
            await peer.read_until(h2.events.ResponseReceived, stream_id=stream_id)
        sub = server.hub.get(1)
        assert sub is not None
        for n in range(4):  # three go out at once; the fourth finds 85 bytes of window
            server.publish(f"{n}" + "x" * 298)
            await asyncio.sleep(0)  # the woken writer runs first: it holds the fourth
        assert sub.queued == 0
        server.hub.end_subscriber(sub, EndReason.MAX_AGE)
        async with asyncio.timeout(TIMEOUT):
            status = await peer.status(stream_id)
        assert status == (Status.UNAVAILABLE.value, "max connection age reached")
        assert not any(isinstance(e, h2.events.StreamReset) for e in peer.events)
    finally:
        peer.close()


# ------------------------------------------------------------ item 5: unadmitted streams


@pytest.fixture
def strict(quiet: Settings) -> Settings:
    return quiet.model_copy(
        update={"limits": LimitSettings(admission_timeout=0.3, max_pending_streams=5)}
    )


async def test_a_call_that_never_sends_its_request_is_refused(
    listener: socket.socket, strict: Settings
) -> None:
    async with running(strict, listener) as server, canary(strict) as bird:
        status = await lone_status(strict)  # headers, and nothing more
        assert status == (4, "no complete request within 0.3s of the call")  # DEADLINE_EXCEEDED
        await numbered(server, bird, 3)
        assert server.rejected == {"DEADLINE_EXCEEDED": 1}


async def test_a_partial_request_body_is_refused(listener: socket.socket, strict: Settings) -> None:
    async with running(strict, listener) as server:
        status = await lone_status(strict, grpc_body(Request(id=1))[:4])
        assert status == (4, "no complete request within 0.3s of the call")
        assert server.subscribers == []


async def test_streams_awaiting_their_request_are_bounded_per_connection(
    listener: socket.socket, strict: Settings
) -> None:
    parked = strict.model_copy(
        update={"limits": LimitSettings(admission_timeout=30, max_pending_streams=5)}
    )
    async with running(parked, listener) as server, canary(parked) as bird:
        peer = await H2Peer.connect(parked)
        try:
            ids = [peer.open(request_headers()) for _ in range(6)]
            await peer.flush()
            async with asyncio.timeout(TIMEOUT):
                status = await peer.status(ids[-1])
            assert status == (
                8,  # RESOURCE_EXHAUSTED
                "too many streams awaiting their request on this connection (limit 5)",
            )
            await numbered(server, bird, 3)
        finally:
            peer.close()


async def test_many_complete_requests_at_once_are_not_counted_as_parked(
    listener: socket.socket, strict: Settings
) -> None:
    """The bound is on requests still incomplete, not on a burst of well-formed ones."""
    async with running(strict, listener) as server:
        peer = await H2Peer.connect(strict)
        try:
            for id in range(20):  # one write: the server reads them all in one go
                peer.open(request_headers(), grpc_body(Request(id=id)))
            await peer.flush()
            async with asyncio.timeout(TIMEOUT):
                await server.wait_for(lambda: len(server.subscribers) == 20)
        finally:
            peer.close()


@pytest.fixture
def authed(quiet: Settings) -> Settings:
    return quiet.model_copy(
        update={
            "auth": AuthSettings(tokens={"s3cret": "alice"}),
            "limits": LimitSettings(admission_timeout=30),
        }
    )


async def test_strangers_are_refused_before_their_request_arrives(
    listener: socket.socket, authed: Settings
) -> None:
    async with running(authed, listener) as server:
        status = await lone_status(authed)  # the body never comes: no need to wait for it
        assert status == (16, "missing or invalid bearer token")  # UNAUTHENTICATED
        assert server.rejected == {"UNAUTHENTICATED": 1}


async def test_health_watch_needs_a_token_but_check_does_not(
    listener: socket.socket, authed: Settings
) -> None:
    async with running(authed, listener) as server:
        channel = channel_for(authed)
        try:
            health = HealthStub(channel)
            answer = await health.Check(HealthCheckRequest(service=""))
            assert answer.status == HealthCheckResponse.SERVING
            with pytest.raises(GRPCError) as info:
                async with asyncio.timeout(TIMEOUT), health.Watch.open() as watch:
                    await watch.send_message(HealthCheckRequest(service=""), end=True)
                    await watch.recv_message()
            assert info.value.status is Status.UNAUTHENTICATED
            async with (
                asyncio.timeout(TIMEOUT),
                health.Watch.open(metadata={"authorization": "Bearer s3cret"}) as watch,
            ):
                await watch.send_message(HealthCheckRequest(service=""), end=True)
                reply = await watch.recv_message()
                assert reply is not None
                assert reply.status == HealthCheckResponse.SERVING
                await watch.cancel()
        finally:
            channel.close()
        assert server.rejected == {"UNAUTHENTICATED": 1}


async def test_a_health_watch_that_never_sends_its_request_is_refused(
    listener: socket.socket, strict: Settings
) -> None:
    async with running(strict, listener) as server:
        channel = channel_for(strict)
        try:
            with pytest.raises(GRPCError) as info:
                async with asyncio.timeout(TIMEOUT), HealthStub(channel).Watch.open() as watch:
                    await watch.send_request()
                    await watch.recv_message()
            assert info.value.status is Status.DEADLINE_EXCEEDED
        finally:
            channel.close()
        assert server.rejected == {"DEADLINE_EXCEEDED": 1}


# ----------------------------------------------------------------- item 6: rapid reset


async def test_rapid_reset_gets_goaway_and_the_canary_loses_nothing(
    listener: socket.socket, quiet: Settings
) -> None:
    settings = quiet.model_copy(
        update={"limits": LimitSettings(resets_per_second=50, reset_burst=200)}
    )
    async with running(settings, listener) as server, canary(settings) as bird:
        peer = await H2Peer.connect(settings)
        try:
            sent = 0
            with contextlib.suppress(ConnectionError):
                while sent < 20_000:  # far beyond the burst, as fast as the socket takes it
                    for _ in range(100):
                        stream_id = peer.open(request_headers())
                        peer.h2.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
                        sent += 1
                    await peer.flush()
            async with asyncio.timeout(TIMEOUT):
                event = await peer.read_until(h2.events.ConnectionTerminated)
            assert isinstance(event, h2.events.ConnectionTerminated)
            assert event.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
            assert event.additional_data == b"too many stream resets"
        finally:
            peer.close()
        await numbered(server, bird, 5)


# ----------------------------------------------------- item 7: peers that stop reading


async def test_peers_with_huge_windows_that_stop_reading_hold_bounded_memory(
    listener: socket.socket, quiet: Settings
) -> None:
    settings = quiet.model_copy(update={"replay": ReplaySettings(size=2000)})
    async with running(settings, listener) as server:
        first = server.publish("first")
        for n in range(1999):
            server.publish(f"{n}:" + "y" * 10_000)  # 20 MB of history to replay
        token = f"{first.epoch}:0"
        peers = [await H2Peer.connect(settings, window=2**31 - 1) for _ in range(8)]
        try:
            for id, peer in enumerate(peers):
                peer.open(request_headers(), grpc_body(Request(id=id, resume_token=token)))
                await peer.flush()
            assert server._server is not None
            protocols = server._server._protocols
            async with asyncio.timeout(TIMEOUT):
                # every writer to a non-reading peer ends up paused on its full socket
                while (  # noqa: ASYNC110  # nothing signals that the kernel buffers filled
                    len(protocols) < 8
                    or sum(not p.connection.write_ready.is_set() for p in protocols) < 8
                ):
                    await asyncio.sleep(0.01)
            per_connection = 2 * WRITE_CAP + 16_384  # the documented bound: buffer + one write
            assert server._server.buffered() <= 8 * per_connection
            async with canary(settings) as bird:
                server.publish("canary")
                assert await receive(bird, 1, timeout=TIMEOUT) == ["canary"]
        finally:
            for peer in peers:
                peer.close()


# ---------------------------------------------------------- item 10: oversized metadata


async def test_oversized_metadata_fails_its_stream_not_the_connection(
    server: SubscriptionManager, quiet: Settings
) -> None:
    channel = channel_for(quiet)
    try:
        error = await refusal(channel, Request(id=1), **{"x-big": "a" * 100_000})
        assert error.status is Status.RESOURCE_EXHAUSTED
        assert error.message is not None
        assert "request metadata of" in error.message
        async with subscription(channel, 2) as stream:  # the same connection carries on
            server.publish("still here")
            assert await receive(stream, 1) == ["still here"]
    finally:
        channel.close()


# ------------------------------------------------------------------ found in review


async def test_a_peer_that_floods_pings_and_never_reads_is_dropped(
    listener: socket.socket, quiet: Settings
) -> None:
    """h2 answers every PING: a peer that never read used to grow the server's buffers
    without bound, and an unsolicited PING ACK now and then kept keepalive quiet."""
    settings = quiet.model_copy(
        update={"keepalive": KeepaliveSettings(time=0.5, timeout=0.5, max_pings_without_data=0)}
    )
    ping = bytes.fromhex("000008060000000000") + bytes(8)
    ack = bytes.fromhex("000008060100000000") + bytes(8)
    async with running(settings, listener) as server:
        peer = await H2Peer.connect(settings)
        try:
            with pytest.raises(ConnectionError):
                async with asyncio.timeout(TIMEOUT):
                    while True:  # ends when the server drops the connection
                        peer.writer.write(ping * 5000 + ack)
                        await peer.writer.drain()
            assert server._server is not None
            assert server._server.buffered() <= 2 * WRITE_CAP + 16_384
        finally:
            peer.close()


async def test_an_unsubscribe_whose_answer_cannot_be_sent_does_not_hold_its_handler(
    listener: socket.socket, quiet: Settings
) -> None:
    """A peer granting no window used to park every Unsubscribe handler for ever."""
    async with running(quiet, listener) as server:
        peer = await H2Peer.connect(quiet)
        try:
            peer.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
            for id in range(5):
                peer.open(request_headers(), grpc_body(Request(id=id)))
            await peer.flush()
            async with asyncio.timeout(TIMEOUT):
                await server.wait_for(lambda: len(server.subscribers) == 5)
            for id in range(5):
                peer.open(
                    request_headers("/longlived.Longlived/Unsubscribe"), grpc_body(Request(id=id))
                )
            await peer.flush()
            with pytest.raises(ConnectionError):  # dropped once drain_timeout has passed
                async with asyncio.timeout(TIMEOUT):
                    await peer.read_until(h2.events.ConnectionTerminated)
            async with asyncio.timeout(TIMEOUT):
                await server.wait_for(lambda: server.hub.open_streams == 0)
        finally:
            peer.close()


async def test_refusals_count_like_resets(listener: socket.socket, quiet: Settings) -> None:
    """Refused streams used to come at any rate, each with a WARNING line."""
    settings = quiet.model_copy(
        update={
            "limits": LimitSettings(
                admission_timeout=30, max_pending_streams=2, resets_per_second=10, reset_burst=50
            )
        }
    )
    async with running(settings, listener) as server:
        peer = await H2Peer.connect(settings)
        try:
            with contextlib.suppress(ConnectionError):
                for _ in range(10):
                    for _ in range(100):  # two parked, the rest refused
                        peer.open(request_headers())
                    await peer.flush()
            async with asyncio.timeout(TIMEOUT):
                event = await peer.read_until(h2.events.ConnectionTerminated)
            assert isinstance(event, h2.events.ConnectionTerminated)
            assert event.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
            assert event.additional_data == b"too many refused streams"
        finally:
            peer.close()
        async with canary(settings) as bird:
            await numbered(server, bird, 3)


async def test_a_peer_that_shrinks_its_windows_still_gets_a_large_event(
    server: SubscriptionManager, quiet: Settings
) -> None:
    """A window peak from before the peer shrank INITIAL_WINDOW_SIZE used to wedge it."""
    peer = await H2Peer.connect(quiet, window=1 << 20)
    try:
        stream_id = peer.open(request_headers(), grpc_body(Request(id=1)))
        await peer.flush()
        async with asyncio.timeout(TIMEOUT):
            await server.wait_for(lambda: server.subscribers == [1])
        server.send(1, "warm-up")
        async with asyncio.timeout(TIMEOUT):
            await peer.read_until(h2.events.DataReceived, stream_id=stream_id)
        peer.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 16_384})
        await peer.flush()
        server.send(1, "x" * 100_000)
        server.send(1, "small")
        async with asyncio.timeout(TIMEOUT):
            received = await peer.read_data(stream_id, until=b"small")
        assert b"x" * 100_000 in received
    finally:
        peer.close()


# ------------------------------------------------------------------ found by the fuzz run


async def test_frames_of_unknown_types_are_ignored(
    server: SubscriptionManager, quiet: Settings
) -> None:
    """RFC 9113 5.5: unknown frame types (PRIORITY_UPDATE, ORIGIN, extensions) must be
    ignored. grpclib had no processor for them and dropped the connection with a traceback."""
    peer = await RawPeer.connect(quiet)
    try:
        peer.write(frame(0x10, 0, b"\x00\x00\x00\x01u=1") + frame(0xFA, 1, b"anything"))
        peer.write(header_frames(1, request_headers()) + frame(0x0, 1, grpc_body(Request(id=1)),
                                                               flags=0x1))  # fmt: skip
        async with asyncio.timeout(TIMEOUT):
            assert await peer.until(lambda p: 1 in p.headers), "the connection was dropped"
        assert peer.status(1) is None  # the subscription opened
        async with asyncio.timeout(TIMEOUT):
            await server.wait_for(lambda: server.subscribers == [1])
    finally:
        peer.close()


async def test_a_connection_error_is_told_with_goaway_and_its_code(
    server: SubscriptionManager, quiet: Settings
) -> None:
    """RFC 9113 5.4.1: a connection error gets GOAWAY with its code; the connection used to
    be closed with the GOAWAY h2 had queued left unsent."""
    peer = await RawPeer.connect(quiet)
    try:
        peer.write(frame(0x4, 0, struct.pack(">HI", 0x4, 2**31)))  # INITIAL_WINDOW_SIZE 2^31
        async with asyncio.timeout(TIMEOUT):
            await peer.until(lambda p: p.goaway() is not None)
        goaway = peer.goaway()
        assert goaway is not None, "closed without GOAWAY"
        assert goaway.error_code == h2.errors.ErrorCodes.FLOW_CONTROL_ERROR
    finally:
        peer.close()


@pytest.mark.parametrize("path", ["", "/no.Such/Method "])
async def test_an_unknown_method_is_refused_with_a_status_a_client_can_read(
    server: SubscriptionManager, quiet: Settings, path: str
) -> None:
    """The refusal named the path as it came: an empty one, or one ending in a space, made
    ``grpc-message`` end in whitespace, which HTTP/2 forbids (h2 clients reject it)."""
    peer = await RawPeer.connect(quiet)
    try:
        peer.write(header_frames(1, request_headers(path), end_stream=True))
        async with asyncio.timeout(TIMEOUT):
            await peer.until(lambda p: p.status(1) is not None)
        assert peer.status(1) == Status.UNIMPLEMENTED.value
        message = peer.headers[1][b"grpc-message"]
        assert message == message.strip()
        assert unquote(message.decode()) == f"no method {path!r}"
    finally:
        peer.close()


async def test_the_streams_of_an_open_connection_are_forgotten_when_they_end(
    server: SubscriptionManager, quiet: Settings
) -> None:
    """grpclib forgot a finished stream's task only at the connection's tenth next stream:
    a connection that stays open after many streams ended kept every one of them."""
    channel = channel_for(quiet)
    try:
        streams = [await stack_subscription(channel, id) for id in range(30)]
        async with asyncio.timeout(TIMEOUT):
            await server.wait_for(lambda: len(server.subscribers) == 30)
        for id in range(30):
            await server.unsubscribe(Request(id=id))
        for stream in streams:
            async with asyncio.timeout(TIMEOUT):
                assert await stream.recv_message() is None  # ended with OK
        assert server._server is not None
        (handler,) = server._server._handlers
        if handler._tasks:
            async with asyncio.timeout(TIMEOUT):
                await asyncio.wait(list(handler._tasks.values()))
        await asyncio.sleep(0)  # the handler's own callbacks, scheduled as its tasks ended
        assert handler._tasks == {}
    finally:
        channel.close()


async def test_a_closed_connection_is_forgotten_with_its_streams(
    server: SubscriptionManager, quiet: Settings
) -> None:
    """grpclib forgot a closed connection's handler (and every stream it had served) only
    at the server's tenth next connection: an idle server kept the last ones for ever."""
    peer = await H2Peer.connect(quiet)
    try:
        for id in range(50):
            peer.open(request_headers(), grpc_body(Request(id=id)))
        await peer.flush()
        async with asyncio.timeout(TIMEOUT):
            await server.wait_for(lambda: len(server.subscribers) == 50)
    finally:
        peer.close()
    async with asyncio.timeout(TIMEOUT):
        await server.wait_for(lambda: not server.subscribers)
    assert server._server is not None
    for handler in list(server._server._handlers):
        async with asyncio.timeout(TIMEOUT):
            await handler.wait_closed()
    await asyncio.sleep(0)  # the handler's own callbacks, scheduled as its tasks ended
    assert server._server._handlers == set()
