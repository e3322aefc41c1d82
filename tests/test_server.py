"""SubscriptionManager over the wire, with real grpclib clients on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import grpclib.events
import grpclib.server
import pytest
from grpclib.client import Channel
from grpclib.const import Cardinality, Status
from grpclib.events import RecvMessage, SendMessage
from grpclib.exceptions import GRPCError

from longlived import (
    MetricsSettings,
    QueueSettings,
    Request,
    Response,
    Settings,
    SubscriptionManager,
)
from tests.h2peer import H2Peer, grpc_body, request_headers
from tests.helpers import channel_for, receive, running, subscription

TIMEOUT = 5


async def unsubscribe(channel: Channel, id: int) -> Response:
    async with channel.request(
        "/longlived.Longlived/Unsubscribe", Cardinality.UNARY_UNARY, Request, Response
    ) as stream:
        await stream.send_message(Request(id=id), end=True)
        reply = await stream.recv_message()
    assert reply is not None
    return reply


async def test_ten_subscribers_each_receive_their_own_messages(
    manager: SubscriptionManager, settings: Settings
) -> None:
    channels = [channel_for(settings) for _ in range(10)]
    try:
        async with contextlib.AsyncExitStack() as stack:
            streams = [
                await stack.enter_async_context(subscription(ch, id))
                for id, ch in enumerate(channels, start=1)
            ]
            results = await asyncio.gather(*(receive(s, 3) for s in streams))
        for id, data in enumerate(results, start=1):
            assert data == [f"data mock for: {id}"] * 3
    finally:
        for ch in channels:
            ch.close()


async def test_unsubscribe_ends_exactly_that_stream_with_ok(
    manager: SubscriptionManager, settings: Settings
) -> None:
    channel = channel_for(settings)
    try:
        async with subscription(channel, 1) as one, subscription(channel, 2) as two:
            await receive(one, 1)
            assert await unsubscribe(channel, 1) == Response()
            async with asyncio.timeout(TIMEOUT):
                while (message := await one.recv_message()) is not None:
                    assert message.data == "data mock for: 1"
                await one.recv_trailing_metadata()  # raises unless the status is OK
            # the other subscriber is untouched
            assert await receive(two, 3) == ["data mock for: 2"] * 3
            assert manager.subscribers == [2]
    finally:
        channel.close()


async def test_unsubscribe_unknown_id_is_not_found(
    manager: SubscriptionManager, settings: Settings
) -> None:
    channel = channel_for(settings)
    try:
        with pytest.raises(GRPCError) as info:
            await unsubscribe(channel, 4242)
        assert info.value.status is Status.NOT_FOUND
        assert info.value.message == "no subscriber with id 4242"
    finally:
        channel.close()


async def test_second_subscribe_with_same_id_replaces_the_first(
    manager: SubscriptionManager, settings: Settings
) -> None:
    first_channel, second_channel = channel_for(settings), channel_for(settings)
    try:
        async with subscription(first_channel, 5) as first:
            await receive(first, 1)
            async with subscription(second_channel, 5) as second:
                # the first stream ends cleanly (status OK) ...
                async with asyncio.timeout(TIMEOUT):
                    while await first.recv_message() is not None:
                        pass
                    await first.recv_trailing_metadata()
                # ... and its cleanup did not remove the new subscriber
                assert manager.subscribers == [5]
                assert await receive(second, 2) == ["data mock for: 5"] * 2
    finally:
        first_channel.close()
        second_channel.close()


async def test_negative_id_is_invalid_and_the_largest_id_works(
    manager: SubscriptionManager, settings: Settings
) -> None:
    channel = channel_for(settings)
    try:
        with pytest.raises(GRPCError) as info:
            async with subscription(channel, -3):
                pass
        assert info.value.status is Status.INVALID_ARGUMENT
        assert info.value.message == "id must be >= 0, got -3"
        async with subscription(channel, 2**31 - 1) as big:
            assert await receive(big, 1) == [f"data mock for: {2**31 - 1}"]
    finally:
        channel.close()


async def test_disconnect_runs_cleanup_at_once(listener: socket.socket, settings: Settings) -> None:
    # The generator never fires, so only the disconnect itself can remove the subscriber.
    quiet = settings.model_copy(update={"interval": 3600.0})
    async with contextlib.AsyncExitStack() as stack:
        server = SubscriptionManager(quiet)
        await server.start(sock=listener)
        stack.push_async_callback(server.close)
        channel = channel_for(quiet)
        stack.callback(channel.close)
        async with subscription(channel, 9):
            assert server.subscribers == [9]
        # leaving the block resets the stream; the handler must clean up right away
        async with asyncio.timeout(TIMEOUT):
            await server.wait_for(lambda: 9 not in server.subscribers)


async def test_shutdown_ends_streams_with_unavailable(
    listener: socket.socket, settings: Settings
) -> None:
    server = SubscriptionManager(settings)
    await server.start(sock=listener)
    channel = channel_for(settings)
    registered = asyncio.Event()

    async def final_status(id: int) -> Status:
        with pytest.raises(GRPCError) as info:
            async with subscription(channel, id) as stream:
                await receive(stream, 1)
                if len(server.subscribers) == 2:
                    registered.set()
                async with asyncio.timeout(TIMEOUT):
                    while await stream.recv_message() is not None:
                        pass
        assert info.value.message == "server shutting down"
        return info.value.status

    try:
        statuses = asyncio.gather(final_status(1), final_status(2))
        async with asyncio.timeout(TIMEOUT):
            await registered.wait()
            await server.close()
            assert list(await statuses) == [Status.UNAVAILABLE, Status.UNAVAILABLE]
    finally:
        channel.close()
        await server.close()


async def test_subscribe_while_closing_is_unavailable(
    listener: socket.socket, settings: Settings
) -> None:
    server = SubscriptionManager(settings)
    await server.start(sock=listener)
    server._closing = True  # the window between close() starting and the listener closing
    channel = channel_for(settings)
    try:
        with pytest.raises(GRPCError) as info:
            async with subscription(channel, 1):
                pass
        assert info.value.status is Status.UNAVAILABLE
    finally:
        channel.close()
        server._closing = False
        await server.close()


async def test_many_streams_on_one_connection(
    manager: SubscriptionManager, settings: Settings
) -> None:
    """h2 allows 100 concurrent streams by default; the server raises it."""
    channel = channel_for(settings)
    try:
        async with contextlib.AsyncExitStack() as stack:
            for id in range(150):
                await stack.enter_async_context(subscription(channel, id))
            assert len(manager.subscribers) == 150
    finally:
        channel.close()


async def test_stalled_client_does_not_delay_the_others(
    listener: socket.socket, settings: Settings
) -> None:
    """A subscriber that stops reading is ended as too slow; the others get everything."""
    small = settings.model_copy(update={"interval": 3600.0, "queue": QueueSettings(size=16)})
    server = SubscriptionManager(small)
    await server.start(sock=listener)
    stalled_channel, fast_channel = channel_for(small), channel_for(small)
    payload = "x" * 65536
    events = 200  # 13 MB: far beyond the stalled client's 4 MiB flow-control window
    try:
        with pytest.raises(GRPCError) as info:
            async with subscription(stalled_channel, 0) as stalled:
                async with (
                    subscription(fast_channel, 1) as one,
                    subscription(fast_channel, 2) as two,
                ):
                    for n in range(events):
                        # the publisher moves in step with the fast readers only
                        server.publish(f"{n}:{payload}")
                        got = await asyncio.gather(receive(one, 1), receive(two, 1))
                        assert got[0] == got[1] == [f"{n}:{payload}"]
                    async with asyncio.timeout(TIMEOUT):
                        await server.wait_for(lambda: 0 not in server.subscribers)
                # once the stalled client reads again it learns why its stream ended
                async with asyncio.timeout(TIMEOUT):
                    while await stalled.recv_message() is not None:
                        pass
        assert info.value.status is Status.RESOURCE_EXHAUSTED
        assert info.value.message == "subscriber too slow"
    finally:
        stalled_channel.close()
        fast_channel.close()
        await server.close()


async def test_send_reaches_one_subscriber_and_publish_reaches_all(
    listener: socket.socket, settings: Settings
) -> None:
    quiet = settings.model_copy(update={"interval": 3600.0})
    server = SubscriptionManager(quiet)
    await server.start(sock=listener)
    channel = channel_for(quiet)
    try:
        async with subscription(channel, 1) as one, subscription(channel, 2) as two:
            first = server.send(2, "only two")
            server.send(3, "nobody")
            last = server.publish("everyone")
            assert last.seq == first.seq + 2
            assert await receive(one, 1) == ["everyone"]
            assert await receive(two, 2) == ["only two", "everyone"]
    finally:
        channel.close()
        await server.close()


async def test_in_process_subscribe_yields_events(
    listener: socket.socket, settings: Settings
) -> None:
    quiet = settings.model_copy(update={"interval": 3600.0})
    server = SubscriptionManager(quiet)
    await server.start(sock=listener)
    try:
        stream = server.subscribe(Request(id=3))
        async with contextlib.aclosing(stream):
            task = asyncio.ensure_future(anext(stream))
            async with asyncio.timeout(TIMEOUT):
                await server.wait_for(lambda: 3 in server.subscribers)
                server.send(3, "hi")
                assert (await task).data == "hi"
        assert 3 not in server.subscribers
    finally:
        await server.close()


async def test_start_is_all_or_nothing(listener: socket.socket, settings: Settings) -> None:
    """With the metrics port taken, gRPC used to serve anyway and start() could not retry."""
    taken = socket.create_server(("127.0.0.1", 0))
    quiet = settings.model_copy(
        update={"interval": 3600.0, "metrics": MetricsSettings(port=taken.getsockname()[1])}
    )
    server = SubscriptionManager(quiet)
    try:
        with pytest.raises(OSError, match=r"cannot listen on .* \(metrics\): address already in"):
            await server.start(sock=listener)
        assert server.health.__status__() is not True  # health never said SERVING
        taken.close()
        await server.start(sock=listener)  # the same server starts once the port is free
        channel = channel_for(quiet)
        try:
            async with subscription(channel, 1) as stream:
                server.send(1, "up")
                assert await receive(stream, 1) == ["up"]
        finally:
            channel.close()
    finally:
        taken.close()
        await server.close()


class Traced(SubscriptionManager):
    """Records grpclib's server events, as tracing middleware would."""

    seen: list[tuple[str, object]]

    def setup_server(self, server: grpclib.server.Server) -> None:
        self.seen = []

        async def received(event: RecvMessage) -> None:
            self.seen.append(("recv", event.message))

        async def sent(event: SendMessage) -> None:
            self.seen.append(("send", event.message))

        grpclib.events.listen(server, RecvMessage, received)
        grpclib.events.listen(server, SendMessage, sent)


async def test_grpclib_server_events_fire_for_longlived_calls(
    listener: socket.socket, settings: Settings
) -> None:
    quiet = settings.model_copy(update={"interval": 3600.0})
    async with running(quiet, listener, Traced) as server:
        assert isinstance(server, Traced)
        channel = channel_for(quiet)
        try:
            async with subscription(channel, 1) as stream:
                server.send(1, "traced")
                assert await receive(stream, 1) == ["traced"]
        finally:
            channel.close()
    kinds = [(kind, type(message).__name__) for kind, message in server.seen]
    assert kinds == [("recv", "Request"), ("send", "Response")]
    assert server.seen[0][1] == Request(id=1)
    sent = server.seen[1][1]
    assert isinstance(sent, Response)
    assert sent.data == "traced"


async def test_close_keeps_to_the_drain_timeout_with_a_peer_that_stopped_reading(
    listener: socket.socket, settings: Settings
) -> None:
    """close() used to take up to 2 x drain_timeout + 1 s."""
    drain = 2.0
    quiet = settings.model_copy(update={"interval": 3600.0, "drain_timeout": drain})
    server = SubscriptionManager(quiet)
    await server.start(sock=listener)
    peer = await H2Peer.connect(quiet, window=2**31 - 1)  # grants everything, reads nothing
    try:
        peer.open(request_headers(), grpc_body(Request(id=1)))
        await peer.flush()
        async with asyncio.timeout(TIMEOUT):
            await server.wait_for(lambda: 1 in server.subscribers)
        for n in range(400):
            server.send(1, f"{n}:" + "z" * 50_000)  # far more than the sockets hold
        loop = asyncio.get_running_loop()
        began = loop.time()
        await server.close()
        took = loop.time() - began
    finally:
        peer.close()
    assert took < drain + 0.5  # the deadline, plus a margin for a loaded machine (was +1 s)


class SlowToStop(SubscriptionManager):
    """An event source whose clean-up outlasts the drain timeout."""

    async def event_source(self) -> None:
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(30)  # a clean-up that takes far too long, on purpose


async def test_close_does_not_wait_out_a_slow_event_source(
    listener: socket.socket, settings: Settings
) -> None:
    drain = 1.0
    quiet = settings.model_copy(update={"drain_timeout": drain})
    server = SlowToStop(quiet)
    await server.start(sock=listener)
    loop = asyncio.get_running_loop()
    began = loop.time()
    await server.close()
    assert loop.time() - began < drain + 0.5
    assert server._source is not None
    server._source.cancel()  # the test ends it; close() gave up on it
    await asyncio.wait([server._source])


async def test_other_threads_hand_their_events_to_the_servers_loop(
    server: SubscriptionManager, quiet: Settings
) -> None:
    """The documented recipe: the hub is loop-bound, so another thread goes through the loop."""
    loop = asyncio.get_running_loop()

    def worker() -> str:
        loop.call_soon_threadsafe(server.publish, "published from a thread")
        future = asyncio.run_coroutine_threadsafe(server.emit("emitted from a thread"), loop)
        return future.result(timeout=TIMEOUT).position.token

    channel = channel_for(quiet)
    try:
        async with subscription(channel, 1) as stream:
            async with asyncio.timeout(TIMEOUT):
                token = await asyncio.to_thread(worker)  # a real thread, not the loop's
            assert await receive(stream, 2) == ["published from a thread", "emitted from a thread"]
            assert token == server.hub.head.token
    finally:
        channel.close()
