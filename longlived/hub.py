"""The event core: subscribers, their bounded queues, and fan-out.

The hub knows nothing of gRPC. It holds one ``Subscriber`` per id; each has a bounded queue
of already-encoded messages (bytes), so an event is encoded once and the same bytes go to
every subscriber. Putting into a queue never waits: a subscriber whose queue is full is
ended as too slow, and nobody else notices.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections import deque
from collections.abc import Callable, Iterable

__all__ = ["EndReason", "Hub", "Subscriber"]

log = logging.getLogger(__name__)


class EndReason(enum.Enum):
    """Why the hub ended a subscriber's stream."""

    UNSUBSCRIBED = "unsubscribed"
    """``Unsubscribe`` was called for its id; queued messages are still delivered."""
    REPLACED = "replaced"
    """A newer ``Subscribe`` with the same id took its place."""
    TOO_SLOW = "subscriber too slow"
    """Its queue overflowed."""
    SHUTDOWN = "server shutting down"
    """The server is closing."""


class Subscriber:
    """One open subscription: an id, a bounded queue of encoded messages, an end reason."""

    __slots__ = ("_queue", "_wake", "end_reason", "ended", "id", "limit")

    def __init__(self, id: int, *, limit: int) -> None:
        self.id = id
        self.limit = limit
        self.end_reason: EndReason | None = None
        self.ended = asyncio.Event()
        """Set once the subscription has ended (a writer blocked on the peer can race it)."""
        self._queue: deque[bytes] = deque()
        self._wake = asyncio.Event()

    def __repr__(self) -> str:
        return f"<Subscriber id={self.id} queued={len(self._queue)} end={self.end_reason}>"

    @property
    def queued(self) -> int:
        """Messages waiting to be written."""
        return len(self._queue)

    def offer(self, message: bytes) -> bool:
        """Queue ``message`` without waiting; False if ended or (now) too slow."""
        if self.end_reason is not None:
            return False
        if len(self._queue) >= self.limit:
            self.end(EndReason.TOO_SLOW)
            return False
        self._queue.append(message)
        self._wake.set()
        return True

    def end(self, reason: EndReason) -> None:
        """End the subscription; the first reason wins."""
        if self.end_reason is None:
            self.end_reason = reason
            if reason is not EndReason.UNSUBSCRIBED:
                self._queue.clear()
            self.ended.set()
            self._wake.set()

    async def take(self) -> list[bytes]:
        """Wait for queued messages and take them all; ``[]`` once the subscription ended."""
        while not self._queue:
            if self.end_reason is not None:
                return []
            self._wake.clear()
            await self._wake.wait()
        batch = list(self._queue)
        self._queue.clear()
        return batch


class Hub:
    """All current subscribers by id, and the operations that reach them.

    Args:
        queue_size: bound of each subscriber's queue (messages).
    """

    def __init__(self, *, queue_size: int) -> None:
        self.queue_size = queue_size
        self._subscribers: dict[int, Subscriber] = {}
        self._open: set[Subscriber] = set()
        self._waiters: list[asyncio.Future[None]] = []

    def __len__(self) -> int:
        return len(self._subscribers)

    @property
    def open_streams(self) -> int:
        """Registered subscribers not yet released, ended ones still finishing included."""
        return len(self._open)

    def __contains__(self, id: object) -> bool:
        return id in self._subscribers

    def ids(self) -> list[int]:
        """The ids subscribed right now (a copy)."""
        return list(self._subscribers)

    def get(self, id: int) -> Subscriber | None:
        """The current subscriber for ``id``, if any."""
        return self._subscribers.get(id)

    def register(self, id: int) -> Subscriber:
        """Add a subscriber for ``id``, ending (as replaced) any previous one."""
        old = self._subscribers.get(id)
        if old is not None:
            self._end(old, EndReason.REPLACED)
        sub = Subscriber(id, limit=self.queue_size)
        self._subscribers[id] = sub
        self._open.add(sub)
        self._notify()
        return sub

    def release(self, sub: Subscriber) -> None:
        """The stream of ``sub`` has finished: forget it (never touches a newer subscriber)."""
        if self._subscribers.get(sub.id) is sub:
            del self._subscribers[sub.id]
        self._open.discard(sub)
        self._notify()

    def end(self, id: int, reason: EndReason) -> bool:
        """End the subscription of ``id``; False if there is none."""
        sub = self._subscribers.get(id)
        if sub is None:
            return False
        self._end(sub, reason)
        return True

    def end_all(self, reason: EndReason) -> None:
        """End every subscription (for example at shutdown)."""
        for sub in list(self._subscribers.values()):
            self._end(sub, reason)

    def _end(self, sub: Subscriber, reason: EndReason) -> None:
        # An ended subscriber leaves the id table at once: it receives nothing more, and
        # its id is free for a new subscription while its stream finishes.
        sub.end(reason)
        if self._subscribers.get(sub.id) is sub:
            del self._subscribers[sub.id]
            self._notify()

    def send(self, id: int, message: bytes) -> bool:
        """Queue ``message`` for ``id``; False if no such subscriber or it is too slow."""
        sub = self._subscribers.get(id)
        return sub is not None and self._offer(sub, message)

    def publish(self, message: bytes, ids: Iterable[int] | None = None) -> int:
        """Queue ``message`` for every subscriber (or those in ``ids``); returns how many."""
        targets = (
            self._subscribers.values()
            if ids is None
            else (sub for i in ids if (sub := self._subscribers.get(i)) is not None)
        )
        return sum(self._offer(sub, message) for sub in list(targets))

    def _offer(self, sub: Subscriber, message: bytes) -> bool:
        if sub.end_reason is not None:
            return False
        if sub.offer(message):
            return True
        self._end(sub, EndReason.TOO_SLOW)
        log.warning(
            "Subscriber %d is too slow (%d messages queued): ending its stream", sub.id, sub.limit
        )
        return False

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds; it is re-checked whenever subscribers change.

        Unbounded by itself: wrap it in ``asyncio.timeout``.
        """
        loop = asyncio.get_running_loop()
        while not predicate():
            fut: asyncio.Future[None] = loop.create_future()
            self._waiters.append(fut)
            try:
                await fut
            finally:
                if fut in self._waiters:
                    self._waiters.remove(fut)

    def _notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)
