"""One contract, two event logs: in memory (one process) and Redis Streams (replicas).

Every test in ``Contract`` runs on both, through real servers and raw grpclib subscribers:
ordering, resume, RESET, targeted events, retention. The Redis-only tests after it run
two replicas on one Redis, move a client between them, and restart Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from examples.inventory._proto.inventory import Item
from longlived import (
    AuthSettings,
    Backoff,
    BackoffSettings,
    Change,
    EndReason,
    Hub,
    Position,
    Published,
    Publisher,
    PublishRefused,
    PublishSettings,
    RedisSettings,
    ReplaySettings,
    Request,
    ResilientClient,
    Response,
    ResponseKind,
    Settings,
    StateFull,
    StateSettings,
    SubscriptionClosed,
    SubscriptionManager,
    WatchCache,
)
from longlived._wire import encode_message
from longlived.errors import LogUnavailable
from longlived.redislog import RedisAppender, RedisLog
from tests.h2peer import H2Peer, grpc_body, request_headers
from tests.helpers import cache_until, channel_for, converged, subscription
from tests.proxy import proxy_to
from tests.redis_server import RedisServer, redis_cluster, redis_server
from tests.test_cli import Process, free_port
from tests.test_cli import publish as cli_publish
from tests.test_transport import KEEPALIVE_FLAGS, client_settings, consuming, serve

TIMEOUT = 15


@pytest.fixture
def base(quiet: Settings, listener: socket.socket) -> Settings:
    """``quiet`` settings; each server here listens on a socket of its own."""
    listener.close()
    return quiet


@pytest.fixture(params=["memory", "redis"])
async def log_settings(request: pytest.FixtureRequest, base: Settings) -> AsyncIterator[Settings]:
    """``base`` settings on each kind of log."""
    quiet = base
    if request.param == "memory":
        yield quiet
        return
    async with redis_server() as redis:
        yield quiet.model_copy(update={"redis": RedisSettings(url=redis.url, maxlen=1000)})


@asynccontextmanager
async def serving(settings: Settings, **updates: object) -> AsyncIterator[SubscriptionManager]:
    """A started server on a fresh port with ``settings`` (and ``updates``)."""
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = SubscriptionManager(
        settings.model_copy(update={"address": f"127.0.0.1:{port}", **updates})
    )
    await server.start(sock=sock)
    try:
        yield server
    finally:
        await server.close()


async def messages(stream: object, count: int) -> list[Response]:
    """The next ``count`` messages on a grpclib subscription."""
    received: list[Response] = []
    async with asyncio.timeout(TIMEOUT):
        while len(received) < count:
            message = await stream.recv_message()  # type: ignore[attr-defined]  # grpclib's
            assert message is not None, f"the stream ended after {len(received)}"
            received.append(message)
    return received


def data(received: list[Response]) -> list[str]:
    return [m.data for m in received if m.kind == ResponseKind.DATA]


class TestContract:
    """What every log guarantees."""

    async def test_events_arrive_in_order_with_rising_positions(
        self, log_settings: Settings
    ) -> None:
        async with serving(log_settings) as server:
            channel = channel_for(server.settings)
            try:
                async with subscription(channel, 1) as stream:
                    published = [await server.emit(str(n)) for n in range(50)]
                    got = await messages(stream, 50)
                assert data(got) == [str(n) for n in range(50)]
                assert [m.token for m in got] == [p.position.token for p in published]
                seqs = [m.seq for m in got]
                assert seqs == sorted(seqs)
                assert len(set(seqs)) == 50
            finally:
                channel.close()

    async def test_resume_gets_exactly_what_was_missed(self, log_settings: Settings) -> None:
        async with serving(log_settings) as server:
            channel = channel_for(server.settings)
            try:
                async with subscription(channel, 1) as stream:
                    for n in range(5):
                        await server.emit(str(n))
                    token = (await messages(stream, 5))[-1].token
                for n in range(5, 10):
                    await server.emit(str(n))
                resume = Request(id=1, resume_token=token)
                async with subscription(channel, resume) as stream:
                    got = await messages(stream, 5)
                    await server.emit("live")
                    got += await messages(stream, 1)
                assert data(got) == ["5", "6", "7", "8", "9", "live"]
            finally:
                channel.close()

    @pytest.mark.parametrize(
        ("token", "reason"),
        [
            ("junk", "malformed resume token"),
            ("another-epoch:1", "resume token from another epoch (the server restarted)"),
        ],
    )
    async def test_a_token_that_cannot_be_honoured_gets_one_reset(
        self, log_settings: Settings, token: str, reason: str
    ) -> None:
        async with serving(log_settings) as server:
            channel = channel_for(server.settings)
            try:
                async with subscription(channel, Request(id=1, resume_token=token)) as stream:
                    [reset] = await messages(stream, 1)
                    await server.emit("live")
                    [live] = await messages(stream, 1)
                assert (reset.kind, reset.data) == (ResponseKind.RESET, reason)
                assert live.data == "live"
            finally:
                channel.close()

    async def test_events_to_one_id_reach_it_and_wait_for_its_resume(
        self, log_settings: Settings
    ) -> None:
        async with serving(log_settings) as server:
            channel = channel_for(server.settings)
            try:
                async with subscription(channel, 2) as two, subscription(channel, 3) as three:
                    first = await server.emit("for two", to=2)
                    await server.emit("for everyone")
                    assert data(await messages(two, 2)) == ["for two", "for everyone"]
                    assert data(await messages(three, 1)) == ["for everyone"]
                await server.emit("while two is away", to=2)
                resume = Request(id=2, resume_token=first.position.token)
                async with subscription(channel, resume) as two:
                    assert data(await messages(two, 2)) == ["for everyone", "while two is away"]
            finally:
                channel.close()

    async def test_a_token_older_than_what_is_retained_gets_reset(
        self, log_settings: Settings
    ) -> None:
        # in memory the history holds 5; on Redis the stream is trimmed to about 100
        small: dict[str, object] = {"replay": ReplaySettings(size=5)}
        if log_settings.redis.url is not None:
            small["redis"] = RedisSettings(url=log_settings.redis.url, maxlen=100)
        async with serving(log_settings, **small) as server:
            first = await server.emit("the first")
            for n in range(500):
                await server.emit(str(n))
            channel = channel_for(server.settings)
            try:
                resume = Request(id=1, resume_token=first.position.token)
                async with subscription(channel, resume) as stream:
                    [reset] = await messages(stream, 1)
                assert reset.kind == ResponseKind.RESET
                assert reset.data.startswith("resume token older than the retained")
            finally:
                channel.close()


# ------------------------------------------------------------------------- Redis only


@pytest.fixture
async def redis() -> AsyncIterator[RedisServer]:
    async with redis_server() as server:
        yield server


def on(redis: RedisServer, quiet: Settings) -> Settings:
    return quiet.model_copy(update={"redis": RedisSettings(url=redis.url)})


async def test_a_resume_older_than_the_replicas_history_is_filled_from_redis(
    redis: RedisServer, base: Settings
) -> None:
    async with serving(on(redis, base), replay=ReplaySettings(size=3)) as server:
        first = await server.emit("0")
        for n in range(1, 20):
            await server.emit(str(n))
        channel = channel_for(server.settings)
        try:
            resume = Request(id=1, resume_token=first.position.token)
            async with subscription(channel, resume) as stream:
                got = await messages(stream, 19)
            assert data(got) == [str(n) for n in range(1, 20)]
        finally:
            channel.close()


async def test_two_replicas_deliver_every_event_in_the_same_order(
    redis: RedisServer, base: Settings
) -> None:
    settings = on(redis, base)
    async with serving(settings) as a, serving(settings) as b, AsyncExitStack() as stack:
        channels = [channel_for(a.settings), channel_for(b.settings)]
        for channel in channels:
            stack.callback(channel.close)
        streams = [
            await stack.enter_async_context(subscription(channels[0], 1)),
            await stack.enter_async_context(subscription(channels[1], 2)),
        ]
        for n in range(20):
            await (a if n % 2 else b).emit(f"{n}")  # each appended before the next
        got = [data(await messages(stream, 20)) for stream in streams]
        assert got == [[str(n) for n in range(20)]] * 2


async def test_a_client_moved_between_replicas_loses_nothing(
    redis: RedisServer, base: Settings
) -> None:
    settings = on(redis, base).model_copy(
        update={"backoff": BackoffSettings(initial=0.02, max=0.1)}
    )
    total = 300

    async def produce() -> None:  # events keep flowing, through both replicas, all along
        for n in range(total):
            await (a if n % 2 else b).emit(str(n))
            await asyncio.sleep(0)

    async with serving(settings) as a, serving(settings) as b:
        received: list[str] = []
        client = ResilientClient(1, settings=a.settings)
        async with client:
            stream = aiter(client)
            first = asyncio.ensure_future(anext(stream))
            async with asyncio.timeout(TIMEOUT):
                await client.connected.wait()
            producer = asyncio.ensure_future(produce())
            try:
                async with asyncio.timeout(TIMEOUT):
                    received.append((await first).data)
                    while len(received) < 50:
                        received.append((await anext(stream)).data)
                    await client.aclose()  # mid-stream: the app moves to the other replica
                    moved = ResilientClient(1, settings=b.settings, resume_token=client.token)
                    async with moved:
                        stream = aiter(moved)
                        while len(received) < total:
                            received.append((await anext(stream)).data)
            finally:
                await asyncio.wait([producer])
        assert received == [str(n) for n in range(total)]


async def test_redis_restarted_without_its_data_gives_reset_not_silence(
    redis: RedisServer, base: Settings
) -> None:
    settings = on(redis, base).model_copy(
        update={"backoff": BackoffSettings(initial=0.02, max=0.1)}
    )
    async with serving(settings) as server:
        channel = channel_for(server.settings)
        try:
            with pytest.raises(GRPCError) as info:
                async with subscription(channel, Request(id=1, accept_control=True)) as stream:
                    await server.emit("before")
                    got = await messages(stream, 2)  # the position, then the event
                    token = got[-1].token
                    await redis.restart()  # persistence off: the stream and its epoch are gone
                    async with asyncio.timeout(TIMEOUT):
                        while await stream.recv_message() is not None:
                            pass
            assert (info.value.status, info.value.message) == (
                Status.UNAVAILABLE,
                "the shared event log was lost",
            )
            assert server._log is not None
            async with asyncio.timeout(TIMEOUT):
                await server._log.connected.wait()  # following the new log
            resume = Request(id=1, resume_token=token)
            async with subscription(channel, resume) as stream:
                [reset] = await messages(stream, 1)
                await server.emit(
                    "after", idempotency_key="after"
                )  # safe to retry on a new connection
                [after] = await messages(stream, 1)
            assert reset.kind == ResponseKind.RESET
            assert after.data == "after"
            assert Position.parse(after.token) is not None
        finally:
            channel.close()


async def test_publishing_while_redis_is_down_fails_clearly(
    redis: RedisServer, base: Settings
) -> None:
    async with serving(on(redis, base)) as server:
        await redis.kill()
        with pytest.raises(LogUnavailable, match="cannot append to the event log"):
            await server.emit("lost?")
        with pytest.raises(RuntimeError, match="use await emit"):
            server.publish("sync")
        await redis.start()


async def test_a_retried_publish_with_the_same_key_is_emitted_once_across_replicas(
    redis: RedisServer, base: Settings
) -> None:
    settings = on(redis, base)
    async with serving(settings) as a, serving(settings) as b:
        channel = channel_for(a.settings)
        try:
            async with subscription(channel, 1) as stream:
                first = await a.emit("once", idempotency_key="k-1")
                again = await b.emit(
                    "once", idempotency_key="k-1"
                )  # the retry went to another replica
                assert (again.position, again.duplicate) == (first.position, True)
                await a.emit("next")
                assert data(await messages(stream, 2)) == ["once", "next"]
        finally:
            channel.close()


async def test_a_replica_killed_while_events_flow_loses_its_clients_nothing(
    redis: RedisServer, base: Settings, processes: list[Process]
) -> None:
    """Replica A is a real process behind a proxy (the load balancer); kill -9 it, point
    the proxy at replica B, and its client carries on there from its token."""
    address = f"127.0.0.1:{free_port()}"
    processes.append(
        await serve(address, "--redis.url", redis.url, "--source", "none", *KEEPALIVE_FLAGS)
    )
    host, port = address.split(":")
    async with serving(on(redis, base)) as b, proxy_to((host, int(port))) as (balancer, front):
        client = ResilientClient(1, settings=client_settings(f"127.0.0.1:{front}"))
        async with client, consuming([client]) as [consumer]:
            async with asyncio.timeout(TIMEOUT):
                await client.connected.wait()
                for n in range(50):
                    await b.emit(str(n))  # through Redis to replica A's subscriber
                await consumer.until(20)
            await processes[0].kill()  # kill -9, mid-stream
            assert b.address is not None
            balancer.upstream = ("127.0.0.1", int(b.address.rpartition(":")[2]))
            for n in range(50, 100):
                await b.emit(str(n))
            async with asyncio.timeout(TIMEOUT):
                await consumer.until(100)
        assert consumer.received == [str(n) for n in range(100)]


async def test_ownership_of_an_id_holds_on_every_replica(
    redis: RedisServer, base: Settings
) -> None:
    """Alice's events sent to her id cannot be read by Bob through another replica."""
    auth = AuthSettings(tokens={"tok-a": "alice", "tok-b": "bob"})
    settings = on(redis, base).model_copy(update={"auth": auth})
    async with serving(settings) as a, serving(settings) as b:
        alice = ResilientClient(7, settings=a.settings.model_copy(
            update={"auth": AuthSettings(token="tok-a")}))  # fmt: skip
        async with alice:
            stream = aiter(alice)
            first = asyncio.ensure_future(anext(stream))
            async with asyncio.timeout(TIMEOUT):
                await alice.connected.wait()
                secret = await a.emit("alice's secret", to=7)
                assert (await first).data == "alice's secret"
        bob = ResilientClient(
            7,
            settings=b.settings.model_copy(update={"auth": AuthSettings(token="tok-b")}),
            resume_token=f"{secret.position.epoch}:0",
        )
        async with bob:
            with pytest.raises(SubscriptionClosed) as info:
                async with asyncio.timeout(TIMEOUT):
                    async for response in bob:
                        assert response.data != "alice's secret"
        assert (info.value.status, info.value.detail) == (
            "PERMISSION_DENIED",
            "bob may not take over the subscription 7",
        )


async def test_events_from_every_producer_reach_both_replicas_in_one_order(
    redis: RedisServer, base: Settings
) -> None:
    """Through replica A, replica B, a ``Publisher`` and ``longlived publish``: every
    subscriber, on either replica, gets every event, in the same order."""
    settings = on(redis, base)
    async with serving(settings) as a, serving(settings) as b, AsyncExitStack() as stack:
        channels = [channel_for(a.settings), channel_for(b.settings)]
        for channel in channels:
            stack.callback(channel.close)
        streams = [
            await stack.enter_async_context(subscription(channel, id))
            for id, channel in enumerate(channels * 2)  # two subscribers on each replica
        ]
        publisher = await stack.enter_async_context(Publisher(settings=a.settings))
        await a.emit("through A")
        await b.emit("through B")
        await publisher.publish("from a Publisher")
        code, _, err = await cli_publish("from the CLI", "--address", b.settings.address)
        assert code == 0, err
        await a.emit("through A again")
        got = [data(await messages(stream, 5)) for stream in streams]
        # each publish returned before the next began: that is the stream's order
        order = ["through A", "through B", "from a Publisher", "from the CLI", "through A again"]
        assert got == [order] * 4


async def test_a_publisher_pointed_at_redis_reaches_every_replica(
    redis: RedisServer, base: Settings
) -> None:
    """``publish.via=redis``: no server in the way; the same checks, the same order."""
    settings = on(redis, base)
    direct = settings.model_copy(update={"publish": PublishSettings(via="redis")})
    async with serving(settings) as a, serving(settings) as b, AsyncExitStack() as stack:
        channels = [channel_for(a.settings), channel_for(b.settings)]
        for channel in channels:
            stack.callback(channel.close)
        streams = [
            await stack.enter_async_context(subscription(channel, id))
            for id, channel in enumerate(channels)
        ]
        publisher = await stack.enter_async_context(Publisher(settings=direct))
        first = await publisher.publish("straight to Redis", idempotency_key="k")
        again = await publisher.publish("straight to Redis", idempotency_key="k")
        assert (again.position, again.duplicate) == (first.position, True)
        code, _, err = await cli_publish(
            "from the CLI", "--publish.via", "redis", "--redis.url", redis.url
        )
        assert code == 0, err
        with pytest.raises(PublishRefused, match="an event goes to a topic or to one id"):
            await publisher.publish("x", topic="t", to=1)
        got = [await messages(stream, 2) for stream in streams]
        assert [data(g) for g in got] == [["straight to Redis", "from the CLI"]] * 2
        assert got[0][0].token == first.position.token


async def test_a_burst_of_resubscribes_waits_for_redis_connections_instead_of_failing(
    redis: RedisServer, base: Settings
) -> None:
    """150 authenticated subscribes at once, each asking Redis who owns its id: redis-py's
    default pool refused the 101st command ("Too many connections")."""
    settings = on(redis, base).model_copy(
        update={"auth": AuthSettings(tokens={"tok": "svc"}), "max_streams_per_connection": 200}
    )
    async with serving(settings) as server:
        peer = await H2Peer.connect(server.settings)
        try:
            headers = request_headers(authorization="Bearer tok")
            for id in range(150):
                peer.open(headers, grpc_body(Request(id=id)))
            await peer.flush()
            async with asyncio.timeout(TIMEOUT):
                await server.wait_for(lambda: len(server.subscribers) == 150)
            assert server.rejected == {}
        finally:
            peer.close()


async def test_a_frozen_redis_fails_publishes_fast_and_loses_nothing_once_back(
    redis: RedisServer, base: Settings
) -> None:
    """SIGSTOP: no command hangs; the publish that failed is retried with its key and the
    subscriber gets it once; the reader carries on from its last entry."""
    settings = base.model_copy(
        update={
            "redis": RedisSettings(url=redis.url, timeout=0.3),
            "backoff": BackoffSettings(initial=0.02, max=0.1),
        }
    )
    async with serving(settings) as server:
        channel = channel_for(server.settings)
        try:
            async with subscription(channel, 1) as stream:
                await server.emit("before")
                redis.freeze()
                try:
                    with pytest.raises(LogUnavailable):
                        async with asyncio.timeout(TIMEOUT):
                            await server.emit("during", idempotency_key="during")
                finally:
                    redis.freeze(False)
                await server.emit(
                    "during", idempotency_key="during"
                )  # the publisher's retry, same key
                await server.emit("after", idempotency_key="after")
                assert data(await messages(stream, 3)) == ["before", "during", "after"]
        finally:
            channel.close()


async def test_two_replicas_on_a_redis_cluster(base: Settings, tmp_path: Path) -> None:
    """``redis.cluster``: the log's keys share one slot; the guarantees are the same."""
    async with redis_cluster(tmp_path) as nodes:
        settings = base.model_copy(
            update={"redis": RedisSettings(url=nodes[1].url.rsplit("/", 1)[0], cluster=True)}
        )
        async with serving(settings) as a, serving(settings) as b:
            channels = [channel_for(a.settings), channel_for(b.settings)]
            try:
                async with subscription(channels[0], 1) as one, subscription(channels[1], 2) as two:
                    first = await a.emit("through A")
                    await b.emit("through B", idempotency_key="k")
                    assert (await b.emit("through B", idempotency_key="k")).duplicate
                    assert data(await messages(one, 2)) == ["through A", "through B"]
                    assert data(await messages(two, 2)) == ["through A", "through B"]
                resume = Request(id=2, resume_token=first.position.token)
                async with subscription(channels[1], resume) as two:
                    assert data(await messages(two, 1)) == ["through B"]
            finally:
                for channel in channels:
                    channel.close()


# ------------------------------------------------------------ found in review: Redis edges


@asynccontextmanager
async def behind_a_proxy(redis: RedisServer, base: Settings, **redis_options: object):  # type: ignore[no-untyped-def]  # an async generator context
    """A replica whose Redis connections go through a proxy the test can cut."""
    async with proxy_to(("127.0.0.1", redis.port)) as (cut, port):
        url = f"redis://127.0.0.1:{port}/0"
        settings = base.model_copy(
            update={
                "redis": RedisSettings(url=url, timeout=0.3, **redis_options),  # type: ignore[arg-type]
                "backoff": BackoffSettings(initial=0.02, max=0.1),
            }
        )
        async with serving(settings) as replica:
            yield replica, cut


async def test_a_replica_cut_off_longer_than_the_retention_resets_instead_of_skipping(
    redis: RedisServer, base: Settings
) -> None:
    appender = RedisAppender(RedisSettings(url=redis.url, maxlen=100), dedup_window=120)
    try:
        async with behind_a_proxy(redis, base, maxlen=100) as (replica, cut):
            channel = channel_for(replica.settings)
            try:
                with pytest.raises(GRPCError) as info:
                    async with subscription(channel, Request(id=1, accept_control=True)) as sub:
                        first = await appender.append("0")
                        got = await messages(sub, 2)
                        assert data(got) == ["0"]
                        cut.hold()
                        cut.abort_all()  # the replica is cut off from Redis
                        for n in range(1, 1000):  # far past the retention of 100
                            await appender.append(str(n))
                        cut.release()
                        async with asyncio.timeout(TIMEOUT):
                            while await sub.recv_message() is not None:
                                pass
                assert info.value.status is Status.UNAVAILABLE
                assert info.value.message == EndReason.EVENTS_LOST.value
                resume = Request(id=1, resume_token=first.position.token)
                async with subscription(channel, resume) as sub:
                    [reset] = await messages(sub, 1)
                assert reset.kind == ResponseKind.RESET
            finally:
                channel.close()
    finally:
        await appender.aclose()


async def test_a_resume_on_a_replica_behind_the_log_waits_for_it(
    redis: RedisServer, base: Settings
) -> None:
    """A token from a replica ahead used to get RESET ("from the future")."""
    appender = RedisAppender(RedisSettings(url=redis.url), dedup_window=120)
    try:
        async with behind_a_proxy(redis, base) as (replica, cut):
            channel = channel_for(replica.settings)
            try:
                async with subscription(channel, 9) as sub:  # subscribed before the append
                    await appender.append("read by the replica")
                    assert data(await messages(sub, 1)) == ["read by the replica"]
                cut.hold()
                cut.abort_all()  # the replica falls behind the log
                ahead = await appender.append("not read yet")
                resume = Request(id=1, resume_token=ahead.position.token)
                with pytest.raises(GRPCError) as info:
                    async with subscription(channel, resume):
                        pass
                assert info.value.status is Status.UNAVAILABLE  # retry, not RESET
                cut.release()
                async with subscription(channel, resume) as sub:
                    await appender.append("after")
                    got = await messages(sub, 2)
                assert [m.kind for m in got] == [ResponseKind.HEARTBEAT, ResponseKind.DATA]
                assert data(got) == ["after"]
            finally:
                channel.close()
    finally:
        await appender.aclose()


async def test_entries_that_are_not_ours_are_skipped_and_the_reader_goes_on(
    redis: RedisServer, base: Settings
) -> None:
    client = aioredis.Redis.from_url(redis.url)
    try:
        async with serving(on(redis, base)) as server:
            channel = channel_for(server.settings)
            try:
                async with subscription(channel, 1) as sub:
                    await client.xadd("{longlived}:events", {"d": "x", "to": "seven"})
                    await client.xadd("{longlived}:events", {"d": b"\xff\xfe"})
                    await server.emit("still read")
                    assert data(await messages(sub, 1)) == ["still read"]
            finally:
                channel.close()
    finally:
        await client.aclose()


async def test_two_callers_racing_for_an_id_cannot_both_hold_it(redis: RedisServer) -> None:
    hub = Hub(encode=encode_message, queue_size=10, history_size=10)
    log = RedisLog(RedisSettings(url=redis.url), hub, dedup_window=120, backoff=Backoff())
    try:
        results = await asyncio.gather(log.claim(7, "alice"), log.claim(7, "bob"))
        assert results[0] == results[1]  # whoever came first holds it, for both
        assert await log.owner(7) == results[0]
        assert await log.claim(7, "bob", take_over=True) == "bob"  # an allowed takeover
    finally:
        await log.aclose()


async def test_an_open_streams_claim_is_kept_alive(redis: RedisServer) -> None:
    """Ownership used to expire claim_ttl after the subscribe, the stream still open."""
    tick, waiting = asyncio.Event(), asyncio.Event()

    async def sleep(delay: float) -> None:  # the refresher's pause between rounds
        waiting.set()
        await tick.wait()
        tick.clear()

    hub = Hub(encode=encode_message, queue_size=10, history_size=10)
    settings = RedisSettings(url=redis.url, claim_ttl=60)
    log = RedisLog(settings, hub, dedup_window=120, backoff=Backoff(), sleep=sleep)
    client = aioredis.Redis.from_url(redis.url)
    try:
        await log.start()
        hub.register(7, owner="alice")
        assert await log.claim(7, "alice") == "alice"
        await client.expire("{longlived}:owner:7", 1)  # as if most of the ttl had passed
        async with asyncio.timeout(TIMEOUT):
            await waiting.wait()
            waiting.clear()
            tick.set()  # the refresher's next round
            await waiting.wait()  # it has done that round
        assert await client.ttl("{longlived}:owner:7") > 1
        assert await log.owner(7) == "alice"
    finally:
        await log.close()
        await client.aclose()


async def test_the_mock_source_survives_a_redis_outage(redis: RedisServer, base: Settings) -> None:
    settings = on(redis, base).model_copy(
        update={"interval": 0.02, "backoff": BackoffSettings(initial=0.02, max=0.1)}
    )
    async with serving(settings) as server:
        assert server._log is not None
        channel = channel_for(server.settings)
        try:
            with contextlib.suppress(GRPCError):  # it ends when Redis comes back empty
                async with subscription(channel, 3) as sub:
                    assert data(await messages(sub, 1)) == ["data mock for: 3"]
                    await redis.kill()  # the mock's next emits fail
                    async with asyncio.timeout(TIMEOUT):
                        await server._log.disconnected.wait()
        finally:
            channel.close()
        await redis.start()
        async with asyncio.timeout(TIMEOUT):
            await server._log.connected.wait()
        channel = channel_for(server.settings)
        try:
            async with subscription(channel, 3) as sub:
                assert data(await messages(sub, 1)) == ["data mock for: 3"]
        finally:
            channel.close()


async def test_typed_payloads_travel_through_redis(redis: RedisServer, base: Settings) -> None:
    settings = on(redis, base)
    async with (
        serving(settings) as a,
        serving(settings) as b,
        ResilientClient(4, settings=b.settings) as client,
    ):
        events = client.events(Request)
        first = asyncio.ensure_future(anext(events))
        async with asyncio.timeout(TIMEOUT):
            await client.connected.wait()
            published = await a.emit(payload=Request(id=9, topics=["x"]), to=4)
            event = await first
        assert (event.payload, event.token) == (
            Request(id=9, topics=["x"]),
            published.position.token,
        )


# ------------------------------------------------------------------------ keyed state


def stock(n: int, version: int = 0) -> Item:
    return Item(sku=f"k{n}", count=n, price=version)


async def test_keyed_state_is_shared_by_replicas_and_loaded_by_a_new_one(
    redis: RedisServer, base: Settings
) -> None:
    settings = on(redis, base)
    async with asyncio.timeout(30), serving(settings) as a, serving(settings) as b:
        async with WatchCache(Item, 1, topic="stock", settings=b.settings) as cache:
            for n in range(60):  # changes through both replicas while the cache syncs
                replica = a if n % 2 else b
                if n % 7 == 6:
                    last = await replica.delete(f"k{n % 10}", topic="stock")
                else:
                    last = await replica.put(f"k{n % 10}", stock(n % 10, n), topic="stock")
            await read_up_to(last, a, b)
            expected = a.items(Item, topic="stock")
            await converged(cache, lambda: expected, timeout=TIMEOUT)
            assert b.items(Item, topic="stock") == expected
            assert cache.snapshots == 1
        direct = settings.model_copy(update={"publish": PublishSettings(via="redis")})
        async with Publisher(settings=direct) as publisher:
            await publisher.put("k-direct", stock(99), topic="stock")
        expected["k-direct"] = stock(99)
        async with serving(settings) as late:  # it starts after every change: Redis has the state
            assert late.items(Item, topic="stock") == expected
            async with WatchCache(Item, 2, topic="stock", settings=late.settings) as cache:
                await converged(cache, lambda: expected, timeout=TIMEOUT)


async def test_the_keyed_state_bound_holds_across_replicas(
    redis: RedisServer, base: Settings
) -> None:
    settings = on(redis, base).model_copy(update={"state": StateSettings(max_keys=2)})
    async with serving(settings) as a, serving(settings) as b:
        await a.put("one", stock(1))
        await b.put("two", stock(2))
        with pytest.raises(StateFull, match=r"as many keys as the replicas allow"):
            await a.put("three", stock(3))
        await b.put("one", stock(11))  # an existing key still changes
        await a.delete("two")
        await read_up_to(await b.put("three", stock(3)), a, b)
        assert a.items(Item) == b.items(Item) == {"one": stock(11), "three": stock(3)}


async def read_up_to(published: Published, *replicas: SubscriptionManager) -> None:
    """Wait until every replica's reader has delivered the event ``published``."""
    async with asyncio.timeout(TIMEOUT):
        for replica in replicas:
            await replica.hub.reach(published.position.seq)


async def test_a_cache_resyncs_to_what_redis_holds_after_losing_its_data(
    redis: RedisServer, base: Settings
) -> None:
    settings = on(redis, base).model_copy(
        update={"backoff": BackoffSettings(initial=0.02, max=0.1)}
    )
    async with serving(settings) as server:
        for n in range(5):
            last = await server.put(f"k{n}", stock(n), topic="stock")
        await read_up_to(last, server)
        async with WatchCache(Item, 1, topic="stock", settings=server.settings) as cache:
            await converged(cache, lambda: server.items(Item, topic="stock"), timeout=TIMEOUT)
            seen: list[Change[Item]] = []
            cache.on_change(seen.append)
            await redis.restart()  # persistence off: the stream, its epoch and the state go
            assert server._log is not None
            await cache_until(cache, lambda: cache.snapshots >= 2, timeout=TIMEOUT)
            assert cache.items() == {}
            assert sorted((c.type, c.key) for c in seen) == [("deleted", f"k{n}") for n in range(5)]
            await server.put("k-new", stock(7), topic="stock", idempotency_key="new")
            await converged(cache, lambda: {"k-new": stock(7)}, timeout=TIMEOUT)


async def test_keys_and_topics_that_share_bytes_stay_apart_in_redis(
    redis: RedisServer, base: Settings
) -> None:
    """The state hash once joined topic and key with a NUL: ("a", "b\\0c") and ("a\\0b", "c")
    were the same field, and a replica loading the state got one value in the wrong place."""
    settings = on(redis, base)
    async with serving(settings) as a:
        await a.put("b\0c", stock(1), topic="a")
        await read_up_to(await a.put("c", stock(2), topic="a\0b"), a)
        async with serving(settings) as late:
            assert late.items(Item, topic="a") == {"b\0c": stock(1)}
            assert late.items(Item, topic="a\0b") == {"c": stock(2)}


async def test_a_publisher_straight_to_redis_honours_the_replicas_bound(
    redis: RedisServer, base: Settings
) -> None:
    settings = on(redis, base).model_copy(update={"state": StateSettings(max_keys=1)})
    async with serving(settings) as server:
        # the publisher's own settings do not say what the replicas allow
        direct = on(redis, base).model_copy(update={"publish": PublishSettings(via="redis")})
        async with Publisher(settings=direct) as publisher:
            await publisher.put("one", stock(1))
            with pytest.raises(PublishRefused, match=r"RESOURCE_EXHAUSTED.*replicas allow"):
                await publisher.put("two", stock(2))
        await read_up_to(await server.put("one", stock(11)), server)
        assert server.items(Item) == {"one": stock(11)}


async def test_a_replica_puts_its_initial_state_before_it_listens(
    redis: RedisServer, base: Settings
) -> None:
    """``prepare()`` puts through Redis; the replica must have read it all back before its
    first subscriber can take a snapshot."""

    class Stocked(SubscriptionManager):
        async def prepare(self) -> None:
            for n in range(50):
                await self.put(f"k{n}", stock(n), topic="stock")

    settings = on(redis, base)
    sock = socket.create_server(("127.0.0.1", 0))
    server = Stocked(settings.model_copy(update={"address": f"127.0.0.1:{sock.getsockname()[1]}"}))
    await server.start(sock=sock)
    try:
        assert len(server.items(Item, topic="stock")) == 50
    finally:
        await server.close()
