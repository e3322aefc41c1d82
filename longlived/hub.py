"""The event core: positions, the replay history, subscribers and their bounded queues.

The hub knows nothing of gRPC. Every event gets a position ``(epoch, seq)``: ``seq`` grows
by one per event, ``epoch`` is random per hub, so positions from a previous server run are
recognised as foreign. The last ``history_size`` events are kept (encoded, shared by every
subscriber) so a subscriber that resumes after a position gets exactly the events it missed.

Each subscriber has a bounded queue of already-encoded messages: an event is encoded once
and the same bytes go to every subscriber. Putting into a queue never waits. When a queue
overflows, the ``disconnect`` policy ends that subscriber (it resumes from its position and
catches up from the history); the ``drop`` policy discards what was queued and marks the gap
with a RESET message.

Registration, replay and publishing are synchronous, so no event can slip between a
subscriber's replay and its live events: no gap and no duplicate.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Literal

from longlived._dedup import Deduplicator
from longlived.events import Encoder, Event, Kind, Position
from longlived.state import Entry, KeyedState
from longlived.subscriber import EndReason, Gap, Subscriber

__all__ = [
    "EndReason",
    "Event",
    "Hub",
    "HubStats",
    "Kind",
    "Policy",
    "Position",
    "Subscriber",
]

Policy = Literal["disconnect", "drop"]
"""What an overflowing queue does."""

StateItem = tuple[str, str, int, str, bytes]
"""One key of the keyed state read from a shared log: ``(topic, key, seq, data, payload)``."""

Backfill = Callable[[int, int, int, frozenset[str]], Awaitable["list[bytes] | str"]]
"""``backfill(after, upto, id, topics)``: the messages with ``after < seq <= upto`` for the
subscriber ``id`` with ``topics``, from a shared log; or why it no longer has them."""


log = logging.getLogger(__name__)


@dataclass(slots=True)
class HubStats:
    """Running counts, read by the metrics endpoint."""

    events: int = 0
    """Events emitted (publish and send)."""
    resumes: int = 0
    """Subscriptions that resumed from a token."""
    resets: int = 0
    """RESET messages queued."""
    resyncs: int = 0
    """Fresh snapshots sent instead of RESET to subscribers of keyed state."""
    slow: int = 0
    """Subscribers that overflowed their queue."""


class Hub:
    """All current subscribers by id, the recent history, and the operations that reach them.

    Args:
        encode: turns ``(kind, position, data, topic)`` into one wire message.
        queue_size: live messages a subscriber may have queued before it is too slow.
        history_size: events kept for resuming subscribers.
        policy: what an overflowing queue does: ``disconnect`` or ``drop``.
        epoch: this hub's epoch (random if omitted).
        dedup: remembers idempotency keys (default: two minutes, 100,000 keys).
        max_keys: keys the keyed state may hold (``put`` of one more is refused).
    """

    def __init__(
        self,
        *,
        encode: Encoder,
        queue_size: int,
        history_size: int,
        policy: Policy = "disconnect",
        epoch: str | None = None,
        dedup: Deduplicator | None = None,
        max_keys: int = 100_000,
    ) -> None:
        self.queue_size = queue_size
        """Live messages a subscriber may have queued before it is too slow."""
        self.policy: Policy = policy
        """What an overflowing queue does: ``disconnect`` or ``drop``."""
        self.epoch = epoch if epoch is not None else secrets.token_hex(8)
        """This hub's epoch: the first part of every position it gives."""
        self._encode = encode
        self._seq = 0
        self._history: deque[Event] = deque(maxlen=history_size)
        self._floor = 0  # the history holds every event after this seq
        self.backfill: Backfill | None = None
        """Fetches events older than the history from a shared log (None: none kept)."""
        self._targeted: Counter[int] = Counter()  # events in the history sent to one id
        self._claims: dict[int, str] = {}  # id -> owner, while it has a stream or events
        self.state = KeyedState(max_keys=max_keys)
        """The latest value of every key (``put``/``delete`` events), for snapshots."""
        self._subscribers: dict[int, Subscriber] = {}
        self._open: set[Subscriber] = set()
        self._waiters: list[asyncio.Future[None]] = []
        self._head_waiters: list[asyncio.Future[None]] = []
        self.stats = HubStats()
        """Running counts, read by the metrics endpoint."""
        self.dedup = dedup if dedup is not None else Deduplicator(window=120.0, max_keys=100_000)
        """The idempotency keys seen within the window."""

    def __len__(self) -> int:
        return len(self._subscribers)

    def __contains__(self, id: object) -> bool:
        return id in self._subscribers

    @property
    def head(self) -> Position:
        """The position of the newest event (seq 0 before the first)."""
        return Position(self.epoch, self._seq)

    @property
    def open_streams(self) -> int:
        """Registered subscribers not yet released, ended ones still finishing included."""
        return len(self._open)

    def ids(self) -> list[int]:
        """The ids subscribed right now (a copy)."""
        return list(self._subscribers)

    def get(self, id: int) -> Subscriber | None:
        """The current subscriber for ``id``, if any."""
        return self._subscribers.get(id)

    def owner(self, id: int) -> str | None:
        """Who holds ``id``: the owner of its stream, or of its last stream while the history
        still holds events sent to ``id`` (a resume would replay them), else None."""
        return self._claims.get(id)

    # --------------------------------------------------------------- subscribing

    def register(
        self,
        id: int,
        *,
        topics: Collection[str] = (),
        resume: str = "",
        control: bool = False,
        owner: str = "",
        snapshot: bool = False,
    ) -> Subscriber:
        """Add a subscriber for ``id``, ending (as replaced) any previous one.

        With a ``resume`` token, the events after it that this subscriber would have
        received are queued first; a token that cannot be honoured queues one RESET instead.
        A ``control`` subscriber with nothing to replay first gets a HEARTBEAT carrying the
        current position: it can resume without a gap even if no event reaches it before its
        stream breaks, and every healthy stream delivers at least one message.

        A ``snapshot`` subscriber without a token first gets the keyed state of its topics
        (a SNAPSHOT message per key, then SYNCED); one whose token cannot be honoured gets
        a fresh snapshot instead of RESET.
        """
        sub = Subscriber(
            id,
            limit=self.queue_size,
            topics=topics,
            control=control or bool(resume) or snapshot,
            owner=owner,
            snapshot=snapshot,
        )
        if resume:
            missed = self._missed(id, sub.topics, resume)
            if isinstance(missed, str):
                self._reset(sub, resume, missed)
            elif isinstance(missed, Gap):
                self.stats.resumes += 1
                sub.gap = missed  # the call fills it from the shared log (fill())
            else:
                self.stats.resumes += 1
                sub.replay(missed or [self.heartbeat()])
        elif snapshot:
            self._resync(sub, "")
        elif sub.control:
            sub.replay([self.heartbeat()])
        old = self._subscribers.get(id)
        if old is not None:
            self._end(old, EndReason.REPLACED)
        if owner:
            self._claims[id] = owner
        self._subscribers[id] = sub
        self._open.add(sub)
        self._notify()
        return sub

    def _reset(self, sub: Subscriber, token: str, reason: str) -> None:
        """Tell ``sub`` its position is lost: RESET, or for a snapshot subscriber a fresh
        snapshot (nothing queued before it is kept: the snapshot holds its effect)."""
        if sub.snapshot:
            log.info("Subscriber %d cannot resume from %r (%s): snapshot", sub.id, token, reason)
            self._resnapshot(sub, reason)
            return
        log.info("Subscriber %d cannot resume from %r (%s): RESET", sub.id, token, reason)
        self.stats.resets += 1
        sub.replay([self._encode(Kind.RESET, self.head, reason, "", b"")])

    def _resnapshot(self, sub: Subscriber, reason: str) -> None:
        """Replace whatever ``sub`` has queued or still awaits from a shared log with a
        fresh snapshot at the head: the state holds the effect of all of it."""
        sub.drop_all()
        sub.gap = None
        self.stats.resyncs += 1
        self._resync(sub, reason)

    def _resync(self, sub: Subscriber, reason: str) -> None:
        """Queue the keyed state of ``sub``'s topics, then SYNCED at the head (``reason``:
        why it resyncs, "" for a first snapshot)."""
        synced = self._encode(Kind.SYNCED, self.head, reason, "", b"")
        sub.replay([*self.state.snapshot(sub.topics), synced])

    def _missed(self, id: int, topics: Collection[str], token: str) -> list[bytes] | str | Gap:
        """The messages after ``token`` for this subscriber, or why there is no such list,
        or (with a shared log) the gap before the history that the log must fill."""
        position = Position.parse(token)
        if position is None:
            return "malformed resume token"
        if position.epoch != self.epoch:
            return "resume token from another epoch (the server restarted)"
        if position.seq > self._seq:
            return "resume token from the future"
        missed = self._recent(id, topics, position.seq)
        if position.seq < self._floor:
            if self.backfill is None:
                return "resume token older than the retained history"
            return Gap(after=position.seq, upto=self._floor, recent=missed, head=self._seq)
        return missed

    async def fill(self, sub: Subscriber) -> None:
        """Queue what ``sub`` missed before the history, from the shared log, ahead of what
        it has received live since it registered (a RESET if the log no longer has it).

        Raises what the log raises when it cannot be read (the caller ends the call).
        """
        gap = sub.gap
        if gap is None:
            return
        assert self.backfill is not None
        older = await self.backfill(gap.after, gap.upto, sub.id, sub.topics)
        if sub.gap is not gap:  # resynced meanwhile (the drop policy): the snapshot holds it
            return
        sub.gap = None
        if isinstance(older, str):
            self._reset(sub, Position(self.epoch, gap.after).token, older)
            return
        # with nothing missed, the position it registered at: live ones may be queued already
        sub.replay(older + gap.recent or [self.heartbeat(gap.head)], first=True)

    def _recent(self, id: int, topics: Collection[str], after: int) -> list[bytes]:
        """The history's messages after seq ``after`` for this subscriber."""
        # walk back from the newest: O(missed)
        missed = []
        for event in reversed(self._history):
            if event.seq <= after:
                break
            if event.matches(id, topics):
                missed.append(event.message)
        missed.reverse()
        return missed

    def release(self, sub: Subscriber) -> None:
        """The stream of ``sub`` has finished: forget it (never touches a newer subscriber)."""
        if self._subscribers.get(sub.id) is sub:
            del self._subscribers[sub.id]
        sub.close()
        self._open.discard(sub)
        self._forget_claim(sub.id)
        self._notify()

    def _forget_claim(self, id: int) -> None:
        """Drop the claim on ``id`` once nothing is left to protect: no stream, no events."""
        if id not in self._subscribers and not self._targeted[id]:
            self._claims.pop(id, None)
            del self._targeted[id]

    def end(self, id: int, reason: EndReason) -> bool:
        """End the subscription of ``id``; False if there is none."""
        sub = self._subscribers.get(id)
        if sub is None:
            return False
        self._end(sub, reason)
        return True

    def end_all(self, reason: EndReason, *, flush_timeout: float | None = None) -> None:
        """End every subscription (for example at shutdown; see ``Subscriber.end`` for
        ``flush_timeout``)."""
        for sub in list(self._subscribers.values()):
            self._end(sub, reason, flush_timeout)

    def end_subscriber(
        self, sub: Subscriber, reason: EndReason, *, flush_timeout: float | None = None
    ) -> None:
        """End this very subscription (not whatever holds its id now).

        ``flush_timeout``: for UNSUBSCRIBED, how long what is queued may take to be written
        before it is abandoned (None: no limit).
        """
        self._end(sub, reason, flush_timeout)

    def _end(self, sub: Subscriber, reason: EndReason, flush_timeout: float | None = None) -> None:
        # An ended subscriber leaves the id table at once: it receives nothing more, and
        # its id is free for a new subscription while its stream finishes.
        sub.end(reason, flush_timeout=flush_timeout)
        if self._subscribers.get(sub.id) is sub:
            del self._subscribers[sub.id]
            self._notify()

    # ----------------------------------------------------------------- emitting

    def emit(
        self,
        data: str = "",
        *,
        topic: str = "",
        to: int | None = None,
        payload: bytes = b"",
        key: str = "",
        deleted: bool = False,
        idempotency_key: str = "",
    ) -> tuple[Position, bool]:
        """Emit one event: to subscriber ``to``, or to every subscriber matching ``topic``.

        ``payload`` is an encoded ``google.protobuf.Any``; with a ``key`` the event puts it
        as that key's value in the keyed state of ``topic`` (or, ``deleted``, removes the
        key). With an ``idempotency_key`` seen within the deduplication window nothing is
        emitted. Returns the event's position (the first one's, for a duplicate) and
        whether it was a duplicate.

        Raises:
            StateFull: a put of a new key beyond ``max_keys`` (nothing was emitted).
        """
        if idempotency_key:
            seen = self.dedup.get(idempotency_key)
            if seen is not None:
                return seen, True
        if to is None:
            position = self.publish(data, topic=topic, payload=payload, key=key, deleted=deleted)
        else:
            position = self.send(to, data, payload=payload)
        if idempotency_key:
            self.dedup.remember(idempotency_key, position)
        return position, False

    def publish(
        self,
        data: str,
        *,
        topic: str = "",
        payload: bytes = b"",
        key: str = "",
        deleted: bool = False,
    ) -> Position:
        """Emit ``data`` to every subscriber whose topics match; returns its position.

        Raises:
            StateFull: a put (``key``, not ``deleted``) of a new key beyond ``max_keys``.
        """
        if key and not deleted:
            self.state.check(topic, key)
        self._fan_out(self._emit(data, topic, None, payload, key=key, deleted=deleted))
        return self.head

    def send(self, id: int, data: str, *, payload: bytes = b"") -> Position:
        """Emit ``data`` to subscriber ``id`` only (kept for its resume even if absent now)."""
        self._fan_out(self._emit(data, "", id, payload))
        return self.head

    def deliver(
        self,
        seq: int,
        data: str,
        *,
        topic: str = "",
        to: int | None = None,
        payload: bytes = b"",
        key: str = "",
        deleted: bool = False,
    ) -> None:
        """Fan out an event the shared log positioned at ``seq`` (greater than ``head``)."""
        self._fan_out(self._emit(data, topic, to, payload, seq=seq, key=key, deleted=deleted))
        if self._head_waiters:
            self._head_moved()

    async def reach(self, seq: int) -> None:
        """Wait until the head is at ``seq`` or past it (a replica reading a shared log
        behind another), or the hub follows another epoch (``seq`` means nothing there).
        Unbounded by itself: wrap it in ``asyncio.timeout``."""
        epoch = self.epoch
        await _until(lambda: self._seq >= seq or self.epoch != epoch, self._head_waiters)

    def _head_moved(self) -> None:
        _wake(self._head_waiters)

    def start_at(self, epoch: str, seq: int, state: Iterable[StateItem] = ()) -> None:
        """Follow a shared log from position ``(epoch, seq)``: what came before is there,
        and ``state`` is the keyed state at that position."""
        self.epoch, self._seq, self._floor = epoch, seq, seq
        self._history.clear()
        self._targeted.clear()
        self.state.clear()
        for topic, key, at, data, payload in state:
            self._put(topic, key, at, data, payload)
        self._head_moved()

    def log_lost(
        self,
        epoch: str,
        seq: int,
        state: Iterable[StateItem] = (),
        *,
        reason: EndReason = EndReason.LOG_LOST,
    ) -> None:
        """The shared log came back as a new one (or lost events before this replica read
        them): end every stream (each client resumes and its old position gets RESET or
        a fresh snapshot), then follow the log from ``(epoch, seq)`` and ``state``."""
        log.warning("%s; ending %d streams", reason.value.capitalize(), len(self))
        self.end_all(reason)
        self.start_at(epoch, seq, state)

    def encode_event(
        self,
        seq: int,
        data: str,
        *,
        topic: str = "",
        payload: bytes = b"",
        key: str = "",
        deleted: bool = False,
    ) -> bytes:
        """The DATA message of the event at ``seq`` (for messages read back from a log)."""
        position = Position(self.epoch, seq)
        return self._encode(Kind.DATA, position, data, topic, payload, key=key, deleted=deleted)

    def _put(self, topic: str, key: str, seq: int, data: str, payload: bytes) -> None:
        message = self._encode(
            Kind.SNAPSHOT, Position(self.epoch, seq), data, topic, payload, key=key
        )
        self.state.put(topic, key, Entry(seq, data, payload, message))

    def _fan_out(self, event: Event) -> None:
        if event.target is not None:
            sub = self._subscribers.get(event.target)
            if sub is not None and self._offer(sub, event):
                self._end(sub, EndReason.TOO_SLOW)
            return
        topic = event.topic
        # no copy of the table per event: subscribers that overflow are ended afterwards
        too_slow = [
            sub
            for sub in self._subscribers.values()
            if (not sub.topics or topic in sub.topics) and self._offer(sub, event)
        ]
        for sub in too_slow:
            self._end(sub, EndReason.TOO_SLOW)

    def _emit(
        self,
        data: str,
        topic: str,
        target: int | None,
        payload: bytes,
        *,
        seq: int = 0,
        key: str = "",
        deleted: bool = False,
    ) -> Event:
        self._seq = seq = seq or self._seq + 1
        self.stats.events += 1
        message = self.encode_event(
            seq, data, topic=topic, payload=payload, key=key, deleted=deleted
        )
        event = Event(seq, topic, target, message)
        if key:  # before the fan-out: a resync during it includes this change
            if deleted:
                self.state.delete(topic, key)
            else:
                self._put(topic, key, seq, data, payload)
        history = self._history
        if not history.maxlen:
            self._floor = self._seq  # nothing is kept
            return event
        evicted = history[0] if len(history) == history.maxlen else None
        if target is not None:
            self._targeted[target] += 1  # before the eviction: it may be the same id's
        history.append(event)
        if evicted is not None:
            self._evict(evicted)
        return event

    def _evict(self, event: Event) -> None:
        """``event`` has left the history."""
        self._floor = event.seq
        if event.target is not None:
            self._targeted[event.target] -= 1
            if not self._targeted[event.target]:
                self._forget_claim(event.target)

    def _offer(self, sub: Subscriber, event: Event) -> bool:
        """Queue ``event`` for ``sub``; True if ``sub`` overflowed and must be ended."""
        if sub.end_reason is not None:
            return False
        if not sub.full():
            sub.put(event.message)
            return False
        self.stats.slow += 1
        if self.policy == "disconnect":
            log.warning("Subscriber %d is too slow (%d messages queued): ending its stream",
                        sub.id, sub.queued)  # fmt: skip
            return True
        log.warning("Subscriber %d is too slow (%d messages queued): dropping them",
                    sub.id, sub.queued)  # fmt: skip
        reason = "subscriber too slow: events dropped"
        if sub.snapshot:  # the state at this event replaces what was dropped
            self._resnapshot(sub, reason)
            return False
        sub.drop_all()
        if sub.control:
            self.stats.resets += 1
            position = Position(self.epoch, event.seq)
            sub.put(self._encode(Kind.RESET, position, reason, "", b""))
        return False

    def heartbeat(self, seq: int | None = None) -> bytes:
        """A HEARTBEAT message carrying the current head position (or that of ``seq``)."""
        position = self.head if seq is None else Position(self.epoch, seq)
        return self._encode(Kind.HEARTBEAT, position, "", "", b"")

    # ---------------------------------------------------------------- observing

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds; it is re-checked whenever subscribers change.

        Unbounded by itself: wrap it in ``asyncio.timeout``.
        """
        await _until(predicate, self._waiters)

    def _notify(self) -> None:
        _wake(self._waiters)


async def _until(predicate: Callable[[], bool], waiters: list[asyncio.Future[None]]) -> None:
    """Wait until ``predicate()`` holds, re-checked each time ``waiters`` are woken."""
    loop = asyncio.get_running_loop()
    while not predicate():
        fut: asyncio.Future[None] = loop.create_future()
        waiters.append(fut)
        try:
            await fut
        finally:
            if fut in waiters:
                waiters.remove(fut)


def _wake(waiters: list[asyncio.Future[None]]) -> None:
    """Wake everyone waiting in ``waiters`` (the list itself stays the same object)."""
    woken = waiters.copy()
    waiters.clear()
    for fut in woken:
        if not fut.done():
            fut.set_result(None)
