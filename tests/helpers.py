"""Test helpers: raw grpclib subscriptions, so tests see exactly what goes over the wire."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import TypeVar

import betterproto2
from grpclib.client import Channel, Stream
from grpclib.const import Cardinality

from longlived import Request, Response, Settings, SubscriptionManager, WatchCache

Subscription = Stream[Request, Response]

M = TypeVar("M", bound=betterproto2.Message)


def channel_for(settings: Settings) -> Channel:
    """A grpclib channel to the server ``settings`` points at."""
    return Channel(settings.host, settings.port)


@asynccontextmanager
async def subscription(
    channel: Channel, id: int | Request, *, package: str = "longlived"
) -> AsyncIterator[Subscription]:
    """Open ``Subscribe(id)`` (or a full ``Request``) and wait until the server registered it."""
    request = id if isinstance(id, Request) else Request(id=id)
    async with channel.request(
        f"/{package}.Longlived/Subscribe", Cardinality.UNARY_STREAM, Request, Response
    ) as stream:
        await stream.send_message(request, end=True)
        async with asyncio.timeout(5):
            await stream.recv_initial_metadata()
        yield stream
        # On a normal exit grpclib waits for the server to end the stream: if it is still
        # open, leave at once instead; if it has ended, let grpclib raise its final status.
        if stream._stream.closable and not stream._recv_trailing_metadata_done:
            await stream.cancel()


async def receive(stream: Subscription, count: int, *, timeout: float = 5) -> list[str]:
    """The ``data`` of the next ``count`` messages on ``stream``."""
    received: list[str] = []
    async with asyncio.timeout(timeout):
        while len(received) < count:
            message = await stream.recv_message()
            assert message is not None, f"stream ended after {len(received)} messages"
            received.append(message.data)
    return received


@asynccontextmanager
async def running(
    settings: Settings,
    sock: socket.socket,
    manager: type[SubscriptionManager] = SubscriptionManager,
) -> AsyncIterator[SubscriptionManager]:
    """A started server of class ``manager`` on ``sock``, closed on the way out."""
    server = manager(settings)
    await server.start(sock=sock)
    try:
        yield server
    finally:
        await server.close()


def drop_connections(server: SubscriptionManager) -> int:
    """Abort every client connection under the server, as a network failure would."""
    assert server._server is not None
    protocols = list(server._server._protocols)
    for protocol in protocols:
        protocol.connection._transport.abort()
    return len(protocols)


async def cache_until(cache: WatchCache[M], done: Callable[[], bool], *, timeout: float) -> None:
    """Wait until ``done()`` holds, re-checked at each change the cache reports."""
    async with asyncio.timeout(timeout), contextlib.aclosing(cache.changes()) as changes:
        if done():  # checked before the iteration registers, with no await in between
            return
        async for _ in changes:
            if done():
                return


async def converged(
    cache: WatchCache[M], expected: Callable[[], Mapping[str, M]], *, timeout: float
) -> None:
    """Wait until ``cache`` has synced and holds exactly ``expected()``."""
    async with asyncio.timeout(timeout):
        await cache.wait_synced()
    await cache_until(cache, lambda: cache.items() == expected(), timeout=timeout)
