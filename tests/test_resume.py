"""Never lose an event: resume, replay, RESET, slow consumers, heartbeats, topics."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import grpclib.const
import grpclib.server
import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from longlived import (
    HeartbeatSettings,
    QueueSettings,
    ReplaySettings,
    Request,
    ResilientClient,
    Response,
    ResponseKind,
    ResumeExpired,
    Settings,
    SubscriptionManager,
)
from longlived.hub import EndReason
from tests.helpers import channel_for, drop_connections, receive, subscription

TIMEOUT = 10


async def paced(
    server: SubscriptionManager, count: int, received: list[int], progress: asyncio.Event
) -> None:
    """Publish "0".."count-1", staying at most 200 events ahead of the consumer.

    Events keep flowing while the consumer catches up, and every break happens with
    events in flight and more still to come.
    """
    for n in range(count):
        while n - len(received) > 200:
            progress.clear()
            await progress.wait()
        server.publish(str(n))
        if n % 25 == 0:
            await asyncio.sleep(0)


async def test_every_event_exactly_once_in_order_across_broken_connections(
    server: SubscriptionManager, quiet: Settings
) -> None:
    total = 4000
    # after this many events: break the connection, kill the stream, restart the client
    breaks = {300: "transport", 1200: "stream", 2000: "client", 2900: "transport", 3500: "stream"}
    received: list[int] = []
    progress = asyncio.Event()
    connections = 0
    client = ResilientClient(1, settings=quiet)
    publisher: asyncio.Future[None] | None = None
    try:
        async with asyncio.timeout(TIMEOUT):
            while len(received) < total:
                messages = aiter(client)
                if publisher is None:
                    first = asyncio.ensure_future(anext(messages))
                    await client.connected.wait()
                    publisher = asyncio.ensure_future(paced(server, total, received, progress))
                    received.append(int((await first).data))
                restart = False
                async for response in messages:
                    received.append(int(response.data))
                    progress.set()
                    how = breaks.pop(len(received), None)
                    if how == "transport":
                        assert drop_connections(server) == 1
                    elif how == "stream":
                        assert server.hub.end(1, EndReason.SHUTDOWN)
                    restart = how == "client"
                    if restart or len(received) == total:
                        break
                if restart:
                    token = client.token
                    connections += client.connections
                    await client.aclose()
                    client = ResilientClient(1, settings=quiet, resume_token=token)
            assert publisher is not None
            await publisher
    finally:
        await client.aclose()
    assert received == list(range(total))
    assert breaks == {}
    assert connections + client.connections == 6  # one stream per break, plus the first


async def test_reset_for_unusable_tokens_then_live(
    server: SubscriptionManager, quiet: Settings
) -> None:
    for n in range(3):
        server.publish(f"old {n}")
    channel = channel_for(quiet)
    try:
        for token, reason in [
            ("not a token", "malformed"),
            ("0123456789abcdef:2", "another epoch"),
            (f"{server.hub.epoch}:999", "future"),
        ]:
            request = Request(id=5, resume_token=token)
            async with subscription(channel, request) as stream:
                server.publish("live")
                async with asyncio.timeout(TIMEOUT):
                    reset = await stream.recv_message()
                    live = await stream.recv_message()
                assert reset is not None
                assert live is not None
                assert reset.kind == ResponseKind.RESET
                assert reason in reset.data
                assert (live.kind, live.data) == (ResponseKind.DATA, "live")
                assert live.seq == reset.seq + 1  # RESET names the position it continues from
    finally:
        channel.close()


async def test_token_older_than_history_gets_reset(
    listener: socket.socket, quiet: Settings
) -> None:
    small = quiet.model_copy(update={"replay": ReplaySettings(size=5)})
    server = SubscriptionManager(small)
    await server.start(sock=listener)
    channel = channel_for(small)
    try:
        first = server.publish("first")
        for n in range(10):
            server.publish(str(n))
        async with subscription(channel, Request(id=1, resume_token=first.token)) as stream:
            async with asyncio.timeout(TIMEOUT):
                reset = await stream.recv_message()
            assert reset is not None
            assert reset.kind == ResponseKind.RESET
            assert "older than the retained history" in reset.data
    finally:
        channel.close()
        await server.close()


async def test_client_surfaces_reset_once_and_continues_live(
    server: SubscriptionManager, quiet: Settings
) -> None:
    async with ResilientClient(2, settings=quiet, resume_token="garbage") as client:
        async with asyncio.timeout(TIMEOUT):
            with pytest.raises(ResumeExpired) as info:
                await anext(aiter(client))
            assert "malformed" in info.value.reason
            receiving = asyncio.ensure_future(anext(aiter(client)))
            await client.connected.wait()
            server.send(2, "after reset")
            assert (await receiving).data == "after reset"


async def test_slow_subscriber_is_cut_off_then_catches_up_without_loss(
    listener: socket.socket, quiet: Settings
) -> None:
    settings = quiet.model_copy(update={"queue": QueueSettings(size=16)})
    server = SubscriptionManager(settings)
    await server.start(sock=listener)
    payload = "y" * 16384
    total = 600  # ~10 MB: well past a 4 MiB flow-control window
    fast_channel = channel_for(settings)
    slow = ResilientClient(2, settings=settings)
    try:
        async with subscription(fast_channel, 1) as fast, asyncio.timeout(TIMEOUT):
            slow_messages = aiter(slow)
            first = asyncio.ensure_future(anext(slow_messages))
            await slow.connected.wait()
            for n in range(total):
                server.publish(f"{n}:{payload}")
                # the fast subscriber gets each event as it is published
                assert await receive(fast, 1) == [f"{n}:{payload}"]
                queued = sum(sub.queued for i in server.subscribers if (sub := server.hub.get(i)))
                assert queued <= 2 * 16  # server memory stays bounded
            # the stalled one was cut off ...
            assert 2 not in server.subscribers
            assert (await first).data.startswith("0:")
            # ... and once it reads again it resumes from history: all, once, in order
            got = [0]
            async for response in slow_messages:
                got.append(int(response.data.partition(":")[0]))
                if got[-1] == total - 1:
                    break
            assert got == list(range(total))
            assert slow.failures >= 1
    finally:
        fast_channel.close()
        await slow.aclose()
        await server.close()


async def test_topics_filter_on_the_wire(server: SubscriptionManager, quiet: Settings) -> None:
    async with ResilientClient(3, settings=quiet, topics=["news"]) as client:
        receiving = asyncio.ensure_future(anext(aiter(client)))
        async with asyncio.timeout(TIMEOUT):
            await client.connected.wait()
            server.publish("sport 1", topic="sport")
            server.publish("news 1", topic="news")
            response = await receiving
        assert (response.data, response.topic) == ("news 1", "news")
        assert response.seq == 2


async def test_bad_topics_are_invalid_argument(
    server: SubscriptionManager, quiet: Settings
) -> None:
    channel = channel_for(quiet)
    try:
        with pytest.raises(GRPCError) as info:
            async with subscription(channel, Request(id=1, topics=["ok", ""])):
                pass
        assert info.value.status is Status.INVALID_ARGUMENT
        assert "topic ''" in str(info.value.message)
        assert server.subscribers == []
    finally:
        channel.close()


async def test_heartbeats_on_idle_streams_carry_the_moving_token(
    server: SubscriptionManager, quiet: Settings
) -> None:
    channel = channel_for(quiet)
    try:
        request = Request(id=4, topics=["mine"], heartbeat_ms=20)
        async with subscription(channel, request) as stream:
            async with asyncio.timeout(TIMEOUT):
                beat = await stream.recv_message()
                assert beat is not None
                assert beat.kind == ResponseKind.HEARTBEAT
                server.publish("not for 4", topic="other")
                while True:
                    beat = await stream.recv_message()
                    assert beat is not None
                    assert beat.kind == ResponseKind.HEARTBEAT
                    if beat.seq == server.hub.head.seq:
                        break
            assert beat.token == server.hub.head.token
    finally:
        channel.close()


class Watched(ResilientClient):
    """A client that signals every position change."""

    moved = asyncio.Event()

    def _move_to(self, response: Response) -> None:
        super()._move_to(response)
        self.moved.set()


async def test_client_heartbeat_keeps_token_moving(
    server: SubscriptionManager, quiet: Settings
) -> None:
    hb = quiet.model_copy(update={"heartbeat": HeartbeatSettings(interval=0.02)})
    async with Watched(4, settings=hb, topics=["mine"]) as client:
        client.moved = asyncio.Event()
        waiting = asyncio.ensure_future(anext(aiter(client)))
        async with asyncio.timeout(TIMEOUT):
            await client.connected.wait()
            position = server.publish("elsewhere", topic="other")
            while client.token != position.token:
                client.moved.clear()
                await client.moved.wait()
        assert not waiting.done()  # heartbeats never reach the app
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)


class Silent:
    """A server that accepts a subscription, then never sends anything (a hung peer)."""

    def __init__(self) -> None:
        self.subscribes = 0
        self.changed = asyncio.Event()

    async def subscribe(self, stream: grpclib.server.Stream[Request, Response]) -> None:
        await stream.recv_message()
        await stream.send_initial_metadata()
        self.subscribes += 1
        self.changed.set()
        await asyncio.Event().wait()

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        return {
            "/longlived.Longlived/Subscribe": grpclib.const.Handler(
                self.subscribe, grpclib.const.Cardinality.UNARY_STREAM, Request, Response
            )
        }


async def test_heartbeat_timeout_reconnects(listener: socket.socket, quiet: Settings) -> None:
    silent = Silent()
    grpc_server = grpclib.server.Server([silent])
    await grpc_server.start(sock=listener)
    hb = quiet.model_copy(update={"heartbeat": HeartbeatSettings(interval=0.02, misses=3)})
    client = ResilientClient(1, settings=hb)
    task = asyncio.ensure_future(anext(aiter(client)))
    try:
        async with asyncio.timeout(TIMEOUT):
            while silent.subscribes < 2:
                silent.changed.clear()
                await silent.changed.wait()
        assert client.failures >= 1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.aclose()
        grpc_server.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1):
                await grpc_server.wait_closed()


async def test_id_only_request_gets_only_data(listener: socket.socket, settings: Settings) -> None:
    """An original-style subscriber never sees HEARTBEAT or RESET, even under drop policy."""
    drop = settings.model_copy(update={"queue": QueueSettings(size=1, policy="drop")})
    server = SubscriptionManager(drop)
    await server.start(sock=listener)
    channel = channel_for(drop)
    try:
        async with subscription(channel, 6) as stream:
            for n in range(5):
                server.publish(f"burst {n}")  # overflows its queue of 1: dropped silently
            got: list[Response] = []
            async with asyncio.timeout(TIMEOUT):
                while len(got) < 3:
                    message = await stream.recv_message()
                    assert message is not None
                    got.append(message)
            assert {m.kind for m in got} == {ResponseKind.DATA}
            assert all(m.data for m in got)
    finally:
        channel.close()
        await server.close()
