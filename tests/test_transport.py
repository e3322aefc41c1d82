"""Transport failures with real processes: frozen peers, drain, connection age, garbage, signals.

A frozen process (SIGSTOP) keeps its sockets open and its kernel keeps acknowledging TCP, so
only HTTP/2 keepalive pings can tell it from a quiet one: both sides must notice within
``keepalive.time + keepalive.timeout`` (plus a second of slack for the test itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import signal
import socket
from collections.abc import AsyncIterator, Sequence

import pytest
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from longlived import (
    BackoffSettings,
    KeepaliveSettings,
    ResilientClient,
    ResumeExpired,
    Settings,
    SubscriptionManager,
)
from longlived._transport import LISTEN_BACKLOG
from tests.helpers import channel_for, receive, subscription
from tests.test_cli import Process, free_port, got_from

TIMEOUT = 10
"""Bound on waits that are not what a test is about (process start, first message)."""

KEEPALIVE = KeepaliveSettings(time=0.5, timeout=0.5)
KEEPALIVE_FLAGS = ("--keepalive.time", "0.5", "--keepalive.timeout", "0.5")
assert KEEPALIVE.time is not None
DETECT = KEEPALIVE.time + KEEPALIVE.timeout + 1
"""How long a frozen peer may go unnoticed."""

DRAIN_TIMEOUT = 2.0
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def client_settings(address: str) -> Settings:
    """Client settings with fast retries and the short keepalive."""
    return Settings(
        address=address,
        backoff=BackoffSettings(initial=0.05, max=0.2),
        connect_timeout=1.0,
        keepalive=KEEPALIVE,
    )


def listening(lines: list[str]) -> bool:
    return any("Listening on" in line for line in lines)


async def serve(address: str, *flags: str) -> Process:
    """Start ``longlived serve`` on ``address`` and wait until it listens."""
    server = await Process.start("serve", "--address", address, "--interval", "0.1", *flags)
    try:
        async with asyncio.timeout(TIMEOUT):
            await server.wait_for(listening)
    except BaseException:
        await server.kill()
        raise
    return server


class Consumer:
    """Iterates a ``ResilientClient`` as an app would, recording the data it is handed."""

    def __init__(self, client: ResilientClient) -> None:
        self.client = client
        self.received: list[str] = []
        self._changed = asyncio.Event()

    async def run(self) -> None:
        while True:
            # a new server epoch: the app would resync; here it carries on with live events
            with contextlib.suppress(ResumeExpired):
                async for response in self.client:
                    self.received.append(response.data)
                    self._changed.set()
                return

    async def until(self, count: int) -> None:
        """Wait until ``count`` messages have arrived (bounded by the caller)."""
        while len(self.received) < count:
            self._changed.clear()
            await self._changed.wait()


@contextlib.asynccontextmanager
async def consuming(clients: Sequence[ResilientClient]) -> AsyncIterator[list[Consumer]]:
    """Iterate each client in its own task for the duration of the block."""
    consumers = [Consumer(client) for client in clients]
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(c.run(), name=f"consumer-{c.client.id}") for c in consumers]
        try:
            yield consumers
        finally:
            for task in tasks:
                task.cancel()


async def read_until_closed(reader: asyncio.StreamReader) -> None:
    """Read until the server closes the connection (FIN or RST)."""
    with contextlib.suppress(ConnectionResetError):
        while await reader.read(65536):
            pass


# ------------------------------------------------------------------ frozen peers


@pytest.mark.parametrize("recovery", ["resumed", "replaced"])
async def test_client_notices_a_frozen_server_and_reconnects(
    processes: list[Process], recovery: str
) -> None:
    address = f"127.0.0.1:{free_port()}"
    server = await serve(address, *KEEPALIVE_FLAGS)
    processes.append(server)
    async with (
        ResilientClient(1, settings=client_settings(address)) as client,
        consuming([client]) as (consumer,),
    ):
        async with asyncio.timeout(TIMEOUT):
            await consumer.until(1)
        server.proc.send_signal(signal.SIGSTOP)
        async with asyncio.timeout(DETECT):
            await client.disconnected.wait()
        mark = len(consumer.received)
        if recovery == "resumed":
            server.proc.send_signal(signal.SIGCONT)
        else:
            await server.kill()
            processes.append(await serve(address, *KEEPALIVE_FLAGS))
        async with asyncio.timeout(TIMEOUT):
            await consumer.until(mark + 1)
        assert client.connected.is_set()
        assert client.connections >= 2
        assert client.failures >= 1
        # the same server resumes the client's position; a new one has a new epoch
        assert client.resets == (0 if recovery == "resumed" else 1)
    assert set(consumer.received) == {"data mock for: 1"}


async def test_server_drops_a_frozen_client_process(
    processes: list[Process], listener: socket.socket, settings: Settings
) -> None:
    manager = SubscriptionManager(settings.model_copy(update={"keepalive": KEEPALIVE}))
    await manager.start(sock=listener)
    try:
        clients = await Process.start(
            "clients", "--address", settings.address, "--count", "1", "--stagger", "0",
            "--backoff.initial", "0.05", "--backoff.max", "0.2", *KEEPALIVE_FLAGS,
        )  # fmt: skip
        processes.append(clients)
        async with asyncio.timeout(TIMEOUT):
            await clients.wait_for(lambda lines: got_from(lines) == {1})
        assert manager.subscribers == [1]
        clients.proc.send_signal(signal.SIGSTOP)
        try:
            async with asyncio.timeout(DETECT):
                await manager.wait_for(lambda: 1 not in manager.subscribers)
        finally:
            clients.proc.send_signal(signal.SIGCONT)
        # thawed, the client finds its connection gone and subscribes again
        async with asyncio.timeout(TIMEOUT):
            await manager.wait_for(lambda: 1 in manager.subscribers)
            manager.send(1, "after the thaw")
            await clients.wait_for(
                lambda lines: any('got response: "after the thaw"' in line for line in lines)
            )
        assert await clients.stop(signal.SIGINT) == 0
        assert "Traceback" not in "\n".join(clients.lines)
    finally:
        await manager.close()


# ------------------------------------------------------------------------ drain


async def test_sigterm_ends_every_stream_with_unavailable_and_clients_move_on(
    processes: list[Process], caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    server = await serve(address, "--drain-timeout", str(DRAIN_TIMEOUT))
    processes.append(server)
    ids = [1, 2, 3]
    channel = Channel("127.0.0.1", port)
    try:
        async with contextlib.AsyncExitStack() as stack:
            clients = [
                await stack.enter_async_context(
                    ResilientClient(id, settings=client_settings(address))
                )
                for id in ids
            ]
            consumers = await stack.enter_async_context(consuming(clients))
            async with asyncio.timeout(TIMEOUT):
                for consumer in consumers:
                    await consumer.until(1)
            with pytest.raises(GRPCError) as info:
                async with subscription(channel, 4) as raw:
                    await receive(raw, 1)
                    server.proc.send_signal(signal.SIGTERM)
                    async with asyncio.timeout(TIMEOUT):
                        while await raw.recv_message() is not None:
                            pass
            assert info.value.status is Status.UNAVAILABLE
            assert info.value.message == "server shutting down"
            channel.close()  # a well-behaved client leaves once it has its status
            async with asyncio.timeout(DRAIN_TIMEOUT):
                assert await server.proc.wait() == 0
            marks = [len(consumer.received) for consumer in consumers]
            processes.append(await serve(address))
            async with asyncio.timeout(TIMEOUT):
                for consumer, mark in zip(consumers, marks, strict=True):
                    await consumer.until(mark + 1)
            assert all(client.connections >= 2 for client in clients)
    finally:
        channel.close()
    await server.kill()
    output = "\n".join(server.lines)
    assert "Server closed" in output
    assert "did not end within" not in output
    assert "Traceback" not in output
    warnings = {record.getMessage() for record in caplog.records}
    for id in ids:
        expected = f"Client ID {id}: stream ended with UNAVAILABLE (server shutting down)"
        assert any(message.startswith(expected) for message in warnings), id


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_second_signal_exits_at_once(processes: list[Process], signum: int) -> None:
    port = free_port()
    server = await serve(f"127.0.0.1:{port}", "--drain-timeout", "30")
    processes.append(server)
    name = signal.Signals(signum).name
    # This client keeps its connection after its stream ends: the drain waits for it.
    channel = Channel("127.0.0.1", port)
    try:
        with pytest.raises(GRPCError) as info:
            async with subscription(channel, 1) as raw:
                await receive(raw, 1)
                server.proc.send_signal(signum)
                async with asyncio.timeout(TIMEOUT):
                    while await raw.recv_message() is not None:
                        pass
        # the streams have ended: the server now waits for this connection to close
        assert info.value.status is Status.UNAVAILABLE
        async with asyncio.timeout(TIMEOUT):
            await server.wait_for(lambda lines: any(f"{name} received" in x for x in lines))
        server.proc.send_signal(signum)
        async with asyncio.timeout(TIMEOUT):
            assert await server.proc.wait() == 0
    finally:
        channel.close()
    await server.kill()
    output = "\n".join(server.lines)
    assert f"Second {name}: exiting now" in output
    assert "Server closed" not in output  # the drain was cut short, not completed
    assert "Traceback" not in output


# ------------------------------------------------------------ max connection age


async def test_max_connection_age_ends_the_stream_with_unavailable(
    listener: socket.socket, settings: Settings
) -> None:
    aged = settings.model_copy(update={"interval": 3600.0, "max_connection_age": 0.3})
    manager = SubscriptionManager(aged)
    await manager.start(sock=listener)
    channel = channel_for(aged)
    try:
        with pytest.raises(GRPCError) as info:
            async with subscription(channel, 1) as raw:
                async with asyncio.timeout(TIMEOUT):
                    while await raw.recv_message() is not None:
                        pass
        assert info.value.status is Status.UNAVAILABLE
        assert info.value.message == "max connection age reached"
    finally:
        channel.close()
        await manager.close()


async def test_client_resumes_across_connection_ages_without_loss(
    listener: socket.socket, settings: Settings
) -> None:
    aged = settings.model_copy(update={"interval": 3600.0, "max_connection_age": 0.3})
    manager = SubscriptionManager(aged)
    await manager.start(sock=listener)
    sent = 0

    def burst(count: int = 10) -> None:
        nonlocal sent
        for _ in range(count):
            manager.publish(str(sent))
            sent += 1

    try:
        async with (
            ResilientClient(1, settings=aged) as client,
            consuming([client]) as (consumer,),
        ):
            async with asyncio.timeout(TIMEOUT):
                for _ in range(3):
                    await client.connected.wait()
                    burst()  # live
                    await client.disconnected.wait()  # the stream reached its age
                    burst()  # while the client is away: it gets them on resuming
                await client.connected.wait()
                burst()
                await consumer.until(sent)
            assert consumer.received == [str(n) for n in range(sent)]
            assert client.connections >= 4
            assert client.resets == 0
            assert manager.hub.stats.resumes >= 3
    finally:
        await manager.close()


# --------------------------------------------------------------------- garbage


@pytest.mark.parametrize(
    ("payload", "hold_open"),
    [
        pytest.param(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", False, id="http1"),
        pytest.param(random.Random(1).randbytes(4096), False, id="random"),
        pytest.param(PREFACE + bytes(9), False, id="preface-then-bad-frame"),
        pytest.param(PREFACE + random.Random(2).randbytes(64), True, id="preface-then-random"),
        pytest.param(PREFACE[:10], False, id="truncated-preface"),
        pytest.param(PREFACE[:10], True, id="truncated-preface-held-open"),
    ],
)
async def test_garbage_on_the_port_disturbs_no_one(
    listener: socket.socket, settings: Settings, payload: bytes, hold_open: bool
) -> None:
    keepalive = settings.model_copy(update={"keepalive": KEEPALIVE})
    manager = SubscriptionManager(keepalive)
    await manager.start(sock=listener)
    channel, fresh = channel_for(keepalive), channel_for(keepalive)
    try:
        async with subscription(channel, 1) as raw:
            assert await receive(raw, 2) == ["data mock for: 1"] * 2
            reader, writer = await asyncio.open_connection(keepalive.host, keepalive.port)
            try:
                writer.write(payload)
                if not hold_open:
                    writer.write_eof()
                # the server closes the connection: at once, or when keepalive gives up on it
                async with asyncio.timeout(DETECT):
                    await read_until_closed(reader)
            finally:
                writer.close()
            assert await receive(raw, 2) == ["data mock for: 1"] * 2
            assert manager.subscribers == [1]
            async with subscription(fresh, 2) as other:
                assert await receive(other, 1) == ["data mock for: 2"]
            await raw.cancel()
    finally:
        channel.close()
        fresh.close()
        await manager.close()


async def test_connections_on_a_socket_handed_in_have_tcp_nodelay(
    server: SubscriptionManager, quiet: Settings
) -> None:
    """``start(sock=socket.create_server(...))`` gives a socket of proto 0, on which asyncio
    and grpclib leave Nagle on: small messages then wait for the peer's delayed ACK."""
    channel = channel_for(quiet)
    try:
        async with subscription(channel, 1):
            await server.wait_for(lambda: 1 in server.subscribers)
            assert server._server is not None
            [protocol] = server._server._protocols
            sock = protocol.connection._transport.get_extra_info("socket")
            assert sock.proto == 0  # what create_server() makes
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        channel.close()


def somaxconn() -> int:
    """The kernel's cap on a listen backlog."""
    with open("/proc/sys/net/core/somaxconn") as f:
        return int(f.read())


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2) to read the backlog")
@pytest.mark.parametrize("handed_in", [True, False], ids=["socket-handed-in", "address"])
async def test_the_listener_queues_a_thousand_clients_coming_back(
    quiet: Settings, listener: socket.socket, handed_in: bool
) -> None:
    """grpclib's listen backlog of 100 dropped most SYNs of 1,000 clients reconnecting after
    a restart (each then waited for TCP's retry); the kernel reports the backlog of a
    listening socket as its Send-Q."""
    port = listener.getsockname()[1]
    if not handed_in:
        listener.close()
    manager = SubscriptionManager(quiet)
    await manager.start(sock=listener if handed_in else None)
    try:
        ss = await asyncio.create_subprocess_exec(
            "ss", "-Hltn", f"sport = :{port}", stdout=asyncio.subprocess.PIPE
        )
        async with asyncio.timeout(TIMEOUT):
            out, _ = await ss.communicate()
        backlog = int(out.split()[2])  # State Recv-Q Send-Q ...
        assert backlog == min(LISTEN_BACKLOG, somaxconn())
        assert backlog >= 1000
    finally:
        await manager.close()


async def test_a_server_on_port_zero_says_the_port_it_listens_on(
    request: pytest.FixtureRequest,
) -> None:
    """``address`` of a server started on port 0 is where clients reach it, on either event
    loop (on uvloop it said port 0: uvloop's Server is not an ``asyncio.Server``)."""
    loop_kind = type(asyncio.get_running_loop()).__module__
    if "[uvloop]" in request.node.name:  # the conftest hook's variant really runs on uvloop
        assert "uvloop" in loop_kind
    elif "[asyncio]" in request.node.name:
        assert "uvloop" not in loop_kind
    manager = SubscriptionManager(Settings(address="127.0.0.1:0", interval=3600))
    await manager.start()
    host, port = manager.address.rsplit(":", 1)
    channel = Channel(host, int(port))
    try:
        assert int(port) != 0
        async with subscription(channel, 5) as stream:
            manager.publish("hello")
            assert await receive(stream, 1) == ["hello"]
    finally:
        channel.close()
        await manager.close()
