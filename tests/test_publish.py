"""The Publish RPC over the wire, with a raw grpclib caller: what a producer elsewhere sees."""

from __future__ import annotations

import asyncio
import socket

import pytest
from grpclib.client import Channel
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError

from longlived import (
    AuthSettings,
    LimitSettings,
    Position,
    Request,
    Response,
    Settings,
    SubscriptionManager,
)
from longlived._dedup import Deduplicator
from longlived._proto.google.protobuf import Any
from longlived._proto.longlived import PublishReply, PublishRequest
from longlived._status import CallError
from longlived._wire import check_publish, decode_request
from tests.helpers import channel_for, receive, running, subscription

TIMEOUT = 10


async def publish(
    channel: Channel,
    request: PublishRequest,
    *,
    token: str | None = None,
    package: str = "longlived",
) -> PublishReply:
    """One Publish call; its reply, or the GRPCError that refused it."""
    metadata = {"authorization": f"Bearer {token}"} if token else None
    async with (
        asyncio.timeout(TIMEOUT),
        channel.request(
            f"/{package}.Longlived/Publish", Cardinality.UNARY_UNARY, PublishRequest,
            PublishReply, metadata=metadata,
        ) as stream,
    ):  # fmt: skip
        await stream.send_message(request, end=True)
        reply = await stream.recv_message()
    assert reply is not None
    return reply


async def next_response(stream: object) -> Response:
    async with asyncio.timeout(TIMEOUT):
        message = await stream.recv_message()  # type: ignore[attr-defined]  # a grpclib stream
    assert isinstance(message, Response)
    return message


async def test_a_published_event_reaches_its_topic_and_answers_its_position(
    server: SubscriptionManager, quiet: Settings
) -> None:
    channel = channel_for(quiet)
    try:
        async with (
            subscription(channel, Request(id=1, topics=["orders"])) as orders,
            subscription(channel, Request(id=2, topics=["other"])) as other,
        ):
            reply = await publish(channel, PublishRequest(data="paid", topic="orders"))
            server.publish("for other", topic="other")
            message = await next_response(orders)
            assert (message.data, message.topic) == ("paid", "orders")
            assert (reply.seq, reply.token, reply.duplicate) == (message.seq, message.token, False)
            assert await receive(other, 1) == ["for other"]  # it never saw "paid"
    finally:
        channel.close()


async def test_a_published_event_to_one_id_reaches_that_id_only(
    server: SubscriptionManager, quiet: Settings
) -> None:
    channel = channel_for(quiet)
    try:
        async with subscription(channel, 1) as one, subscription(channel, 2) as two:
            await publish(channel, PublishRequest(data="only two", to=2))
            server.publish("everyone")
            assert await receive(two, 2) == ["only two", "everyone"]
            assert await receive(one, 1) == ["everyone"]
    finally:
        channel.close()


async def test_a_retried_publish_with_the_same_key_is_emitted_once(
    server: SubscriptionManager, quiet: Settings
) -> None:
    channel = channel_for(quiet)
    try:
        async with subscription(channel, 1) as stream:
            request = PublishRequest(data="once", idempotency_key="order-42")
            first = await publish(channel, request)
            again = await publish(channel, request)
            assert (again.token, again.duplicate) == (first.token, True)
            server.publish("next")
            assert await receive(stream, 2) == ["once", "next"]
    finally:
        channel.close()


async def test_a_typed_payload_travels_as_it_was_published(
    server: SubscriptionManager, quiet: Settings
) -> None:
    payload = Any(type_url="type.googleapis.com/shop.Order", value=b"\x08\x2a")
    channel = channel_for(quiet)
    try:
        async with subscription(channel, 1) as stream:
            await publish(channel, PublishRequest(payload=payload))
            message = await next_response(stream)
            assert message.payload == payload
            assert message.data == ""
    finally:
        channel.close()


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (
            PublishRequest(data="x", topic="t", to=1),
            "an event goes to a topic or to one id (to), not both",
        ),
        (PublishRequest(data="x", to=-1), "to must be >= 0, got -1"),
        (PublishRequest(data="x", topic="t" * 300), "must be 1-256 characters long"),
        (
            PublishRequest(data="x", idempotency_key="k" * 300),
            "idempotency_key is 300 characters (at most 256)",
        ),
        (PublishRequest(payload=Any(value=b"x")), "payload.type_url must be 1-2048 characters"),
    ],
    ids=["topic-and-to", "negative-to", "long-topic", "long-key", "untyped-payload"],
)
async def test_bad_publishes_are_invalid_argument_and_emit_nothing(
    server: SubscriptionManager, quiet: Settings, request_: PublishRequest, message: str
) -> None:
    channel = channel_for(quiet)
    try:
        with pytest.raises(GRPCError) as info:
            await publish(channel, request_)
        assert info.value.status is Status.INVALID_ARGUMENT
        assert info.value.message is not None
        assert message in info.value.message
        assert server.hub.head.seq == 0
    finally:
        channel.close()


async def test_an_event_over_the_size_limit_is_refused_for_good(
    listener: socket.socket, quiet: Settings
) -> None:
    small = quiet.model_copy(update={"limits": LimitSettings(max_event_size=1024)})
    async with running(small, listener) as server:
        channel = channel_for(small)
        try:
            with pytest.raises(GRPCError) as info:
                await publish(channel, PublishRequest(data="x" * 2000))
            assert info.value.status is Status.RESOURCE_EXHAUSTED
            assert server.hub.head.seq == 0
        finally:
            channel.close()


@pytest.fixture
def guarded(quiet: Settings) -> Settings:
    return quiet.model_copy(
        update={
            "auth": AuthSettings(
                tokens={"tok-p": "producer", "tok-s": "subscriber"}, publishers=["producer"]
            )
        }
    )


async def test_with_auth_only_listed_publishers_may_publish(
    listener: socket.socket, guarded: Settings
) -> None:
    async with running(guarded, listener) as server:
        channel = channel_for(guarded)
        try:
            with pytest.raises(GRPCError) as info:
                await publish(channel, PublishRequest(data="x"))
            assert info.value.status is Status.UNAUTHENTICATED
            with pytest.raises(GRPCError) as info:
                await publish(channel, PublishRequest(data="x"), token="tok-s")
            assert (info.value.status, info.value.message) == (
                Status.PERMISSION_DENIED,
                "subscriber may not publish",
            )
            assert server.hub.head.seq == 0
            reply = await publish(channel, PublishRequest(data="x"), token="tok-p")
            assert Position.parse(reply.token) == server.hub.head
        finally:
            channel.close()
        assert server.rejected == {"UNAUTHENTICATED": 1, "PERMISSION_DENIED": 1}


async def test_the_original_package_has_no_publish(
    server: SubscriptionManager, quiet: Settings
) -> None:
    channel = channel_for(quiet)
    try:
        with pytest.raises(GRPCError) as info:
            await publish(channel, PublishRequest(data="x"), package="protos")
        assert info.value.status is Status.UNIMPLEMENTED
    finally:
        channel.close()


async def test_serve_without_a_source_sends_only_what_is_published(
    listener: socket.socket, settings: Settings
) -> None:
    """``source=none``: the mock generator (every 50 ms here) stays off."""
    silent = settings.model_copy(update={"source": "none"})
    async with running(silent, listener):
        channel = channel_for(silent)
        try:
            async with subscription(channel, 1) as stream:
                await publish(channel, PublishRequest(data="only this", to=1))
                await publish(channel, PublishRequest(data="and this", to=1))
                assert await receive(stream, 2) == ["only this", "and this"]
        finally:
            channel.close()


async def test_emit_deduplicates_like_the_rpc() -> None:
    server = SubscriptionManager(Settings(interval=3600.0))
    first = await server.emit("a", idempotency_key="k")
    again = await server.emit("b", idempotency_key="k")
    assert (again.position, again.duplicate, first.duplicate) == (first.position, True, False)
    assert server.hub.head == first.position


def test_keys_expire_after_the_window_and_the_oldest_go_first() -> None:
    now = [0.0]
    dedup = Deduplicator(window=120.0, max_keys=2, clock=lambda: now[0])
    dedup.remember("a", Position("e", 1))
    now[0] = 60.0
    dedup.remember("b", Position("e", 2))
    assert dedup.get("a") == Position("e", 1)
    now[0] = 121.0
    assert dedup.get("a") is None  # its window has passed
    assert dedup.get("b") == Position("e", 2)
    dedup.remember("c", Position("e", 3))
    dedup.remember("d", Position("e", 4))  # over max_keys: "b" goes
    assert (dedup.get("b"), len(dedup)) == (None, 2)


def test_a_payload_of_the_wrong_wire_type_is_refused_by_name() -> None:
    """Field 5 sent as a varint decoded to an int, and checking it crashed the call
    (found by the property tests)."""
    with pytest.raises(CallError, match="malformed PublishRequest message: payload"):
        check_publish(decode_request(b"(\x00", PublishRequest, max_size=100))
