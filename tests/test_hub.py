"""The hub alone: queues, replacement, overflow, ending."""

from __future__ import annotations

import asyncio

from longlived import EndReason, Hub


async def test_register_replaces_and_release_never_removes_the_newer() -> None:
    hub = Hub(queue_size=4)
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


async def test_overflow_ends_only_the_slow_subscriber() -> None:
    hub = Hub(queue_size=2)
    slow, fast = hub.register(1), hub.register(2)
    for n in range(3):
        assert hub.publish(f"{n}".encode()) >= 1
        assert await fast.take() == [f"{n}".encode()]
    assert slow.end_reason is EndReason.TOO_SLOW
    assert slow.queued == 0  # its memory is released at once
    assert hub.ids() == [2]
    assert await slow.take() == []


async def test_unsubscribe_delivers_what_was_queued_then_ends() -> None:
    hub = Hub(queue_size=8)
    sub = hub.register(3)
    hub.send(3, b"a")
    hub.send(3, b"b")
    assert hub.end(3, EndReason.UNSUBSCRIBED)
    assert not hub.end(3, EndReason.UNSUBSCRIBED)
    assert await sub.take() == [b"a", b"b"]
    assert await sub.take() == []


async def test_take_batches_everything_queued() -> None:
    hub = Hub(queue_size=100)
    sub = hub.register(1)
    waiter = asyncio.ensure_future(sub.take())
    await asyncio.sleep(0)
    assert not waiter.done()
    for n in range(5):
        hub.send(1, bytes([n]))
    async with asyncio.timeout(1):
        assert await waiter == [bytes([n]) for n in range(5)]


async def test_wait_for_wakes_on_changes() -> None:
    hub = Hub(queue_size=1)
    waiter = asyncio.ensure_future(hub.wait_for(lambda: 5 in hub))
    await asyncio.sleep(0)
    assert not waiter.done()
    hub.register(5)
    async with asyncio.timeout(1):
        await waiter


async def test_send_to_unknown_id_is_false() -> None:
    hub = Hub(queue_size=1)
    assert not hub.send(1, b"x")
    assert hub.publish(b"x", ids=[1, 2]) == 0
