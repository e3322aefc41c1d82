"""Keyed state: snapshot + SYNCED + changes, resync instead of RESET, and ``WatchCache``."""

from __future__ import annotations

import asyncio
import random
import socket

import pytest

from examples.inventory._proto.inventory import Item
from longlived import (
    Change,
    Hub,
    Publisher,
    PublishRefused,
    QueueSettings,
    ReplaySettings,
    ResilientClient,
    Response,
    ResponseKind,
    Settings,
    StateFull,
    StateSettings,
    SubscriptionManager,
    WatchCache,
    pack,
    unpack,
)
from longlived._wire import encode_message
from longlived.hub import Policy
from tests.helpers import converged, running
from tests.proxy import proxy_to

TIMEOUT = 20
TOPIC = "inventory"
SNAPSHOT, SYNCED, DATA = ResponseKind.SNAPSHOT, ResponseKind.SYNCED, ResponseKind.DATA


def make_hub(*, history: int = 100, queue: int = 100, policy: Policy = "disconnect") -> Hub:
    return Hub(
        encode=encode_message,
        queue_size=queue,
        history_size=history,
        policy=policy,
        epoch="e1",
        max_keys=3,
    )


def put(hub: Hub, key: str, count: int, topic: str = TOPIC) -> None:
    hub.emit(topic=topic, key=key, payload=bytes(pack(Item(sku=key, count=count))))


def seen(messages: list[bytes] | None) -> list[tuple[ResponseKind, str, int | None, bool]]:
    """(kind, key, count or None, deleted) of each message."""
    assert messages is not None
    out = []
    for response in map(Response.FromString, messages):
        count = unpack(response.payload, Item).count if response.payload else None
        out.append((response.kind, response.key, count, response.deleted))
    return out


# ------------------------------------------------------------------------ the hub


async def test_a_snapshot_subscriber_gets_every_value_then_synced_then_changes() -> None:
    hub = make_hub()
    put(hub, "a", 1)
    put(hub, "b", 2)
    put(hub, "a", 3)
    put(hub, "x", 9, topic="other")
    hub.emit(topic=TOPIC, key="b", deleted=True)
    sub = hub.register(1, topics=[TOPIC], snapshot=True)
    put(hub, "c", 4)
    batch = await sub.take()
    assert seen(batch) == [
        (SNAPSHOT, "a", 3, False),
        (SYNCED, "", None, False),
        (DATA, "c", 4, False),
    ]
    snapshot, synced, _ = map(Response.FromString, batch or [])
    assert snapshot.token == ""  # a cut snapshot must not be resumed from its middle
    assert synced.token == "e1:5"  # consistent with the position before "c"


async def test_a_token_the_history_lost_gets_a_fresh_snapshot_not_reset() -> None:
    hub = make_hub(history=2)
    put(hub, "a", 1)
    token = hub.head.token
    for count in range(2, 6):
        put(hub, "b", count)
    sub = hub.register(1, topics=[TOPIC], resume=token, snapshot=True)
    assert seen(await sub.take()) == [
        (SNAPSHOT, "a", 1, False),
        (SNAPSHOT, "b", 5, False),
        (SYNCED, "", None, False),
    ]
    assert hub.stats.resyncs == 1
    assert hub.stats.resets == 0
    # a token it can honour is resumed as before: only what was missed
    token = hub.head.token
    put(hub, "a", 7)
    again = hub.register(2, topics=[TOPIC], resume=token, snapshot=True)
    assert seen(await again.take()) == [(DATA, "a", 7, False)]


async def test_a_foreign_epoch_says_why_it_resyncs() -> None:
    hub = make_hub()
    put(hub, "a", 1)
    sub = hub.register(1, resume="another-epoch:3", snapshot=True)
    *_, synced = map(Response.FromString, await sub.take() or [])
    assert synced.kind == SYNCED
    assert "another epoch" in synced.data


async def test_the_drop_policy_resnapshots_a_keyed_subscriber() -> None:
    hub = make_hub(queue=2, policy="drop")
    sub = hub.register(1, topics=[TOPIC], snapshot=True)
    await sub.take()  # the empty snapshot
    put(hub, "a", 1)
    put(hub, "b", 2)
    put(hub, "a", 3)  # overflows: what was queued is replaced by the state at this event
    assert seen(await sub.take()) == [
        (SNAPSHOT, "a", 3, False),
        (SNAPSHOT, "b", 2, False),
        (SYNCED, "", None, False),
    ]
    assert hub.stats.resyncs == 1


async def test_the_state_is_bounded_and_a_refused_put_emits_nothing() -> None:
    hub = make_hub()  # three keys at most
    for key in "abc":
        put(hub, key, 1)
    head = hub.head
    with pytest.raises(StateFull, match=r"holds 3 keys.*'d' on topic 'inventory'"):
        put(hub, "d", 1)
    assert hub.head == head
    put(hub, "a", 2)  # existing keys still change
    hub.emit(topic=TOPIC, key="b", deleted=True)
    put(hub, "d", 1)  # room again
    assert len(hub.state) == 3


# ------------------------------------------------------------------ the server API


@pytest.fixture
def keyed(quiet: Settings) -> Settings:
    return quiet.model_copy(update={"source": "none"})


async def test_put_and_delete_are_refused_when_malformed(
    listener: socket.socket, keyed: Settings
) -> None:
    async with running(keyed, listener) as server:
        with pytest.raises(ValueError, match="needs a payload"):
            await server.emit(topic=TOPIC, key="a")
        with pytest.raises(ValueError, match="not to one id"):
            await server.emit(to=3, key="a", payload=Item(sku="a"))
        with pytest.raises(ValueError, match="at most 256"):
            await server.put("k" * 300, Item(sku="a"))
        async with Publisher(settings=keyed) as publisher:
            with pytest.raises(PublishRefused, match=r"INVALID_ARGUMENT.*needs the key"):
                await publisher.delete("")
            await publisher.put("a", Item(sku="a", count=2), topic=TOPIC)
            assert server.get("a", Item, topic=TOPIC) == Item(sku="a", count=2)
            await publisher.delete("a", topic=TOPIC)
            assert server.items(Item, topic=TOPIC) == {}


async def test_a_publisher_put_beyond_the_bound_is_refused_with_its_reason(
    listener: socket.socket, keyed: Settings
) -> None:
    bounded = keyed.model_copy(update={"state": StateSettings(max_keys=1)})
    async with running(bounded, listener) as server, Publisher(settings=bounded) as publisher:
        await publisher.put("a", Item(sku="a"), topic=TOPIC)
        with pytest.raises(PublishRefused, match=r"RESOURCE_EXHAUSTED.*state\.max_keys"):
            await publisher.put("b", Item(sku="b"), topic=TOPIC)
        assert list(server.items(Item, topic=TOPIC)) == ["a"]


# --------------------------------------------------------------------- WatchCache


class Recorder:
    """A cache's changes as its handler saw them, checked as they come: a key's version
    (the item's ``price``) only ever moves forward, so a change applied twice or out of
    order across a snapshot boundary fails the test."""

    def __init__(self, cache: WatchCache[Item]) -> None:
        self.changes: list[Change[Item]] = []
        self.versions: dict[str, int] = {}
        cache.on_change(self.record)

    def record(self, change: Change[Item]) -> None:
        self.changes.append(change)
        if change.type != "deleted":
            assert change.value.price > self.versions.get(change.key, -1), change
            self.versions[change.key] = change.value.price


class Changer:
    """Random puts and deletes over a few keys; every put carries a new version."""

    def __init__(self, server: SubscriptionManager, *, keys: int = 40, seed: int = 1) -> None:
        self.server = server
        self.rng = random.Random(seed)
        self.keys = [f"k{n}" for n in range(keys)]
        self.version = 0

    async def change(self, *, name: str = "") -> None:
        key = self.rng.choice(self.keys)
        if self.rng.random() < 0.25:
            await self.server.delete(key, topic=TOPIC)
        else:
            self.version += 1
            item = Item(sku=key, name=name, count=self.rng.randint(1, 99), price=self.version)
            await self.server.put(key, item, topic=TOPIC)

    def state(self) -> dict[str, Item]:
        return self.server.items(Item, topic=TOPIC)


async def test_caches_joining_under_a_stream_of_changes_end_equal_to_the_server(
    listener: socket.socket, keyed: Settings
) -> None:
    async with running(keyed, listener) as server, asyncio.TaskGroup() as tasks:
        changer = Changer(server)
        caches: list[tuple[WatchCache[Item], Recorder]] = []
        try:
            for n in range(8):
                cache = WatchCache(Item, n, topic=TOPIC, settings=keyed)
                caches.append((cache, Recorder(cache)))
                tasks.create_task(cache.run())
                for _ in range(150):  # changes flow while it subscribes and syncs
                    await changer.change()
                    if _ % 10 == 0:
                        await asyncio.sleep(0)  # let the streams be written meanwhile
            for cache, _recorder in caches:
                await converged(cache, changer.state, timeout=TIMEOUT)
                assert cache.snapshots == 1
                assert cache.client.duplicates == 0
        finally:
            for cache, _ in caches:
                await cache.aclose()
    assert len(changer.state()) > 10


async def test_a_frozen_cache_is_ended_and_catches_up_by_resume(
    listener: socket.socket, keyed: Settings
) -> None:
    await frozen_cache_catches_up(listener, keyed, policy="disconnect", history=100_000)


async def test_a_frozen_cache_is_ended_and_resnapshots_past_the_history(
    listener: socket.socket, keyed: Settings
) -> None:
    await frozen_cache_catches_up(listener, keyed, policy="disconnect", history=10)


async def test_a_frozen_cache_under_the_drop_policy_resnapshots(
    listener: socket.socket, keyed: Settings
) -> None:
    await frozen_cache_catches_up(listener, keyed, policy="drop", history=100_000)


async def frozen_cache_catches_up(
    listener: socket.socket, keyed: Settings, *, policy: Policy, history: int
) -> None:
    """A cache behind a proxy that stops forwarding: the server's queue for it overflows
    while changes flow; once the proxy forwards again the cache converges."""
    slow = keyed.model_copy(
        update={
            "queue": QueueSettings(size=8, policy=policy),
            "replay": ReplaySettings(size=history),
        }
    )
    port = listener.getsockname()[1]
    async with (
        running(slow, listener) as server,
        proxy_to(("127.0.0.1", port)) as (proxy, proxy_port),
    ):
        changer = Changer(server)
        for _ in range(20):
            await changer.change()
        behind = slow.model_copy(update={"address": f"127.0.0.1:{proxy_port}"})
        async with WatchCache(Item, 1, topic=TOPIC, settings=behind) as cache:
            recorder = Recorder(cache)
            await converged(cache, changer.state, timeout=TIMEOUT)
            proxy.freeze()
            filler = "x" * 4096  # fills the windows and socket buffers in fewer changes
            for _ in range(5000):
                await changer.change(name=filler)
                if server.hub.stats.slow:
                    break
                await asyncio.sleep(0)  # the writer runs and blocks on the frozen peer
            assert server.hub.stats.slow, "the frozen cache never fell behind"
            for _ in range(20):  # and changes go on after it
                await changer.change()
            proxy.thaw()
            await converged(cache, changer.state, timeout=TIMEOUT)
        resnapshot = policy == "drop" or history < 1000
        assert cache.snapshots == (2 if resnapshot else 1)
        # the drop policy may resnapshot more than once while frozen; the cache sees the last
        assert (server.hub.stats.resyncs >= 1) if resnapshot else server.hub.stats.resyncs == 0
        assert recorder.changes, "the handler saw the changes"


async def test_a_cache_closed_before_it_began_closes_quietly() -> None:
    nowhere = Settings(address="127.0.0.1:9")  # never reached: the cache closes first
    async with WatchCache(Item, 1, topic=TOPIC, settings=nowhere) as cache:
        pass  # leaving at once: the cache's task has not run yet
    assert not cache.synced
    with pytest.raises(RuntimeError, match="ended before its first snapshot"):
        await cache.wait_synced()


async def test_typed_events_of_a_snapshot_client_skip_synced_and_deletes(
    listener: socket.socket, keyed: Settings
) -> None:
    """``events(M)`` unpacked every message: SYNCED and deletes carry no payload, and it
    raised PayloadTypeError at the first one."""
    async with running(keyed, listener) as server:
        await server.put("a", Item(sku="a", count=1), topic=TOPIC)
        client = ResilientClient(1, settings=keyed, topics=[TOPIC], snapshot=True)
        async with client:
            events = client.events(Item)
            async with asyncio.timeout(TIMEOUT):
                first = await anext(events)  # the snapshot's one value
                await server.delete("a", topic=TOPIC)
                await server.put("b", Item(sku="b", count=2), topic=TOPIC)
                second = await anext(events)
        assert (first.key, first.payload.count) == ("a", 1)
        assert (second.key, second.payload.count) == ("b", 2)


async def test_a_resume_waiting_for_a_lagging_replica_ends_when_the_log_is_replaced() -> None:
    hub = make_hub()
    waiting = asyncio.ensure_future(hub.reach(150))
    await asyncio.sleep(0)
    hub.start_at("e1", 200)  # the reader followed a log that is already past it
    async with asyncio.timeout(TIMEOUT):
        await waiting
    waiting = asyncio.ensure_future(hub.reach(500))
    await asyncio.sleep(0)
    hub.log_lost("e2", 3)  # another epoch: 500 means nothing there, the resume goes on
    async with asyncio.timeout(TIMEOUT):
        await waiting
