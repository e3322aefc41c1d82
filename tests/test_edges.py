"""Edge cases found in review: each one lost events, hung, or crashed before it was fixed."""

from __future__ import annotations

import asyncio
import gc
import secrets
import socket
import struct
from pathlib import Path

import pytest
import trustme
from grpclib.client import Channel
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError
from grpclib.protocol import H2Protocol

from longlived import (
    AuthSettings,
    BackoffSettings,
    Caller,
    HeartbeatSettings,
    QueueSettings,
    Request,
    ResilientClient,
    Response,
    ResumeExpired,
    Settings,
    SubscriptionClosed,
    SubscriptionManager,
    TlsSettings,
)
from longlived._transport import ResilientChannel
from longlived.hub import EndReason
from tests.helpers import channel_for, receive, running, subscription
from tests.proxy import proxy_to

TIMEOUT = 10


class Watched(ResilientClient):
    """A client that counts every message it receives (heartbeats included)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]  # passed through
        self.arrived = asyncio.Event()
        self.messages = 0

    def _accept(self, response: Response) -> bool:
        self.messages += 1
        self.arrived.set()
        return super()._accept(response)

    async def until_messages(self, count: int) -> None:
        while self.messages < count:
            self.arrived.clear()
            await self.arrived.wait()


async def test_unsubscribe_delivers_what_was_queued_before_ok(
    server: SubscriptionManager, quiet: Settings
) -> None:
    channel = channel_for(quiet)
    try:
        async with subscription(channel, 1) as stream:
            server.publish("one")
            assert await receive(stream, 1) == ["one"]
            server.publish("two")
            server.publish("bye")
            await server.unsubscribe(Request(id=1))
            assert await receive(stream, 2) == ["two", "bye"]
            async with asyncio.timeout(TIMEOUT):
                assert await stream.recv_message() is None
                await stream.recv_trailing_metadata()  # OK, or this raises
    finally:
        channel.close()


async def test_quiet_client_resumes_without_gap_after_reconnect(
    server: SubscriptionManager, quiet: Settings
) -> None:
    """A client that has received nothing yet still has a position to resume from."""
    async with ResilientClient(1, settings=quiet, topics=["mine"]) as client:
        waiting = asyncio.ensure_future(anext(aiter(client)))
        async with asyncio.timeout(TIMEOUT):
            await client.connected.wait()
            assert server.hub.end(1, EndReason.SHUTDOWN)  # the stream breaks, nothing received
            await client.disconnected.wait()
            server.publish("published while away", topic="mine")
            assert (await waiting).data == "published while away"


async def test_odd_digit_token_is_malformed_not_a_crash(
    server: SubscriptionManager, quiet: Settings
) -> None:
    channel = channel_for(quiet)
    try:
        async with subscription(channel, 7) as holder:
            request = Request(id=7, resume_token="x:\u00b2")  # "²" passes isdigit()
            async with subscription(channel, request) as stream:
                reset = (await receive(stream, 1))[0]
            assert "malformed" in reset
            async with asyncio.timeout(TIMEOUT):
                assert await holder.recv_message() is None  # replaced cleanly, no crash
    finally:
        channel.close()


@pytest.mark.parametrize("interval", [0.02, 0.0004], ids=["20ms", "under-1ms"])
async def test_granted_heartbeat_period_is_respected(
    listener: socket.socket, quiet: Settings, interval: float
) -> None:
    """The client asks for 20 ms, the server grants 200 ms: no false 'dead stream'.

    Under a millisecond must not round to 0 ms, which asks for no heartbeats at all.
    """
    slow_beats = quiet.model_copy(
        update={"heartbeat": HeartbeatSettings(interval=interval, misses=3, min_interval=0.2)}
    )
    server = SubscriptionManager(slow_beats)
    await server.start(sock=listener)
    client = Watched(1, settings=slow_beats)
    waiting = asyncio.ensure_future(anext(aiter(client)))
    try:
        async with asyncio.timeout(TIMEOUT):
            await client.until_messages(4)  # the initial position, then three granted beats
        assert (client.connections, client.failures) == (1, 0)
    finally:
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        await client.aclose()
        await server.close()


async def test_streams_that_deliver_only_heartbeats_reset_the_backoff(
    listener: socket.socket, quiet: Settings
) -> None:
    aging = quiet.model_copy(
        update={
            "max_connection_age": 0.1,
            "backoff": BackoffSettings(initial=0.01, max=0.02, max_attempts=2),
        }
    )
    server = SubscriptionManager(aging)
    await server.start(sock=listener)
    client = ResilientClient(1, settings=aging)
    waiting = asyncio.ensure_future(anext(aiter(client)))
    try:
        async with asyncio.timeout(TIMEOUT):
            while client.connections < 5:
                await client.connected.wait()
                await client.disconnected.wait()
        assert not waiting.done()  # no RetriesExhausted: every stream made progress
    finally:
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        await client.aclose()
        await server.close()


async def test_aclose_from_another_task_ends_the_iteration(
    server: SubscriptionManager, quiet: Settings
) -> None:
    client = ResilientClient(7, settings=quiet)
    received: list[str] = []

    async def read() -> None:
        async for response in client:
            received.append(response.data)

    reader = asyncio.ensure_future(read())
    async with asyncio.timeout(TIMEOUT):
        await client.connected.wait()
        await client.aclose()
        await reader  # ends normally
        await server.wait_for(lambda: 7 not in server.subscribers)
    assert received == []


def throwaway_tls(directory: Path) -> tuple[TlsSettings, TlsSettings]:
    """TLS settings for a server on 127.0.0.1 and for a client trusting it (a test CA)."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    ca_path, cert_path, key_path = (directory / name for name in ("ca.pem", "cert.pem", "key.pem"))
    ca.cert_pem.write_to_path(str(ca_path))
    for blob in cert.cert_chain_pems:
        blob.write_to_path(str(cert_path), append=True)
    cert.private_key_pem.write_to_path(str(key_path))
    return TlsSettings(cert=cert_path, key=key_path), TlsSettings(ca=ca_path)


async def test_aclose_while_connecting_stops_the_client(
    listener: socket.socket, quiet: Settings, tmp_path: Path
) -> None:
    """aclose() while the TLS handshake is under way: no stream opens once it completes."""
    server_tls, client_tls = throwaway_tls(tmp_path)
    async with (
        running(quiet.model_copy(update={"tls": server_tls}), listener) as server,
        proxy_to((quiet.host, quiet.port)) as (proxy, port),
    ):
        start = server.publish("before")
        server.publish("missed while connecting")  # replayed at once to a stream that opens
        through = quiet.model_copy(update={"address": f"127.0.0.1:{port}", "tls": client_tls})
        client = ResilientClient(1, settings=through, resume_token=start.token)
        received: list[str] = []

        async def read() -> None:
            async for response in client:
                received.append(response.data)
                break  # one message after aclose() is the failure: no need to wait for more

        proxy.hold()
        async with asyncio.timeout(TIMEOUT), asyncio.TaskGroup() as tasks:
            reader = tasks.create_task(read())
            await proxy.until(accepted=1)  # the client's TLS hello waits in the proxy
            await client.aclose()
            proxy.release()  # a handshake that completes now must not be used
            await reader
        assert received == []
        assert not client.connected.is_set()
        gc.collect()  # a connection left open warns (ResourceWarning) when collected


class EpochHopper(SubscriptionManager):
    """A server that forgets its history before every subscription (many replicas, no log)."""

    def authorize_subscribe(self, caller: Caller, request: Request) -> bool:
        self.hub.epoch = secrets.token_hex(8)
        return True


async def test_repeated_resets_back_off(listener: socket.socket, quiet: Settings) -> None:
    server = EpochHopper(quiet)
    await server.start(sock=listener)
    delays: list[float] = []

    async def sleep(delay: float) -> None:
        delays.append(delay)

    client = ResilientClient(1, settings=quiet, resume_token="gone:1", sleep=sleep)
    try:
        async with asyncio.timeout(TIMEOUT):
            for _ in range(4):
                with pytest.raises(ResumeExpired):
                    await anext(aiter(client))
        assert client.resets == 4
        # a first RESET is normal and the second is resubscribed at once; from then on the
        # client backs off before each attempt, with growing delays
        assert len(delays) == 2
        assert delays[1] > delays[0]
    finally:
        await client.aclose()
        await server.close()


async def test_connection_closed_by_keepalive_is_replaced_not_reused(
    server: SubscriptionManager, quiet: Settings
) -> None:
    """Keepalive closes the connection while the app handles a RESET; asyncio reports the
    loss only later. Iterating again connects afresh instead of crashing."""
    client = ResilientClient(1, settings=quiet, resume_token="gone:1")
    try:
        async with asyncio.timeout(TIMEOUT):
            with pytest.raises(ResumeExpired):
                await anext(aiter(client))
            server.publish("after the reset")
            assert client._channel is not None
            protocol = await client._channel.__connect__()  # the connection it keeps
            protocol.connection.close()  # what grpclib does when a keepalive ping times out
            assert (await anext(aiter(client))).data == "after the reset"
        assert client.connections == 2
    finally:
        await client.aclose()


async def raw_request(channel: Channel, payload: bytes) -> GRPCError:
    """Send ``payload`` as the raw body of a Subscribe request; the error it gets."""
    with pytest.raises(GRPCError) as info:
        async with channel.request(
            "/longlived.Longlived/Subscribe", Cardinality.UNARY_STREAM, Request, Response
        ) as stream:
            await stream.send_request()
            await stream._stream.send_data(payload, end_stream=True)
            async with asyncio.timeout(TIMEOUT):
                await stream.recv_message()
    return info.value


@pytest.mark.parametrize(
    ("payload", "status", "fragment"),
    [
        (struct.pack(">?I", True, 2) + b"\x08\x01", Status.UNIMPLEMENTED, "compressed"),
        (struct.pack(">?I", False, 10) + b"\x08\x01", Status.INVALID_ARGUMENT, "truncated"),
        (struct.pack(">?I", False, 200_000_000) + b"x" * 100, Status.RESOURCE_EXHAUSTED, "limit"),
        (struct.pack(">?I", False, 1) + b"\x08", Status.INVALID_ARGUMENT, "malformed"),
        (struct.pack(">?I", False, 4) + b"\x0a\x02ab", Status.INVALID_ARGUMENT, "malformed"),
        (b"\x00\x00", Status.INVALID_ARGUMENT, "truncated"),
    ],
)
async def test_bad_framing_gets_a_clear_status(
    server: SubscriptionManager, quiet: Settings, payload: bytes, status: Status, fragment: str
) -> None:
    channel = channel_for(quiet)
    try:
        async with subscription(channel, 1) as bystander:
            error = await raw_request(channel, payload)
            assert error.status is status
            assert fragment in str(error.message)
            server.publish("still here")
            assert await receive(bystander, 1) == ["still here"]
    finally:
        channel.close()


async def test_oversized_events_to_a_stalled_reader_are_abandoned(
    listener: socket.socket, quiet: Settings
) -> None:
    """Events larger than the peer's window no longer pin a too-slow subscriber's stream."""
    small = quiet.model_copy(update={"queue": QueueSettings(size=1)})
    server = SubscriptionManager(small)
    await server.start(sock=listener)
    channel = channel_for(small)
    try:
        async with subscription(channel, 1):
            for _ in range(4):
                server.publish("z" * 6_000_000)
            async with asyncio.timeout(TIMEOUT):
                await server.wait_for(lambda: server.hub.open_streams == 0)
    except GRPCError:
        pass  # the stream was reset mid-message: the client sees that when it leaves
    finally:
        channel.close()
        await server.close()


async def test_close_propagates_its_own_cancellation(
    listener: socket.socket, quiet: Settings
) -> None:
    cleanup_started, release = asyncio.Event(), asyncio.Event()

    class SlowCleanup(SubscriptionManager):
        async def event_source(self) -> None:
            try:
                await asyncio.Event().wait()
            finally:
                cleanup_started.set()
                await release.wait()  # a cleanup that takes its time

    server = SlowCleanup(quiet)
    await server.start(sock=listener)
    closing = asyncio.ensure_future(server.close())
    try:
        async with asyncio.timeout(TIMEOUT):
            await cleanup_started.wait()
            closing.cancel()
            with pytest.raises(asyncio.CancelledError):
                await closing
    finally:
        release.set()
        assert server._server is not None
        await server._server.wait_closed()


async def test_replacing_another_callers_subscription_is_denied(
    listener: socket.socket, quiet: Settings
) -> None:
    authed = quiet.model_copy(update={"auth": AuthSettings(tokens={"a": "alice", "b": "bob"})})
    server = SubscriptionManager(authed)
    await server.start(sock=listener)
    alice = ResilientClient(1, settings=authed.model_copy(update={"auth": AuthSettings(token="a")}))
    bob = ResilientClient(1, settings=authed.model_copy(update={"auth": AuthSettings(token="b")}))
    try:
        waiting = asyncio.ensure_future(anext(aiter(alice)))
        async with asyncio.timeout(TIMEOUT):
            await alice.connected.wait()
            with pytest.raises(SubscriptionClosed) as info:
                await anext(aiter(bob))
            assert info.value.status == "PERMISSION_DENIED"
            server.send(1, "alice is still subscribed")
            assert (await waiting).data == "alice is still subscribed"
    finally:
        await alice.aclose()
        await bob.aclose()
        await server.close()


async def test_a_connection_dropped_as_soon_as_it_opens_is_retried(
    server: SubscriptionManager, quiet: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection lost between its opening and the first stream on it (a proxy whose
    upstream is down accepts, then drops it): grpclib has forgotten its transport, and the
    stream would fail with AttributeError, which nobody retries. Found by the chaos suite."""
    create = ResilientChannel._create_connection
    dropped = 0

    async def lost_at_once(channel: ResilientChannel) -> H2Protocol:
        nonlocal dropped
        protocol = await create(channel)
        if dropped < 3:  # the first three connections are lost as they open
            dropped += 1
            protocol.processor.close("Connection lost")
        return protocol

    monkeypatch.setattr(ResilientChannel, "_create_connection", lost_at_once)
    async with ResilientClient(1, settings=quiet) as client:
        first = asyncio.ensure_future(anext(aiter(client)))
        async with asyncio.timeout(20):
            await server.wait_for(lambda: 1 in server.subscribers or first.done())
            server.publish("through")
            response = await first
    assert response.data == "through"
    assert (dropped, client.failures) == (3, 3)
