"""The hub alone: positions, history, replay, queues, replacement, overflow."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Iterator

import pytest

from longlived import EndReason, Event, Hub, Kind, Position, Response, ResponseKind
from longlived._aio import _NO_WAITERS, SparseEvent
from longlived._wire import encode_message
from longlived.hub import Policy
from longlived.subscriber import Subscriber


def make_hub(
    *, queue_size: int = 100, history_size: int = 100, policy: Policy = "disconnect"
) -> Hub:
    return Hub(
        encode=encode_message,
        queue_size=queue_size,
        history_size=history_size,
        policy=policy,
        epoch="e1",
    )


def decode(messages: list[bytes] | None) -> list[tuple[ResponseKind, str, int]]:
    assert messages is not None
    return [(r.kind, r.data, r.seq) for r in map(Response.FromString, messages)]


DATA, RESET = ResponseKind.DATA, ResponseKind.RESET


def test_positions_and_tokens_round_trip() -> None:
    position = Position("abc", 42)
    assert Position.parse(position.token) == position
    for bad in ["", "abc", "abc:", ":1", "abc:-1", "abc:x", "abc:" + "9" * 30]:
        assert Position.parse(bad) is None


async def test_register_replaces_and_release_never_removes_the_newer() -> None:
    hub = make_hub()
    old = hub.register(1)
    new = hub.register(1)
    assert old.end_reason is EndReason.REPLACED
    assert hub.get(1) is new
    hub.release(old)
    assert hub.get(1) is new
    assert hub.open_streams == 1
    hub.release(new)
    assert hub.ids() == []
    assert hub.open_streams == 0


async def test_events_are_encoded_once_with_their_position() -> None:
    hub = make_hub()
    one, two = hub.register(1), hub.register(2)
    position = hub.publish("hello", topic="news")
    assert position == Position("e1", 1) == hub.head
    first, second = await one.take(), await two.take()
    assert first is not None
    assert second is not None
    assert first == second
    assert first[0] is second[0]  # the very same bytes object
    response = Response.FromString(first[0])
    assert (response.data, response.seq, response.token, response.topic) == (
        "hello",
        1,
        "e1:1",
        "news",
    )


async def test_topics_filter_and_send_reaches_one_id() -> None:
    hub = make_hub()
    news, all_topics = hub.register(1, topics=["news"]), hub.register(2)
    hub.publish("a", topic="news")
    hub.publish("b", topic="sport")
    hub.send(1, "for one")
    hub.send(2, "for two")
    assert decode(await news.take()) == [(DATA, "a", 1), (DATA, "for one", 3)]
    assert decode(await all_topics.take()) == [(DATA, "a", 1), (DATA, "b", 2), (DATA, "for two", 4)]


async def test_resume_replays_exactly_what_was_missed() -> None:
    hub = make_hub()
    for n in range(1, 6):
        hub.publish(f"e{n}", topic="even" if n % 2 == 0 else "odd")
    hub.send(9, "for nine")  # seq 6
    hub.send(8, "for eight")  # seq 7
    sub = hub.register(9, topics=["odd"], resume="e1:2")
    hub.publish("e8", topic="odd")  # live, after the replay
    assert decode(await sub.take()) == [
        (DATA, "e3", 3),
        (DATA, "e5", 5),
        (DATA, "for nine", 6),
        (DATA, "e8", 8),
    ]


async def test_resume_at_head_replays_only_a_heartbeat_at_the_position() -> None:
    hub = make_hub()
    hub.publish("x")
    sub = hub.register(1, resume=hub.head.token)
    assert decode(await sub.take()) == [(ResponseKind.HEARTBEAT, "", 1)]


async def test_control_subscriber_learns_its_position_first_seed_does_not() -> None:
    hub = make_hub()
    hub.publish("before")
    control, seed = hub.register(1, control=True), hub.register(2)
    hub.publish("after")
    assert decode(await control.take()) == [(ResponseKind.HEARTBEAT, "", 1), (DATA, "after", 2)]
    assert decode(await seed.take()) == [(DATA, "after", 2)]


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("garbage", "malformed"),
        ("other:1", "another epoch"),
        ("e1:99", "future"),
        ("e1:1", "older than the retained history"),
    ],
)
async def test_unusable_resume_token_gets_one_reset_then_live(token: str, reason: str) -> None:
    hub = make_hub(history_size=3)
    for n in range(6):
        hub.publish(f"e{n}")
    sub = hub.register(1, resume=token)
    hub.publish("live")
    messages = decode(await sub.take())
    assert messages[0][0] is RESET
    assert reason in messages[0][1]
    assert messages[0][2] == 6  # the position it continues from
    assert messages[1:] == [(DATA, "live", 7)]


async def test_resume_from_just_before_the_oldest_retained_event_works() -> None:
    hub = make_hub(history_size=3)
    for n in range(1, 7):
        hub.publish(f"e{n}")
    sub = hub.register(1, resume="e1:3")  # 4, 5, 6 are retained
    assert decode(await sub.take()) == [(DATA, "e4", 4), (DATA, "e5", 5), (DATA, "e6", 6)]


async def test_disconnect_policy_ends_only_the_slow_subscriber() -> None:
    hub = make_hub(queue_size=2)
    slow, fast = hub.register(1), hub.register(2)
    for n in range(3):
        hub.publish(f"{n}")
        assert decode(await fast.take()) == [(DATA, f"{n}", n + 1)]
    assert slow.end_reason is EndReason.TOO_SLOW
    assert slow.queued == 0  # its memory is released at once
    assert hub.ids() == [2]
    assert await slow.take() is None


async def test_drop_policy_discards_and_marks_the_gap_with_reset() -> None:
    hub = make_hub(queue_size=2, policy="drop")
    slow = hub.register(1, control=True)
    seed = hub.register(2)  # an original-style subscriber never sees RESET
    for n in range(1, 5):
        hub.publish(f"e{n}")
    assert slow.end_reason is None
    assert decode(await slow.take()) == [
        (RESET, "subscriber too slow: events dropped", 3),
        (DATA, "e4", 4),
    ]
    assert decode(await seed.take()) == [(DATA, "e4", 4)]


async def test_replay_does_not_count_against_the_live_bound() -> None:
    hub = make_hub(queue_size=2, history_size=100)
    for n in range(10):
        hub.publish(f"e{n}")
    sub = hub.register(1, resume="e1:0")
    hub.publish("live1")
    hub.publish("live2")
    assert sub.end_reason is None
    messages = decode(await sub.take())
    assert len(messages) == 12


async def test_unsubscribe_delivers_what_was_queued_then_ends() -> None:
    hub = make_hub()
    sub = hub.register(3)
    hub.send(3, "a")
    hub.send(3, "b")
    assert hub.end(3, EndReason.UNSUBSCRIBED)
    assert not hub.end(3, EndReason.UNSUBSCRIBED)
    assert decode(await sub.take()) == [(DATA, "a", 1), (DATA, "b", 2)]
    assert await sub.take() is None


async def test_take_batches_and_idle_returns_empty() -> None:
    hub = make_hub()
    sub = hub.register(1)
    assert await sub.take(idle=0.01) == []
    waiter = asyncio.ensure_future(sub.take())
    await asyncio.sleep(0)
    assert not waiter.done()
    for n in range(5):
        hub.send(1, f"{n}")
    async with asyncio.timeout(1):
        assert len(await waiter or []) == 5


async def test_heartbeat_carries_the_head_position() -> None:
    hub = make_hub()
    hub.publish("x")
    hub.publish("y")
    beat = Response.FromString(hub.heartbeat())
    assert (beat.kind, beat.seq, beat.token) == (ResponseKind.HEARTBEAT, 2, "e1:2")
    assert Kind.HEARTBEAT.value == ResponseKind.HEARTBEAT.value


async def test_wait_for_wakes_on_changes() -> None:
    hub = make_hub()
    waiter = asyncio.ensure_future(hub.wait_for(lambda: 5 in hub))
    await asyncio.sleep(0)
    assert not waiter.done()
    hub.register(5)
    async with asyncio.timeout(1):
        await waiter


class CountingHistory(collections.deque[Event]):
    """A history that counts the events a lookup looks at."""

    looked = 0

    def __iter__(self) -> Iterator[Event]:
        for event in super().__iter__():
            self.looked += 1
            yield event

    def __reversed__(self) -> Iterator[Event]:
        for event in super().__reversed__():
            self.looked += 1
            yield event


def test_resume_looks_only_at_what_was_missed() -> None:
    """Every resume used to scan the whole history (14 ms at a million events)."""
    hub = make_hub(history_size=10_000)
    hub._history = CountingHistory(maxlen=10_000)
    for n in range(10_000):
        hub.publish(str(n))
    sub = hub.register(1, resume=Position("e1", 9_997).token)
    assert [data for _, data, _ in decode(list(sub._queue))] == ["9997", "9998", "9999"]
    assert hub._history.looked == 4  # the three missed, and the one that ends the walk


async def test_a_backfill_with_nothing_missed_marks_the_registration_not_the_head() -> None:
    """Live events queued during a slow backfill used to follow a HEARTBEAT at the newer
    head, so a client dropped them as already seen."""
    hub = make_hub(history_size=2)
    release: asyncio.Future[list[bytes] | str] = asyncio.get_running_loop().create_future()

    async def backfill(after: int, upto: int, id: int, topics: frozenset[str]) -> list[bytes] | str:
        return await release

    hub.backfill = backfill
    for n in range(5):
        hub.publish(str(n), topic="other")
    sub = hub.register(1, topics=["mine"], resume=Position("e1", 1).token)
    filling = asyncio.ensure_future(hub.fill(sub))
    hub.publish("live", topic="mine")  # arrives while the log is being read
    release.set_result([])
    await filling
    got = decode(await sub.take())
    assert got == [(ResponseKind.HEARTBEAT, "", 5), (ResponseKind.DATA, "live", 6)]


async def test_live_events_during_a_backfill_do_not_make_the_subscriber_too_slow() -> None:
    """Its writer waits for the shared log: what arrives meanwhile is not lag."""
    hub = make_hub(queue_size=2, history_size=2)
    release: asyncio.Future[list[bytes] | str] = asyncio.get_running_loop().create_future()

    async def backfill(after: int, upto: int, id: int, topics: frozenset[str]) -> list[bytes] | str:
        return await release

    hub.backfill = backfill
    for n in range(5):
        hub.publish(str(n))
    sub = hub.register(1, resume=Position("e1", 1).token)
    filling = asyncio.ensure_future(hub.fill(sub))
    for n in range(3):  # over the bound of 2, under twice it
        hub.publish(f"live {n}")
    assert sub.end_reason is None
    release.set_result([])
    await filling
    got = [data for _, data, _ in decode(await sub.take())]
    assert got == ["3", "4", "live 0", "live 1", "live 2"]


# -------------------------------------------------------------- the writer's sink


class Sink:
    """A subscriber's sink that takes messages while ``open``."""

    def __init__(self) -> None:
        self.open = True
        self.taken: list[bytes] = []
        self.at: list[float] = []

    def __call__(self, message: bytes) -> bool:
        if self.open:
            self.taken.append(message)
            self.at.append(asyncio.get_running_loop().time())
        return self.open


async def parked(sub: Subscriber, idle: float | None = None) -> asyncio.Task[list[bytes] | None]:
    """``sub``'s writer, waiting in ``take()`` with nothing queued."""
    task = asyncio.create_task(sub.take(idle=idle))
    await asyncio.sleep(0)  # one turn: the task runs up to its wait
    assert not task.done()
    return task


async def test_a_message_the_sink_declines_is_not_overtaken() -> None:
    hub = make_hub()
    sub = hub.register(1)
    sub.sink = sink = Sink()
    writer = await parked(sub)
    hub.publish("a")  # the writer is idle: written at once, nothing queued
    assert decode(sink.taken) == [(DATA, "a", 1)]
    assert sub.queued == 0
    assert not writer.done()
    sink.open = False
    hub.publish("b")  # declined: queued, the writer woken
    sink.open = True
    hub.publish("c")  # the sink would take it, but "b" is ahead of it
    assert decode(await writer) == [(DATA, "b", 2), (DATA, "c", 3)]
    assert len(sink.taken) == 1


async def test_replayed_messages_are_not_overtaken_by_live_ones() -> None:
    hub = make_hub()
    sub = hub.register(1)
    sub.sink = sink = Sink()
    writer = await parked(sub)
    sub.replay([encode_message(Kind.DATA, Position("e1", 7), "missed", "")])
    hub.publish("live")
    assert [d for _, d, _ in decode(await writer)] == ["missed", "live"]
    assert sink.taken == []


async def test_messages_through_the_sink_keep_the_heartbeat_away() -> None:
    """A stream kept busy by the sink is not idle: the heartbeat waits a full period
    after the last of its messages."""
    hub = make_hub()
    sub = hub.register(1, control=True)
    assert decode(await sub.take())[0][0] == ResponseKind.HEARTBEAT  # the opening position
    sub.sink = sink = Sink()
    idle = 0.2
    loop = asyncio.get_running_loop()
    writer = await parked(sub, idle)
    ended: list[float] = []
    writer.add_done_callback(lambda _: ended.append(loop.time()))
    started = loop.time()
    async with asyncio.timeout(10):
        while loop.time() < started + 2 * idle:  # messages for twice the idle period
            hub.publish("busy")
            await asyncio.sleep(idle / 8)
        assert await writer == []
    assert len(sink.taken) >= 2
    assert ended[0] >= sink.at[-1] + idle


@pytest.mark.parametrize("kind", [asyncio.Event, SparseEvent])
async def test_a_sparse_event_behaves_as_an_asyncio_event(kind: type[asyncio.Event]) -> None:
    """``SparseEvent`` (a subscriber's ``aborted``, a server stream's ``window_updated``)
    shares one empty deque until it is first waited on: two of them must never wake each
    other's waiters, and a cancelled waiter must leave no trace."""
    one, other = kind(), kind()
    waiting = [asyncio.ensure_future(one.wait()) for _ in range(2)]
    elsewhere = asyncio.ensure_future(other.wait())
    cancelled = asyncio.ensure_future(other.wait())
    await asyncio.sleep(0)  # every waiter is parked now
    cancelled.cancel()
    one.set()
    async with asyncio.timeout(5):
        assert await asyncio.gather(*waiting) == [True, True]
    await asyncio.sleep(0)
    assert not elsewhere.done()
    assert cancelled.cancelled()
    assert one.is_set()
    assert not other.is_set()
    one.clear()
    again = asyncio.ensure_future(one.wait())
    await asyncio.sleep(0)
    assert not again.done()
    one.set()
    other.set()
    async with asyncio.timeout(5):
        assert await again
        assert await elsewhere
    fresh = kind()
    fresh.set()
    async with asyncio.timeout(5):
        assert await fresh.wait() is True
    assert len(_NO_WAITERS) == 0
