"""ResilientClient against real servers on loopback: retries, restarts, statuses."""

from __future__ import annotations

import asyncio
import random
import re
import socket
from collections.abc import AsyncIterator

import grpclib.const
import grpclib.server
import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from longlived import (
    BackoffSettings,
    Request,
    ResilientClient,
    Response,
    ResumeExpired,
    RetriesExhausted,
    Settings,
    SubscriptionClosed,
    SubscriptionManager,
)

TIMEOUT = 5


class Recorder:
    """A sleep that records the delays asked for and waits only briefly."""

    def __init__(self) -> None:
        self.delays: list[float] = []
        self._changed = asyncio.Event()

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        self._changed.set()
        await asyncio.sleep(0.01)

    async def until(self, count: int) -> None:
        """Wait until at least ``count`` delays have been asked for."""
        while len(self.delays) < count:
            self._changed.clear()
            await self._changed.wait()


async def collect(client: ResilientClient, count: int) -> list[str]:
    received = []
    async with asyncio.timeout(TIMEOUT):
        async for response in client:
            received.append(response.data)
            if len(received) == count:
                break
    return received


def rebind(port: int) -> socket.socket:
    return socket.create_server(("127.0.0.1", port))


async def test_receives_its_own_messages(manager: SubscriptionManager, settings: Settings) -> None:
    async with ResilientClient(4, settings=settings) as client:
        assert await collect(client, 3) == ["data mock for: 4"] * 3
        assert client.connections == 1


async def test_resubscribes_after_server_restart(
    listener: socket.socket, settings: Settings
) -> None:
    port = listener.getsockname()[1]
    first = SubscriptionManager(settings)
    await first.start(sock=listener)
    async with ResilientClient(1, settings=settings) as client:
        async with asyncio.timeout(TIMEOUT):
            assert (await anext(aiter(client))).data == "data mock for: 1"
            before = client.token
            receiving = asyncio.ensure_future(anext(aiter(client)))
            await first.close()
            await client.disconnected.wait()
            second = SubscriptionManager(settings)
            await second.start(sock=rebind(port))
            try:
                # the new server has a new epoch: the old position means nothing to it
                with pytest.raises(ResumeExpired) as info:
                    await receiving
                assert "another epoch" in info.value.reason
                assert client.token == info.value.token != before
                # iterating again carries on from the new position
                assert (await anext(aiter(client))).data == "data mock for: 1"
                assert client.connected.is_set()
            finally:
                await second.close()
        assert client.connections == 3
        assert client.failures >= 1


async def test_client_started_before_server(listener: socket.socket, settings: Settings) -> None:
    port = listener.getsockname()[1]
    listener.close()  # nothing listens: connection refused until the server starts
    recorder = Recorder()
    async with ResilientClient(2, settings=settings, sleep=recorder) as client:
        receiving = asyncio.ensure_future(collect(client, 1))
        async with asyncio.timeout(TIMEOUT):
            await recorder.until(3)
            server = SubscriptionManager(settings)
            await server.start(sock=rebind(port))
            try:
                assert await receiving == ["data mock for: 2"]
            finally:
                await server.close()
        assert client.failures >= 3


async def test_backoff_grows_and_resets_after_a_delivered_message(
    listener: socket.socket, settings: Settings
) -> None:
    port = listener.getsockname()[1]
    listener.close()
    recorder = Recorder()
    backoff = BackoffSettings(initial=1.0, multiplier=2.0, jitter=0.0, max=4.0)
    slow = settings.model_copy(update={"backoff": backoff})
    received = asyncio.Event()

    async def consume(client: ResilientClient) -> None:
        async for _ in client:
            received.set()

    async with ResilientClient(3, settings=slow, sleep=recorder) as client:
        consumer = asyncio.ensure_future(consume(client))
        try:
            async with asyncio.timeout(TIMEOUT):
                await recorder.until(4)
                assert recorder.delays[:4] == [1.0, 2.0, 4.0, 4.0]
                server = SubscriptionManager(slow)
                await server.start(sock=rebind(port))
                await received.wait()
                recorder.delays.clear()
                await server.close()
                await recorder.until(1)
            # a delivered message reset the backoff: the next delay is the initial one
            assert recorder.delays[0] == 1.0
        finally:
            consumer.cancel()
            await asyncio.gather(consumer, return_exceptions=True)


async def test_jitter_comes_from_the_injected_rng(
    listener: socket.socket, settings: Settings
) -> None:
    listener.close()
    runs = []
    for _ in range(2):
        recorder = Recorder()
        async with ResilientClient(3, settings=settings, sleep=recorder, rng=random.Random(5)) as c:
            task = asyncio.ensure_future(collect(c, 1))
            async with asyncio.timeout(TIMEOUT):
                await recorder.until(3)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        runs.append(recorder.delays[:3])
    assert runs[0] == runs[1]
    assert len(set(runs[0])) == 3


async def test_gives_up_after_max_attempts(listener: socket.socket, settings: Settings) -> None:
    listener.close()
    limited = settings.model_copy(
        update={"backoff": settings.backoff.model_copy(update={"max_attempts": 3})}
    )
    async with ResilientClient(1, settings=limited, sleep=Recorder()) as client:
        with pytest.raises(RetriesExhausted) as info:
            await collect(client, 1)
    assert info.value.attempts == 3
    assert isinstance(info.value.last, OSError)


async def test_unsubscribe_ends_the_iteration(
    manager: SubscriptionManager, settings: Settings
) -> None:
    async with ResilientClient(6, settings=settings) as client:
        received = []
        async with asyncio.timeout(TIMEOUT):
            async for response in client:
                received.append(response.data)
                if len(received) == 2:
                    assert await client.unsubscribe() == Response()
        assert received[:2] == ["data mock for: 6"] * 2
        assert client.connections == 1
        assert 6 not in manager.subscribers


async def test_unsubscribe_unknown_id_raises_not_found(
    manager: SubscriptionManager, settings: Settings
) -> None:
    async with ResilientClient(99, settings=settings) as client:
        with pytest.raises(SubscriptionClosed) as info:
            await client.unsubscribe()
    assert info.value.status == "NOT_FOUND"
    assert info.value.detail == "no subscriber with id 99"


class Refusing:
    """A service that refuses every Subscribe with PERMISSION_DENIED."""

    async def subscribe(self, stream: grpclib.server.Stream[Request, Response]) -> None:
        await stream.recv_message()
        raise GRPCError(Status.PERMISSION_DENIED, "not you")

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        return {
            "/longlived.Longlived/Subscribe": grpclib.const.Handler(
                self.subscribe, grpclib.const.Cardinality.UNARY_STREAM, Request, Response
            )
        }


@pytest.fixture
async def refusing(listener: socket.socket) -> AsyncIterator[None]:
    server = grpclib.server.Server([Refusing()])
    await server.start(sock=listener)
    try:
        yield
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.usefixtures("refusing")
async def test_non_retryable_status_surfaces(settings: Settings) -> None:
    recorder = Recorder()
    async with ResilientClient(1, settings=settings, sleep=recorder) as client:
        with pytest.raises(SubscriptionClosed) as info:
            await collect(client, 1)
    assert (info.value.status, info.value.detail) == ("PERMISSION_DENIED", "not you")
    assert recorder.delays == []  # no retry


async def test_protos_package_paths(manager: SubscriptionManager, settings: Settings) -> None:
    original = settings.model_copy(update={"package": "protos"})
    async with ResilientClient(8, settings=original) as client:
        assert client.package == "protos"
        assert await collect(client, 2) == ["data mock for: 8"] * 2


async def test_aclose_while_retrying_returns_promptly(
    listener: socket.socket, settings: Settings
) -> None:
    listener.close()
    recorder = Recorder()
    client = ResilientClient(1, settings=settings, sleep=recorder)
    task = asyncio.ensure_future(collect(client, 1))
    async with asyncio.timeout(TIMEOUT):
        await recorder.until(1)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.aclose()
    assert client.disconnected.is_set()
    with pytest.raises(RuntimeError, match="closed"):
        aiter(client)


@pytest.mark.parametrize("id", [-1, 2**31, 2**32 + 5])
def test_id_outside_int32_is_refused(id: int) -> None:
    # the wire carries an int32: 2**32 + 5 would silently subscribe as 5
    with pytest.raises(ValueError, match=f"{re.escape(str(id))}.*0 to 2147483647"):
        ResilientClient(id)


async def test_unsubscribe_after_aclose_opens_nothing(
    settings: Settings, listener: socket.socket
) -> None:
    listener.close()  # nothing is ever contacted
    client = ResilientClient(1, settings=settings)
    await client.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        await client.unsubscribe()
    assert client._channel is None
