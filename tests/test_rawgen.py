"""The benchmarks' raw HTTP/2 load generator reads what a gRPC client would, or says why not.

Its figures are published, so the reader itself is held to the server: every message
counted once and in order (also when one spans DATA frames), the windows given back so
no server is throttled, a failed stream reported with its status.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
import time
from collections.abc import AsyncIterator, Iterator
from multiprocessing import Pipe
from typing import Any, cast

import h2.config
import h2.connection
import h2.errors
import h2.events
import pytest

from benchmarks import _rawgen
from benchmarks._common import Stubs, generate_stubs, load_stubs, receive, stamped
from benchmarks._rawgen import RawSubscribers
from longlived import Settings, SubscriptionManager

TIMEOUT = 10.0


@pytest.fixture(scope="module")
def stubs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stubs]:
    out = tmp_path_factory.mktemp("bench_stubs")
    generate_stubs(out)
    stubs = load_stubs(out)
    yield stubs
    for name in ("longlived_pb2", "longlived_pb2_grpc"):
        sys.modules.pop(name, None)


def port_of(manager: SubscriptionManager) -> int:
    return int(manager.address.rsplit(":", 1)[1])


async def read(subscribers: RawSubscribers, mode: str, events: int, publish: Any) -> dict[str, Any]:
    """``subscribers.read`` while ``publish()`` runs once the reader says it reads."""
    ours, theirs = Pipe()
    reading = asyncio.ensure_future(subscribers.read(ours, mode, events, timeout=TIMEOUT))
    async with asyncio.timeout(TIMEOUT):
        assert await receive(theirs, timeout=TIMEOUT) == ("reading",)
        await publish()
        result: dict[str, Any] = await reading
    return result


async def test_every_message_is_counted_once_in_order_also_across_frames(
    server: SubscriptionManager, stubs: Stubs
) -> None:
    """Six streams, three per connection; every other event is 40,000 characters, so it
    spans three DATA frames of 16 KiB. The last message each stream counted must be the
    last event, and the count exact."""
    subscribers = RawSubscribers(stubs)
    await subscribers.open(port_of(server), 6, 3)
    assert len(subscribers.connections) == 2
    await server.wait_for(lambda: len(server.hub) >= 6)
    events = 20

    async def publish() -> None:
        for i in range(1, events + 1):
            server.publish(("x" if i % 2 else "y") * (40_000 if i % 2 else 10))
            await asyncio.sleep(0)

    try:
        result = await read(subscribers, "count", events, publish)
        lasts = [s.last for c in subscribers.connections for s in c.streams.values()]
    finally:
        await subscribers.close()
    assert result["errors"] == []
    assert result["received"] == 6 * events
    decoded = [stubs.messages.Response.FromString(m) for m in lasts]
    assert [(m.data, m.seq) for m in decoded] == [("y" * 10, events)] * 6


async def test_the_windows_are_given_back(
    server: SubscriptionManager, stubs: Stubs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a 200,000-byte window topped up after 100,000 bytes, 3 MB get through: were
    the windows never given back, the server would stop after 200,000."""
    monkeypatch.setattr(_rawgen, "WINDOW", 200_000)
    monkeypatch.setattr(_rawgen, "GIVE_BACK", 100_000)
    subscribers = RawSubscribers(stubs)
    await subscribers.open(port_of(server), 1, 1)
    await server.wait_for(lambda: len(server.hub) >= 1)
    events = 300

    async def publish() -> None:
        for _ in range(events):
            server.publish("z" * 10_000)
            await asyncio.sleep(0)

    try:
        result = await read(subscribers, "count", events, publish)
    finally:
        await subscribers.close()
    assert result["errors"] == []
    assert result["received"] == events


async def test_latencies_come_from_the_stamps(server: SubscriptionManager, stubs: Stubs) -> None:
    subscribers = RawSubscribers(stubs)
    await subscribers.open(port_of(server), 4, 2)
    await server.wait_for(lambda: len(server.hub) >= 4)

    async def publish() -> None:
        for i in range(5):
            server.publish(stamped(i, time.monotonic_ns(), 64))
            await asyncio.sleep(0)

    try:
        result = await read(subscribers, "latency", 5, publish)
    finally:
        await subscribers.close()
    assert result["errors"] == []
    latency = result["latency_ms"]
    assert latency["count"] == 20
    assert 0 <= latency["p50"] <= latency["max"] < TIMEOUT * 1000


async def test_a_stream_the_server_ends_is_reported_with_its_status(
    quiet: Settings, listener: socket.socket, stubs: Stubs
) -> None:
    """The server drains (UNAVAILABLE) before the streams got their events."""
    manager = SubscriptionManager(quiet.model_copy(update={"drain_timeout": 0.5}))
    await manager.start(sock=listener)
    subscribers = RawSubscribers(stubs)
    try:
        await subscribers.open(port_of(manager), 2, 1)
        await manager.wait_for(lambda: len(manager.hub) >= 2)

        async def publish() -> None:
            manager.publish("only one")
            await manager.close()

        result = await read(subscribers, "count", 5, publish)
    finally:
        await subscribers.close()
        await manager.close()
    assert len(result["errors"]) == 2
    assert all("after 1 messages: grpc-status 14" in e for e in result["errors"])


class _H2Server(asyncio.Protocol):
    """A bare h2 server for what a real one never does: ``refuse`` resets stream 3 as it
    arrives (REFUSED_STREAM, as over MAX_CONCURRENT_STREAMS); the others get headers."""

    made: list[_H2Server]
    refuse = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        self.h2.initiate_connection()
        self.transport.write(self.h2.data_to_send())
        self.streams: list[int] = []
        self.made.append(self)

    def data_received(self, data: bytes) -> None:
        for event in self.h2.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                assert event.stream_id is not None
                if self.refuse and event.stream_id == 3:
                    self.h2.reset_stream(3, h2.errors.ErrorCodes.REFUSED_STREAM)
                    continue
                self.streams.append(event.stream_id)
                headers = [(":status", "200"), ("content-type", "application/grpc")]
                self.h2.send_headers(event.stream_id, headers)
        self.transport.write(self.h2.data_to_send())

    def send(self, messages: list[bytes]) -> None:
        for message in messages:
            prefixed = b"\x00" + len(message).to_bytes(4, "big") + message
            self.h2.send_data(self.streams[0], prefixed)
        self.transport.write(self.h2.data_to_send())


@contextlib.asynccontextmanager
async def h2_server(*, refuse: bool = False) -> AsyncIterator[tuple[int, list[_H2Server]]]:
    made: list[_H2Server] = []
    kind = type("Server", (_H2Server,), {"made": made, "refuse": refuse})
    server = await asyncio.get_running_loop().create_server(kind, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], made
    finally:
        server.close()


async def test_a_message_sent_twice_is_reported(stubs: Stubs) -> None:
    """Seq 1, 1, 2 for two events: the second message reached the count but was not the
    last event, and a third came; counting on would have let the run pass."""
    response = stubs.messages.Response
    async with h2_server() as (port, made):
        subscribers = RawSubscribers(stubs)
        await subscribers.open(port, 1, 1)

        async def publish() -> None:
            made[0].send([response(data="a", seq=s).SerializeToString() for s in (1, 1, 2)])

        try:
            result = await read(subscribers, "count", 2, publish)
        finally:
            await subscribers.close()
    assert result["errors"] == ["3 messages, message 2 with seq 1; expected 2, the last with seq 2"]


async def test_a_stream_refused_while_opening_is_reported_at_once(stubs: Stubs) -> None:
    async with h2_server(refuse=True) as (port, _):
        subscribers = RawSubscribers(stubs)
        try:
            with pytest.raises(
                RuntimeError, match=r"failed while opening: stream reset \(code 7\)"
            ):
                async with asyncio.timeout(TIMEOUT / 2):  # open() gives up well before
                    await subscribers.open(port, 3, 3)
        finally:
            await subscribers.close()
