"""Publisher against real servers on loopback: delivery, retries without duplicates, refusals."""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpclib.const
import grpclib.server
import pytest
from grpclib.const import Cardinality, Status

from longlived import (
    AuthSettings,
    BackoffSettings,
    LimitSettings,
    Publisher,
    PublishRefused,
    PublishSettings,
    Request,
    ResilientClient,
    Response,
    ResponseKind,
    RetriesExhausted,
    Settings,
    SubscriptionManager,
)
from longlived._proto.google.protobuf import Any as ProtoAny
from longlived._proto.longlived import PublishReply, PublishRequest
from longlived._wire import NO_RETRY_HEADER
from longlived.publisher import PUBLISH_PATH
from tests.helpers import Subscription, channel_for, receive, running, subscription
from tests.proxy import proxy_to

TIMEOUT = 10


class Sleeps:
    """A sleep that records the delays asked for, waits only briefly, and can be held."""

    def __init__(self) -> None:
        self.delays: list[float] = []
        self._changed = asyncio.Event()
        self._open = asyncio.Event()
        self._open.set()

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        self._changed.set()
        await asyncio.sleep(0.01)
        await self._open.wait()

    def hold(self) -> None:
        """Keep every sleep from ending until ``release()``."""
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    async def until(self, count: int) -> None:
        """Wait until at least ``count`` delays have been asked for."""
        while len(self.delays) < count:
            self._changed.clear()
            await self._changed.wait()


class Clock:
    """A monotonic clock that moves only when its sleep is called."""

    def __init__(self) -> None:
        self.now = 0.0
        self.delays: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.delays.append(delay)
        self.now += delay
        await asyncio.sleep(0)


async def messages(stream: Subscription, count: int) -> list[Response]:
    """The next ``count`` DATA messages on ``stream`` (a resumed stream starts with a
    HEARTBEAT naming its position)."""
    received: list[Response] = []
    async with asyncio.timeout(TIMEOUT):
        while len(received) < count:
            message = await stream.recv_message()
            assert message is not None, f"stream ended after {len(received)} messages"
            if message.kind == ResponseKind.DATA:
                received.append(message)
    return received


def rebind(port: int) -> socket.socket:
    return socket.create_server(("127.0.0.1", port))


# ------------------------------------------------------------------- delivery


async def test_publish_on_a_topic_reaches_its_subscribers(
    server: SubscriptionManager, quiet: Settings
) -> None:
    channel = channel_for(quiet)
    try:
        async with (
            subscription(channel, Request(id=1, topics=["orders"])) as orders,
            subscription(channel, Request(id=2, topics=["other"])) as other,
            subscription(channel, 3) as everything,
            Publisher(settings=quiet) as publisher,
        ):
            published = await publisher.publish("order 42 paid", topic="orders")
            for stream in (orders, everything):
                [message] = await messages(stream, 1)
                assert (message.data, message.topic) == ("order 42 paid", "orders")
                assert message.token == published.position.token
            await publisher.publish("for the others", topic="other")
            # the next message on "other" is its own: the orders event never reached it
            assert await receive(other, 1) == ["for the others"]
        assert not published.duplicate
        assert publisher.published == 2
    finally:
        channel.close()


async def test_publish_to_one_id_reaches_only_it(
    server: SubscriptionManager, quiet: Settings
) -> None:
    channel = channel_for(quiet)
    try:
        async with (
            subscription(channel, 7) as seven,
            subscription(channel, 8) as eight,
            Publisher(settings=quiet) as publisher,
        ):
            published = await publisher.publish("just for 7", to=7)
            [message] = await messages(seven, 1)
            assert (message.data, message.token) == ("just for 7", published.position.token)
            await publisher.publish("just for 8", to=8)
            assert await receive(eight, 1) == ["just for 8"]
    finally:
        channel.close()


async def test_a_payload_reaches_subscribers_as_it_was_sent(
    server: SubscriptionManager, quiet: Settings
) -> None:
    payload = ProtoAny(type_url="type.googleapis.com/longlived.Request", value=bytes(Request(id=9)))
    channel = channel_for(quiet)
    try:
        async with subscription(channel, 5) as stream, Publisher(settings=quiet) as publisher:
            await publisher.publish(payload=payload, to=5)
            [message] = await messages(stream, 1)
        assert message.payload is not None
        assert bytes(message.payload) == bytes(payload)
        assert Request.FromString(message.payload.value).id == 9
    finally:
        channel.close()


async def test_publishes_from_many_tasks_share_one_publisher(
    server: SubscriptionManager, quiet: Settings
) -> None:
    channel = channel_for(quiet)
    try:
        async with subscription(channel, 1) as stream, Publisher(settings=quiet) as publisher:
            async with asyncio.timeout(TIMEOUT):
                sent = await asyncio.gather(*(publisher.publish(str(n)) for n in range(20)))
            received = await receive(stream, 20)
        assert sorted(received, key=int) == [str(n) for n in range(20)]
        assert len({p.position for p in sent}) == 20
    finally:
        channel.close()


# -------------------------------------------------------- retries, never twice


async def test_a_lost_answer_is_retried_with_the_same_key_and_emitted_once(
    server: SubscriptionManager, quiet: Settings
) -> None:
    sleeps = Sleeps()
    channel = channel_for(quiet)
    try:
        async with proxy_to((quiet.host, quiet.port)) as (proxy, port):
            via_proxy = quiet.model_copy(update={"address": f"127.0.0.1:{port}"})
            async with (
                subscription(channel, 1) as stream,
                Publisher(settings=via_proxy, sleep=sleeps) as publisher,
            ):
                await publisher.publish("warm-up")  # the connection through the proxy is open
                assert await receive(stream, 1) == ["warm-up"]
                proxy.mute()
                publishing = asyncio.ensure_future(publisher.publish("exactly once"))
                [message] = await messages(stream, 1)  # emitted; its answer is lost
                assert message.data == "exactly once"
                proxy.abort_all()
                async with asyncio.timeout(TIMEOUT):
                    published = await publishing
                await publisher.publish("next")
                # the retry emitted nothing: the next message is the next event
                assert await receive(stream, 1) == ["next"]
            assert proxy.accepted == 2
    finally:
        channel.close()
    assert published.duplicate  # the answer to the retry: the first attempt's position
    assert published.position.token == message.token
    assert publisher.retries == 1
    assert len(sleeps.delays) == 1


async def test_publishes_through_a_server_restart(listener: socket.socket, quiet: Settings) -> None:
    port = listener.getsockname()[1]
    sleeps = Sleeps()
    async with Publisher(settings=quiet, sleep=sleeps) as publisher:
        async with running(quiet, listener):
            await publisher.publish("before")
        # the server is gone and nothing listens on its port: the next publish backs off
        sleeps.hold()
        publishing = asyncio.ensure_future(publisher.publish("after", to=5))
        async with asyncio.timeout(TIMEOUT):
            await sleeps.until(1)
        async with running(quiet, rebind(port)):
            channel = channel_for(quiet)
            try:
                async with subscription(channel, 5) as stream:
                    sleeps.release()
                    async with asyncio.timeout(TIMEOUT):
                        published = await publishing
                    [message] = await messages(stream, 1)
            finally:
                channel.close()
    assert (message.data, message.token) == ("after", published.position.token)
    assert not published.duplicate
    assert publisher.retries == 1


async def test_an_attempt_outlasting_the_timeout_is_retried_and_the_event_arrives_once(
    listener: socket.socket, quiet: Settings
) -> None:
    # the socket listens (the kernel completes connections) but nothing serves it yet:
    # the first attempt waits for an answer that does not come
    # long enough for the retry, on a server that does answer, to end in time on a busy machine
    brief = quiet.model_copy(update={"publish": PublishSettings(timeout=1.0)})
    server = SubscriptionManager(brief)
    start = server.hub.head.token  # before any event
    sleeps = Sleeps()
    sleeps.hold()
    async with Publisher(settings=brief, sleep=sleeps) as publisher:
        publishing = asyncio.ensure_future(publisher.publish("late", to=4))
        async with asyncio.timeout(TIMEOUT):
            await sleeps.until(1)
        await server.start(sock=listener)
        channel = channel_for(brief)
        try:
            # the timed-out attempt may still be served once the server runs: resuming from
            # before any event sees the event whichever attempt emitted it
            async with subscription(channel, Request(id=4, resume_token=start)) as stream:
                sleeps.release()
                async with asyncio.timeout(TIMEOUT):
                    published = await publishing
                [message] = await messages(stream, 1)
                server.send(4, "next")
                [after] = await messages(stream, 1)
                assert after.data == "next"  # "late" came once
        finally:
            channel.close()
            await server.close()
    assert (message.data, message.token) == ("late", published.position.token)
    assert publisher.retries == 1


class Scripted:
    """A Publish service answering each call with the next status of its script, then OK."""

    def __init__(self, *script: Status, final: bool = False) -> None:
        self.script = list(script)
        self.final = final
        """Mark the refusals with the no-retry trailer."""
        self.keys: list[str] = []

    async def publish(self, stream: grpclib.server.Stream[PublishRequest, PublishReply]) -> None:
        request = await stream.recv_message()
        assert request is not None
        self.keys.append(request.idempotency_key)
        if self.script:
            status = self.script.pop(0)
            await stream.send_trailing_metadata(
                status=status,
                status_message=f"scripted {status.name}",
                metadata={NO_RETRY_HEADER: "never"} if self.final else None,
            )
            return
        await stream.send_message(PublishReply(seq=1, token="e:1"))

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        return {
            PUBLISH_PATH: grpclib.const.Handler(
                self.publish, Cardinality.UNARY_UNARY, PublishRequest, PublishReply
            )
        }


async def start_script(listener: socket.socket, service: Scripted) -> grpclib.server.Server:
    server = grpclib.server.Server([service])
    await server.start(sock=listener)
    return server


async def stop(server: grpclib.server.Server) -> None:
    server.close()
    await server.wait_closed()


@pytest.mark.parametrize("status", [Status.UNAVAILABLE, Status.RESOURCE_EXHAUSTED])
async def test_passing_statuses_are_retried_with_the_same_key(
    listener: socket.socket, settings: Settings, status: Status
) -> None:
    script = Scripted(status, status)
    server = await start_script(listener, script)
    sleeps = Sleeps()
    try:
        async with proxy_to((settings.host, settings.port)) as (proxy, port):
            via_proxy = settings.model_copy(update={"address": f"127.0.0.1:{port}"})
            async with Publisher(settings=via_proxy, sleep=sleeps) as publisher:
                async with asyncio.timeout(TIMEOUT):
                    published = await publisher.publish("hello")
            assert proxy.accepted == 1  # a status is no reason to drop the connection
    finally:
        await stop(server)
    assert published.position.token == "e:1"
    assert len(script.keys) == 3
    assert len(set(script.keys)) == 1  # every retry carried the first attempt's key
    assert script.keys[0]
    assert publisher.retries == 2
    assert len(sleeps.delays) == 2


REFUSALS = [
    Status.PERMISSION_DENIED,
    Status.UNAUTHENTICATED,
    Status.INVALID_ARGUMENT,
    Status.UNIMPLEMENTED,
    Status.FAILED_PRECONDITION,
    Status.INTERNAL,
]


@pytest.mark.parametrize("status", REFUSALS, ids=[s.name for s in REFUSALS])
async def test_other_statuses_are_refusals_and_not_retried(
    listener: socket.socket, settings: Settings, status: Status
) -> None:
    script = Scripted(status)
    server = await start_script(listener, script)
    sleeps = Sleeps()
    try:
        async with Publisher(settings=settings, sleep=sleeps) as publisher:
            with pytest.raises(PublishRefused) as info:
                async with asyncio.timeout(TIMEOUT):
                    await publisher.publish("hello")
    finally:
        await stop(server)
    assert (info.value.status, info.value.detail) == (status.name, f"scripted {status.name}")
    assert len(script.keys) == 1
    assert publisher.retries == 0
    assert sleeps.delays == []


async def test_resource_exhausted_marked_final_is_not_retried(
    listener: socket.socket, settings: Settings
) -> None:
    script = Scripted(Status.RESOURCE_EXHAUSTED, final=True)
    server = await start_script(listener, script)
    try:
        async with Publisher(settings=settings, sleep=Sleeps()) as publisher:
            with pytest.raises(PublishRefused) as info:
                async with asyncio.timeout(TIMEOUT):
                    await publisher.publish("hello")
    finally:
        await stop(server)
    assert info.value.status == "RESOURCE_EXHAUSTED"
    assert len(script.keys) == 1


async def test_a_server_without_publish_refuses_with_unimplemented(
    listener: socket.socket, settings: Settings
) -> None:
    """The original example's server (grpc-go) has no Publish: a grpcio server of its proto."""
    listener.close()  # grpcio binds its own port

    async def subscribe(request: bytes, context: Any) -> AsyncIterator[bytes]:
        yield b""

    original = grpc.aio.server()
    original.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "protos.Longlived", {"Subscribe": grpc.unary_stream_rpc_method_handler(subscribe)}
            )
        ]
    )
    port = original.add_insecure_port("127.0.0.1:0")
    await original.start()
    sleeps = Sleeps()
    at_original = settings.model_copy(update={"address": f"127.0.0.1:{port}"})
    try:
        async with Publisher(settings=at_original, sleep=sleeps) as publisher:
            with pytest.raises(PublishRefused) as info:
                async with asyncio.timeout(TIMEOUT):
                    await publisher.publish("hello")
    finally:
        await original.stop(None)
    assert info.value.status == "UNIMPLEMENTED"
    assert sleeps.delays == []


@pytest.mark.parametrize(
    ("update", "publish", "status", "detail"),
    [
        pytest.param(
            {},
            {"topic": "orders", "to": 3},
            "INVALID_ARGUMENT",
            r"an event goes to a topic or to one id \(to\), not both",
            id="topic-and-to",
        ),
        pytest.param(
            {"limits": LimitSettings(max_event_size=64)},
            {"data": "x" * 100},
            "RESOURCE_EXHAUSTED",
            r"request of \d+ bytes exceeds the limit of 64",
            id="over-max-event-size",
        ),
        pytest.param(
            # larger than the server's stream window: refused while still being sent
            {},
            {"data": "x" * (3 << 20)},
            "RESOURCE_EXHAUSTED",
            r"request of \d+ bytes exceeds the limit of 1048576",
            id="over-the-stream-window",
        ),
        pytest.param(
            {"auth": AuthSettings(tokens={"s3cret": "alice"}, publishers=["alice"])},
            {},
            "UNAUTHENTICATED",
            "missing or invalid bearer token",
            id="no-token",
        ),
    ],
)
async def test_the_servers_refusals_are_raised_after_one_attempt(
    listener: socket.socket,
    quiet: Settings,
    update: dict[str, object],
    publish: dict[str, Any],
    status: str,
    detail: str,
) -> None:
    strict = quiet.model_copy(update=update)
    sleeps = Sleeps()
    async with running(strict, listener) as server:
        async with Publisher(settings=quiet, sleep=sleeps) as publisher:
            with pytest.raises(PublishRefused) as info:
                async with asyncio.timeout(TIMEOUT):
                    await publisher.publish(**publish)
        assert server.rejected == {status: 1}  # one attempt reached the server
    assert info.value.status == status
    assert info.value.detail is not None
    assert re.fullmatch(detail, info.value.detail)
    assert publisher.retries == 0
    assert sleeps.delays == []


async def test_only_listed_publishers_may_publish(listener: socket.socket, quiet: Settings) -> None:
    tokens = {"alice-token": "alice", "bob-token": "bob"}
    secured = quiet.model_copy(update={"auth": AuthSettings(tokens=tokens, publishers=["alice"])})
    alice = quiet.model_copy(update={"auth": AuthSettings(token="alice-token")})
    bob = quiet.model_copy(update={"auth": AuthSettings(token="bob-token")})
    async with running(secured, listener) as server, ResilientClient(3, settings=bob) as client:
        receiving = asyncio.ensure_future(anext(aiter(client)))
        async with asyncio.timeout(TIMEOUT):
            await client.connected.wait()
            async with Publisher(settings=alice) as publisher:
                published = await publisher.publish("from alice", to=3)
            response = await receiving
        assert (response.data, response.token) == ("from alice", published.position.token)
        async with Publisher(settings=bob, sleep=Sleeps()) as publisher:
            with pytest.raises(PublishRefused) as info:
                async with asyncio.timeout(TIMEOUT):
                    await publisher.publish("from bob", to=3)
        assert server.rejected == {"PERMISSION_DENIED": 1}
    assert (info.value.status, info.value.detail) == ("PERMISSION_DENIED", "bob may not publish")


# -------------------------------------------------------------- giving up


async def test_gives_up_after_max_attempts(listener: socket.socket, settings: Settings) -> None:
    listener.close()
    limited = settings.model_copy(update={"backoff": BackoffSettings(max_attempts=3)})
    async with Publisher(settings=limited, sleep=Sleeps()) as publisher:
        with pytest.raises(RetriesExhausted) as info:
            async with asyncio.timeout(TIMEOUT):
                await publisher.publish("hello")
    assert info.value.attempts == 3
    assert isinstance(info.value.last, OSError)
    assert publisher.retries == 2


async def test_retrying_stops_before_the_server_may_forget_the_key(
    listener: socket.socket, settings: Settings
) -> None:
    """With no attempt limit, no attempt may end past the dedup window: it could emit twice."""
    listener.close()
    clock = Clock()
    bounded = settings.model_copy(
        update={
            "backoff": BackoffSettings(initial=1.0, multiplier=2.0, jitter=0.0, max=100.0),
            "publish": PublishSettings(dedup_window=5.0, timeout=1.0),
        }
    )
    async with Publisher(settings=bounded, sleep=clock.sleep, clock=clock) as publisher:
        with pytest.raises(RetriesExhausted) as info:
            async with asyncio.timeout(TIMEOUT):
                await publisher.publish("hello")
    # attempts start at 0, 1 and 3 s; a fourth would start at 7 s, past the 5 s window
    assert clock.delays == [1.0, 2.0]
    assert info.value.attempts == 3


async def test_aclose_ends_a_publish_that_is_retrying(
    listener: socket.socket, settings: Settings
) -> None:
    listener.close()
    sleeps = Sleeps()
    sleeps.hold()
    publisher = Publisher(settings=settings, sleep=sleeps)
    publishing = asyncio.ensure_future(publisher.publish("hello"))
    async with asyncio.timeout(TIMEOUT):
        await sleeps.until(1)
        await publisher.aclose()
        with pytest.raises(RuntimeError, match="closed"):
            await publishing
    with pytest.raises(RuntimeError, match="closed"):
        await publisher.publish("again")


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"to": -1}, ValueError, "out of range"),
        ({"to": 2**32 + 5}, ValueError, "out of range"),
        ({"idempotency_key": ""}, ValueError, "must not be empty"),
        ({"payload": "not a message"}, TypeError, "is not a generated protobuf message"),
    ],
)
async def test_bad_arguments_are_refused_before_anything_is_sent(
    listener: socket.socket,
    settings: Settings,
    arguments: dict[str, Any],
    error: type[Exception],
    message: str,
) -> None:
    listener.close()  # nothing to connect to: no attempt is made at all
    sleeps = Sleeps()
    async with Publisher(settings=settings, sleep=sleeps) as publisher:
        with pytest.raises(error, match=message):
            await publisher.publish("hello", **arguments)
    assert sleeps.delays == []
