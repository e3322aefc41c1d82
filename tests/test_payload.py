"""Typed payloads: the app's own messages as events, typed end to end.

``Request`` stands in for an app's message here: any generated betterproto2 message works
the same way.
"""

from __future__ import annotations

import asyncio

import pytest

from longlived import (
    PayloadTypeError,
    Publisher,
    Request,
    ResilientClient,
    Settings,
    SubscriptionManager,
    pack,
    unpack,
)
from longlived._proto.longlived import PublishReply

TIMEOUT = 10


def test_pack_names_the_type_and_unpack_checks_it() -> None:
    packed = pack(Request(id=5, topics=["a"]))
    assert packed.type_url == "type.googleapis.com/longlived.Request"
    assert unpack(packed, Request) == Request(id=5, topics=["a"])
    with pytest.raises(
        PayloadTypeError, match=r"is a longlived\.Request, not a longlived\.PublishReply"
    ):
        unpack(packed, PublishReply)
    with pytest.raises(PayloadTypeError, match="carries no payload"):
        unpack(None, Request)


async def test_an_emitted_message_reaches_the_client_as_its_own_type(
    server: SubscriptionManager, quiet: Settings
) -> None:
    async with ResilientClient(1, settings=quiet) as client:
        events = client.events(Request)
        first = asyncio.ensure_future(anext(events))
        async with asyncio.timeout(TIMEOUT):
            await client.connected.wait()
            published = await server.emit(payload=Request(id=41), topic="orders")
            event = await first
        assert event.payload.id + 1 == 42  # an int: mypy knows the payload is a Request
        assert (event.token, event.topic) == (published.position.token, "orders")


async def test_a_published_message_is_packed_and_arrives_typed(
    server: SubscriptionManager, quiet: Settings
) -> None:
    async with ResilientClient(2, settings=quiet) as client, Publisher(settings=quiet) as pub:
        events = client.events(Request)
        first = asyncio.ensure_future(anext(events))
        async with asyncio.timeout(TIMEOUT):
            await client.connected.wait()
            await pub.publish(payload=Request(id=7), to=2)
            assert (await first).payload == Request(id=7)


async def test_an_event_of_another_type_is_named_not_decoded_wrongly(
    server: SubscriptionManager, quiet: Settings
) -> None:
    async with ResilientClient(3, settings=quiet) as client:
        events = client.events(PublishReply)
        first = asyncio.ensure_future(anext(events))
        async with asyncio.timeout(TIMEOUT):
            await client.connected.wait()
            await server.emit(payload=Request(id=1), to=3)
            with pytest.raises(PayloadTypeError, match=r"is a longlived\.Request"):
                await first
