"""``WatchCache``: a typed client cache of the server's keyed state, informer-style.

The cache subscribes with ``snapshot``: the server sends every current value of its topic
(SNAPSHOT messages), then SYNCED, then each change (a put or a delete) as it happens. It
keeps the latest value per key, typed as the app's own message, and reports every change
to handlers and iterators::

    async with WatchCache(Item, id=7, topic="inventory", settings=settings) as cache:
        await cache.wait_synced()
        print(cache.get("sku-1"))          # an Item, or None
        async for change in cache.changes():
            print(change.type, change.key, change.value)

It survives what ``ResilientClient`` survives (restarts, drains, broken connections) with
the same backoff and resume: after a break it resumes from its position, and where the
server cannot honour it (too old, another epoch after a restart, dropped as too slow)
the server sends a fresh snapshot instead of RESET. The cache reconciles it with what
it holds, so handlers see only the real differences (keys added, updated, deleted) and
nothing raises to the app.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Generic, Literal, Self, TypeVar

import betterproto2

from longlived._aio import wait_first
from longlived._proto.longlived import Response, ResponseKind
from longlived.client import ResilientClient
from longlived.errors import ResumeExpired
from longlived.payload import unpack
from longlived.settings import Settings

__all__ = ["Change", "ChangeType", "WatchCache"]

M = TypeVar("M", bound=betterproto2.Message)

log = logging.getLogger(__name__)

ChangeType = Literal["added", "updated", "deleted"]
"""What a ``Change`` did: a key ``added``, ``updated`` to another value, or ``deleted``."""


@dataclass(frozen=True, slots=True)
class Change(Generic[M]):
    """One difference in the cache."""

    type: ChangeType
    """What happened to the key."""
    key: str
    """The key that changed."""
    value: M
    """The new value; for ``deleted``, the last one."""
    old: M | None = None
    """The value it replaced (``updated``), else None."""


class WatchCache(Generic[M]):
    """The keyed state of one topic, kept current, typed as ``message_type``.

    Use it as an async context manager (it follows the state in a task of its own), or
    run ``run()`` in a task group of the app's.

    Args:
        message_type: the app's generated message every value is.
        id: the subscriber id (as for ``ResilientClient``).
        topic: the topic whose keyed state to follow ("": the keys put without a topic).
        settings: address, backoff, heartbeat and timeouts.
        metadata: extra request metadata (for example an ``authorization`` header).
        rng: randomness for backoff jitter.
        sleep: the sleep used between attempts (injected by tests).

    A change is the difference it makes: a put of the value a key already has reports
    nothing, nor does a delete of a key that is not there. Handlers run in the cache's
    task, in order; one that raises is logged and the others still run.
    """

    def __init__(
        self,
        message_type: type[M],
        id: int,
        *,
        topic: str = "",
        settings: Settings | None = None,
        metadata: Mapping[str, str] | None = None,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        self.message_type = message_type
        """The app's message every value is."""
        self.topic = topic
        """The topic whose keyed state it follows."""
        self.client = ResilientClient(
            id,
            settings=settings,
            topics=[topic] if topic else [],
            metadata=metadata,
            rng=rng,
            sleep=sleep,
            snapshot=True,
        )
        """The subscription underneath (its ``connected``, ``token`` and counters)."""
        self.snapshots = 0
        """Snapshots applied (the first, then one per resync)."""
        self._items: dict[str, M] = {}
        self._pending: dict[str, M] | None = None
        self._pending_stream = 0
        self._synced = asyncio.Event()
        self._done = asyncio.Event()
        self._error: BaseException | None = None
        self._handlers: list[Callable[[Change[M]], object]] = []
        self._queues: list[asyncio.Queue[Change[M] | None]] = []
        self._task: asyncio.Task[None] | None = None

    # --------------------------------------------------------------------- reading

    def get(self, key: str) -> M | None:
        """The current value of ``key``, or None."""
        return self._items.get(key)

    def items(self) -> dict[str, M]:
        """Every key and its value (a copy)."""
        return dict(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    @property
    def synced(self) -> bool:
        """Whether a first snapshot has been applied (it stays True across reconnects)."""
        return self._synced.is_set()

    async def wait_synced(self) -> None:
        """Wait until the first snapshot is applied. Unbounded by itself: wrap it in
        ``asyncio.timeout``. An iteration of ``changes()`` begun as soon as it returns
        (no other await in between) sees every change after the snapshot.

        Raises:
            SubscriptionClosed: the server ended the subscription first, with a status that
                is not retried (as ``run()`` raises it; so with ``RetriesExhausted`` and
                ``PayloadTypeError``: whatever ended the cache first).
            RuntimeError: the cache ended before its first snapshot without an error (it
                was closed, or the server ended the subscription with OK).
        """
        await wait_first(self._synced, self._done)
        if not self.synced:
            self._raise_error()
            raise RuntimeError("the cache ended before its first snapshot")

    def on_change(self, handler: Callable[[Change[M]], object]) -> Callable[[], None]:
        """Call ``handler`` with every change from now on; returns what removes it."""
        self._handlers.append(handler)
        return lambda: self._handlers.remove(handler) if handler in self._handlers else None

    async def changes(self) -> AsyncGenerator[Change[M], None]:
        """Every change from the first step of the iteration on, until the cache ends
        (then it raises what ended it, if anything did). Changes wait in an unbounded
        queue until read."""
        queue: asyncio.Queue[Change[M] | None] = asyncio.Queue()
        self._queues.append(queue)
        try:
            while not (self._done.is_set() and queue.empty()):
                change = await queue.get()
                if change is None:
                    break
                yield change
        finally:
            self._queues.remove(queue)
        self._raise_error()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    # --------------------------------------------------------------------- following

    async def run(self) -> None:
        """Follow the state until the server ends the subscription (``Unsubscribe``) or
        ``aclose()``; raises what ends it otherwise (``SubscriptionClosed`` for a status
        not retried, ``RetriesExhausted``, ``PayloadTypeError`` for a value of another
        type)."""
        try:
            while not self.client.closed:  # closed before it began: nothing to follow
                try:
                    async for response in self.client:
                        first = not self._synced.is_set()
                        self._receive(response)
                        if first and self._synced.is_set():
                            # changes may have come in the same read as SYNCED: whoever
                            # waited for the sync runs before the next is applied, so a
                            # changes() begun right after wait_synced() misses none
                            await asyncio.sleep(0)
                    return
                except ResumeExpired:  # a server that sends RESET anyway: start afresh
                    self.client.forget_position()
        except BaseException as exc:
            self._error = exc if isinstance(exc, Exception) else None
            raise
        finally:
            self._done.set()
            for queue in self._queues:
                queue.put_nowait(None)

    def _receive(self, response: Response) -> None:
        if response.kind == ResponseKind.SYNCED:
            self._reconcile(self._taken_pending())
            return
        if response.topic != self.topic:  # without a topic, every topic's events arrive
            return
        if response.kind == ResponseKind.SNAPSHOT:
            stream = self.client.connections
            if self._pending is None or self._pending_stream != stream:
                self._pending, self._pending_stream = {}, stream  # a cut snapshot is redone
            self._pending[response.key] = unpack(response.payload, self.message_type)
        elif response.key:
            if response.deleted:
                self._delete(response.key)
            else:
                self._put(response.key, unpack(response.payload, self.message_type))

    def _taken_pending(self) -> dict[str, M]:
        """The snapshot SYNCED completes (what an earlier, cut stream began is not it)."""
        pending, self._pending = self._pending, None
        if pending is None or self._pending_stream != self.client.connections:
            return {}
        return pending

    def _reconcile(self, snapshot: dict[str, M]) -> None:
        """Replace the items with ``snapshot``, reporting only the differences."""
        self.snapshots += 1
        for key in [key for key in self._items if key not in snapshot]:
            self._delete(key)
        for key, value in snapshot.items():
            self._put(key, value)
        self._synced.set()

    def _put(self, key: str, value: M) -> None:
        old = self._items.get(key)
        if old == value:
            return
        self._items[key] = value
        self._report(Change("added" if old is None else "updated", key, value, old))

    def _delete(self, key: str) -> None:
        old = self._items.pop(key, None)
        if old is not None:
            self._report(Change("deleted", key, old))

    def _report(self, change: Change[M]) -> None:
        for handler in list(self._handlers):
            try:
                handler(change)
            except Exception:
                log.exception("A change handler of the cache failed on %s", change.key)
        for queue in self._queues:
            queue.put_nowait(change)

    # --------------------------------------------------------------------- lifecycle

    async def aclose(self) -> None:
        """Stop following and close the connection. Idempotent."""
        await self.client.aclose()
        if self._task is not None:
            # closing the client ends the task; never wait on it without a bound
            await asyncio.wait([self._task], timeout=self.client.settings.drain_timeout)
            if not self._task.done():
                log.warning("The cache of %d did not stop in time; cancelling it",
                            self.client.id)  # fmt: skip
                self._task.cancel()
                await asyncio.wait([self._task])

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self.run(), name=f"longlived-cache-{self.client.id}")
        # its failure is the app's to see (wait_synced, changes, leaving the block)
        self._task.add_done_callback(lambda task: task.cancelled() or task.exception())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
        if exc is None:
            self._raise_error()
