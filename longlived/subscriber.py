"""One subscriber: a bounded queue of encoded messages, and how its subscription ends."""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

from longlived._aio import SparseEvent

__all__ = ["EndReason", "Gap", "Subscriber"]


class EndReason(enum.Enum):
    """Why the hub ended a subscriber's stream."""

    UNSUBSCRIBED = "unsubscribed"
    """``Unsubscribe`` was called for its id; queued messages are still delivered."""
    REPLACED = "replaced"
    """A newer ``Subscribe`` with the same id took its place."""
    TOO_SLOW = "subscriber too slow"
    """Its queue overflowed (``disconnect`` policy)."""
    SHUTDOWN = "server shutting down"
    """The server is closing."""
    MAX_AGE = "max connection age reached"
    """The stream lived longer than the server's ``max_connection_age``."""
    LOG_LOST = "the shared event log was lost"
    """The Redis log came back without its events (a restart without persistence): the
    client resumes, and its old position gets RESET."""
    EVENTS_LOST = "events were trimmed from the shared log before this replica read them"
    """This replica fell behind the log's retention (cut off from Redis too long): its
    clients resume, and get RESET."""


@dataclass(frozen=True, slots=True)
class Gap:
    """What a resuming subscriber missed before the hub's history: the events with
    ``after < seq <= upto`` from the shared log, then ``recent`` from the history."""

    after: int
    upto: int
    recent: list[bytes]
    head: int
    """The head when it registered: its live messages come after this."""


class Subscriber:
    """One open subscription: id, topics, a bounded queue of encoded messages, an end.

    Thousands are held for days, mostly idle: the queue is a plain list, and the writer's
    wake-up is a future made only while it waits.
    """

    __slots__ = (
        "_allowance",
        "_direct_at",
        "_flush_timer",
        "_parked",
        "_queue",
        "_waiter",
        "aborted",
        "control",
        "end_reason",
        "gap",
        "id",
        "limit",
        "owner",
        "sink",
        "snapshot",
        "topics",
    )

    def __init__(
        self,
        id: int,
        *,
        limit: int,
        topics: Collection[str] = (),
        control: bool = False,
        owner: str = "",
        snapshot: bool = False,
    ) -> None:
        self.id = id
        """The subscriber id."""
        self.owner = owner
        """Who opened the subscription (for authorization)."""
        self.limit = limit
        """Live messages it may have queued before it counts as too slow."""
        self.topics = frozenset(topics)
        """The topics it receives (empty: every topic)."""
        self.control = control
        """The peer understands HEARTBEAT and RESET messages."""
        self.snapshot = snapshot
        """It follows the keyed state: a lost position gets a fresh snapshot, not RESET."""
        self.end_reason: EndReason | None = None
        """Why its stream ended (None while it is open)."""
        self.aborted: asyncio.Event = SparseEvent()
        """Set when queued messages are to be abandoned: every end but UNSUBSCRIBED and a
        flushed SHUTDOWN (whose queue is still delivered), or ``abort()``. A writer blocked
        on the peer races it."""
        self._queue: list[bytes] = []
        self._allowance = 0  # replayed messages still queued: they do not count as lag
        self._waiter: asyncio.Future[None] | None = None  # the writer's wake-up, in take()
        self._flush_timer: asyncio.TimerHandle | None = None
        self._parked = False  # its writer waits in take() with nothing queued
        self._direct_at = 0.0  # when a message last went out through the sink
        self.sink: Callable[[bytes], bool] | None = None
        """Writes one message at once if the peer can take it without waiting (True), or
        declines (False). Set by the stream's writer: a message put while the writer waits
        with nothing queued goes out through it, with no queue and no task switch."""
        self.gap: Gap | None = None
        """What it missed before the hub's history, still to be fetched from a shared log."""

    def __repr__(self) -> str:
        return f"<Subscriber id={self.id} queued={len(self._queue)} end={self.end_reason}>"

    @property
    def queued(self) -> int:
        """Messages waiting to be written."""
        return len(self._queue)

    def full(self) -> bool:
        """Whether one more live message would overflow the queue.

        While what it missed is still being read from a shared log (``gap``), its writer has
        not started: live messages may queue up to twice the bound meanwhile.
        """
        limit = self.limit + self._allowance
        return len(self._queue) >= (limit + self.limit if self.gap is not None else limit)

    def put(self, message: bytes) -> None:
        """Queue ``message`` (the caller checked ``full()``), or write it at once through
        ``sink`` when the writer is idle: nothing queued can be overtaken then."""
        if self._parked:
            sink = self.sink
            if sink is not None and sink(message):
                self._direct_at = time.monotonic()
                return
            self._parked = False  # what follows queues behind it, in order
        self._queue.append(message)
        self._wake()

    def replay(self, messages: list[bytes], *, first: bool = False) -> None:
        """Queue missed messages beyond the live bound; ``first``: ahead of what is queued."""
        if first:
            self._queue[:0] = messages
        else:
            self._queue += messages
        self._allowance += len(messages)
        self._parked = False  # live messages now queue behind these
        self._wake()

    def drop_all(self) -> None:
        """Discard everything queued."""
        self._queue = []
        self._allowance = 0

    def end(self, reason: EndReason, *, flush_timeout: float | None = None) -> None:
        """End the subscription; the first reason wins.

        UNSUBSCRIBED, and SHUTDOWN given a ``flush_timeout``, keep what is queued for the
        writer; with ``flush_timeout`` it is abandoned after that many seconds (a peer that
        stopped reading). Every other reason abandons the queue at once.
        """
        if self.end_reason is None:
            self.end_reason = reason
            flushed = reason is EndReason.UNSUBSCRIBED or (
                reason is EndReason.SHUTDOWN and flush_timeout is not None
            )
            if not flushed:
                self.abort()
            elif flush_timeout is not None:
                loop = asyncio.get_running_loop()
                self._flush_timer = loop.call_later(flush_timeout, self.abort)
            self._wake()

    def close(self) -> None:
        """The stream has finished: cancel the pending flush deadline, if any."""
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None

    def abort(self) -> None:
        """Abandon whatever is still queued (an unsubscribed peer that does not read)."""
        self.drop_all()
        self.aborted.set()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def take(self, idle: float | None = None) -> list[bytes] | None:
        """Wait for queued messages and take them all.

        Returns None once the subscription has ended and its queue is empty, and ``[]``
        when ``idle`` seconds pass with nothing queued or written through ``sink`` (time
        for a heartbeat).
        """
        while not self._queue:
            if self.end_reason is not None:
                return None
            self._waiter = waiter = asyncio.get_running_loop().create_future()
            self._parked = True
            try:
                if idle is None:
                    await waiter
                elif await self._idle(waiter, idle):
                    return []
            finally:
                self._parked = False
                self._waiter = None
        batch = self._queue
        self._queue = []
        self._allowance = max(0, self._allowance - len(batch))
        return batch

    async def _idle(self, waiter: asyncio.Future[None], idle: float) -> bool:
        """Wait for ``waiter``; True if ``idle`` seconds passed with nothing sent first."""
        deadline = time.monotonic() + idle
        while True:
            try:
                async with asyncio.timeout(deadline - time.monotonic()):
                    await waiter
                return False
            except TimeoutError:
                if self._queue or self.end_reason is not None:
                    return False
                deadline = self._direct_at + idle  # messages went out meanwhile: not idle
                if deadline <= time.monotonic():
                    return True
                # the timeout cancelled the wake-up: wait on a new one
                self._waiter = waiter = asyncio.get_running_loop().create_future()
