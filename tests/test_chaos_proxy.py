"""ResilientClient behind a TCP proxy that cuts its connections mid-frame, again and again.

Each round publishes a few numbered events and has the proxy cut the connection in the
middle of the server's next write (the client holds a partial HTTP/2 frame when its socket
dies); the client resubscribes with its token and the server replays what it missed. The
app must see every event exactly once, in order, and no exception.
"""

from __future__ import annotations

import asyncio

import pytest

from longlived import ResilientClient, Settings, SubscriptionManager
from tests.proxy import proxy_to

CUTS = 40
EVERY = 10
"""Events published before each cut."""
TOTAL = CUTS * EVERY
TIMEOUT = 60
"""Bound on the whole run: about 4 s on an idle machine."""


@pytest.mark.timeout(120)
async def test_every_event_arrives_once_in_order_through_repeated_mid_frame_cuts(
    server: SubscriptionManager, quiet: Settings
) -> None:
    async with proxy_to((quiet.host, quiet.port)) as (proxy, port):
        through = quiet.model_copy(update={"address": f"127.0.0.1:{port}"})
        client = ResilientClient(1, settings=through)
        received: list[str] = []

        async def consume() -> None:
            async for response in client:
                received.append(response.data)
                if len(received) == TOTAL:
                    return

        published = 0
        try:
            async with asyncio.timeout(TIMEOUT), asyncio.TaskGroup() as tasks:
                consumer = tasks.create_task(consume())  # an exception here fails the test
                for _ in range(CUTS):
                    await client.connected.wait()
                    for _ in range(EVERY):
                        server.publish(str(published))
                        published += 1
                    await proxy.cut()  # the server's next write: these events, or a replay
                    await client.disconnected.wait()
                await consumer
        finally:
            await client.aclose()
        assert proxy.cuts >= CUTS
        assert client.connections > CUTS
        assert received == [str(n) for n in range(TOTAL)]
