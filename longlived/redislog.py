"""The shared event log on Redis Streams: several replicas, one order of events.

Every replica (and every ``Publisher``) appends with ``XADD``; each replica follows the
stream with ONE reader (``XREAD BLOCK`` from the last entry it read) and fans out to its
own subscribers through the hub, so every subscriber on every replica sees the same events
in the same order. A position is the stream entry id, ``ms-n``, folded into one integer
(``ms << 16 | n``) so tokens keep their form (``epoch:seq``) and stay valid on every
replica and across restarts. The epoch lives in Redis beside the stream: a Redis that comes
back without its data (persistence off) gets a new one, and old positions get RESET.

Keys (one Redis Cluster slot, thanks to the ``{name}`` hash tag): ``{name}:events`` (the
stream, trimmed with ``MAXLEN ~``), ``{name}:epoch``, ``{name}:dedup:<key>`` (idempotency
keys, expiring after the deduplication window), ``{name}:owner:<id>`` (who holds a
subscriber id, for ``claim_ttl`` after its last subscribe: an id's events cannot be read by
another caller on any replica).

Redis going away does not end any stream: the reader logs, backs off and resumes from its
last entry; publishes fail with ``LogUnavailable``; resumes that need the log answer
UNAVAILABLE (the client retries).
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
from collections.abc import Awaitable, Callable
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio import BlockingConnectionPool
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from longlived.backoff import Backoff
from longlived.errors import LogUnavailable
from longlived.events import Position, Published
from longlived.hub import Hub
from longlived.settings import RedisSettings

__all__ = ["RedisAppender", "RedisLog", "entry_id", "seq_of"]

log = logging.getLogger(__name__)

_N_BITS = 16

_POOL = 32
"""Connections each pool opens to Redis at most (commands beyond wait for one)."""
_POOL_WAIT = 10.0
"""Seconds a command waits for a free connection before it fails as unavailable."""
_BLOCK = 1.0
"""Seconds the reader's XREAD waits for new entries."""

# Atomically: answer a key seen within the window with its first entry, or append.
# KEYS[2] is always given (a key of the same slot, for Redis Cluster); ARGV[3] says
# whether it is an idempotency key to honour.
_APPEND = """
local keyed = ARGV[3] == '1'
if keyed then
  local seen = redis.call('GET', KEYS[2])
  if seen then return {seen, 1} end
end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', unpack(ARGV, 4))
if keyed then redis.call('SET', KEYS[2], id, 'PX', ARGV[2]) end
return {id, 0}
"""


def seq_of(entry: bytes | str) -> int:
    """The position of a stream entry id ``ms-n``: ``ms << 16 | n``."""
    text = entry.decode() if isinstance(entry, bytes) else entry
    ms, _, n = text.partition("-")
    number = int(n or 0)
    if number >> _N_BITS:
        raise ValueError(f"stream entry {text}: more than {1 << _N_BITS} entries in one ms")
    return int(ms) << _N_BITS | number


def entry_id(seq: int) -> str:
    """The stream entry id of a position."""
    return f"{seq >> _N_BITS}-{seq & ((1 << _N_BITS) - 1)}"


Entry = tuple[str, dict[bytes, bytes]]
"""A stream entry: its id and its fields."""


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _entries(raw: object) -> list[Entry]:
    """Stream entries as redis-py returns them (its annotations are wide unions)."""
    found = cast("list[tuple[bytes, dict[bytes, bytes] | None]]", raw or [])
    return [(_text(entry), fields or {}) for entry, fields in found]


def _fields(data: str, topic: str, to: int | None, payload: bytes) -> list[bytes]:
    fields = [b"d", data.encode(), b"t", topic.encode()]
    if to is not None:
        fields += [b"to", str(to).encode()]
    if payload:
        fields += [b"p", payload]
    return fields


def _client(settings: RedisSettings, *, reads: bool) -> aioredis.Redis:
    """A client for the log: reads (and the idempotent writes: owners) retry once on a
    fresh connection when a Redis restart broke the pooled one; appends never do (one may
    have gone through). Every command is bounded by ``settings.timeout``."""
    assert settings.url is not None
    options: dict[str, Any] = {
        "health_check_interval": 1,
        # the reader's XREAD blocks _BLOCK seconds on top
        "socket_timeout": settings.timeout + (_BLOCK if reads else 0.0),
        "socket_connect_timeout": settings.timeout,
    }
    if reads:
        options |= {"retry": Retry(NoBackoff(), 1), "retry_on_error": [RedisConnectionError]}
    if settings.cluster:
        # every key of the log carries the {name} hash tag: one slot, one node
        cluster = RedisCluster.from_url(settings.url, max_connections=_POOL, **options)
        return cast("aioredis.Redis", cluster)  # the commands used here are the same
    # a bounded pool that waits for a free connection (redis-py's default pool refuses the
    # 101st concurrent command): a burst of resubscribes queues instead of failing
    pool = BlockingConnectionPool.from_url(
        settings.url, max_connections=_POOL, timeout=_POOL_WAIT, **options
    )
    return aioredis.Redis.from_pool(pool)  # closing the client closes its pool


class RedisAppender:
    """Appends events to the shared log: what replicas and ``Publisher`` (pointed at Redis
    directly) have in common.

    Args:
        settings: URL, stream name and retention.
        dedup_window: seconds an idempotency key is remembered.
    """

    def __init__(self, settings: RedisSettings, *, dedup_window: float) -> None:
        if settings.url is None:
            raise ValueError("redis.url is not set")
        self.settings = settings
        self._epoch: str | None = None
        name = settings.stream
        self.stream = f"{{{name}}}:events"
        self._epoch_key = f"{{{name}}}:epoch"
        self._dedup_prefix = f"{{{name}}}:dedup:"
        self._owner_prefix = f"{{{name}}}:owner:"
        self._window_ms = max(1, round(dedup_window * 1000))
        # reads (and the idempotent writes: owners) retry once on a fresh connection when a
        # Redis restart broke the pooled one; appends never do (one may have gone through)
        # bounded pools that wait for a free connection (redis-py's default pool refuses
        # the 101st concurrent command): a burst of resubscribes queues instead of failing
        self._redis = _client(settings, reads=True)
        self._writes = _client(settings, reads=False)
        self._append = self._writes.register_script(_APPEND)

    async def aclose(self) -> None:
        """Close the connections."""
        await self._redis.aclose()
        await self._writes.aclose()

    def _where(self) -> str:
        url = self.settings.url or ""
        return url.rpartition("@")[2]  # never a password in a log line

    async def _position(self) -> tuple[str, str]:
        """The log's epoch (made on first use) and the id of its newest entry."""
        await self._redis.set(self._epoch_key, secrets.token_hex(8), nx=True)
        epoch = await self._redis.get(self._epoch_key)
        newest = _entries(await self._redis.xrevrange(self.stream, count=1))
        return _text(epoch or b""), newest[0][0] if newest else "0-0"

    async def epoch(self) -> str:
        """The log's epoch, the first part of every position in it."""
        if self._epoch is None:
            try:
                self._epoch = (await self._position())[0]
            except RedisError as exc:
                raise LogUnavailable(f"cannot reach the event log: {exc}") from exc
        return self._epoch

    async def append(
        self,
        data: str = "",
        *,
        topic: str = "",
        to: int | None = None,
        payload: bytes = b"",
        key: str = "",
    ) -> Published:
        """Append one event; its position (the first one's, for a repeated ``key``).

        With a ``key``, an append whose connection broke is tried once more (the key makes
        that safe); without one it is not, since it may have been appended already.

        Raises:
            LogUnavailable: Redis cannot be reached; nothing was appended (retry with the
                same key).
        """
        epoch = await self.epoch()
        keys = [self.stream, self._dedup_prefix + key]
        args: list[Any] = [self.settings.maxlen, self._window_ms, "1" if key else "0"]
        args += _fields(data, topic, to, payload)
        try:
            try:
                answer = await self._append(keys=keys, args=args)
            except RedisConnectionError:
                if not key:  # it may have been appended before the connection broke
                    raise
                answer = await self._append(keys=keys, args=args)  # the key makes it safe
        except RedisError as exc:
            self._epoch = None  # Redis may come back as a new log
            raise LogUnavailable(f"cannot append to the event log: {exc}") from exc
        entry, duplicate = cast("list[Any]", answer)
        return Published(Position(epoch, seq_of(_text(entry))), bool(duplicate))


class RedisLog(RedisAppender):
    """The hub's events on a Redis stream shared by every replica.

    Args:
        settings: URL, stream name and retention.
        hub: the replica's hub; the reader fans out into it.
        dedup_window: seconds an idempotency key is remembered.
        backoff: delays between attempts to reach Redis again.
        rng: randomness for the backoff jitter.
        sleep: the sleep between attempts (injected by tests).
    """

    def __init__(
        self,
        settings: RedisSettings,
        hub: Hub,
        *,
        dedup_window: float,
        backoff: Backoff,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        super().__init__(settings, dedup_window=dedup_window)
        self.hub = hub
        self._backoff = backoff
        self._rng = rng if rng is not None else random.Random()
        self._sleep = sleep
        self._last = "0-0"
        self._reader: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()
        """Set while the reader is following the stream."""

    async def epoch(self) -> str:
        return self.hub.epoch  # the one this replica follows

    async def start(self) -> None:
        """Reach Redis, take its epoch and the stream's end, and start following it.

        Raises:
            LogUnavailable: Redis cannot be reached (the server does not start).
        """
        try:
            epoch, last = await self._position()
        except RedisError as exc:
            await self.aclose()
            raise LogUnavailable(f"cannot reach the event log at {self._where()}: {exc}") from exc
        self.hub.start_at(epoch, seq_of(last))
        self.hub.backfill = self.backfill
        self._last = last
        self.connected.set()
        self._reader = asyncio.create_task(self._follow(), name="longlived-redis-reader")
        log.info("Following the event log %s at %s (epoch %s)", self.stream, self._where(), epoch)

    async def close(self) -> None:
        """Stop following and close the connections."""
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.wait([self._reader])
        await self.aclose()

    async def owner(self, id: int) -> str | None:
        """Who holds ``id`` on every replica (recorded by ``claim``), if anyone.

        Raises:
            LogUnavailable: Redis cannot be reached.
        """
        try:
            owner = await self._redis.get(f"{self._owner_prefix}{id}")
        except RedisError as exc:
            raise LogUnavailable(f"cannot read the owner of {id}: {exc}") from exc
        return _text(owner) if owner is not None else None

    async def claim(self, id: int, owner: str) -> None:
        """Record ``owner`` as the holder of ``id`` for ``claim_ttl`` seconds from now.

        Raises:
            LogUnavailable: Redis cannot be reached.
        """
        try:
            await self._redis.set(f"{self._owner_prefix}{id}", owner, ex=self.settings.claim_ttl)
        except RedisError as exc:
            raise LogUnavailable(f"cannot record the owner of {id}: {exc}") from exc

    # ------------------------------------------------------------------ reading

    async def _follow(self) -> None:
        """The one reader: deliver every entry after the last one read, in order."""
        failures = 0
        while True:
            try:
                if failures:
                    await self._reconnected()
                    failures = 0
                answer = await self._redis.xread(
                    {self.stream: self._last}, block=round(_BLOCK * 1000), count=1000
                )
                streams = cast("list[tuple[bytes, object]]", answer or [])
            except RedisError as exc:
                self.connected.clear()
                delay = self._backoff.compute(min(failures, 64), self._rng)
                failures += 1
                log.warning("The event log at %s is unavailable (%s); reading again in %.2fs",
                            self._where(), exc, delay)  # fmt: skip
                await self._sleep(delay)
                continue
            for _, entries in streams:
                for entry, fields in _entries(entries):
                    self._deliver(entry, fields)

    async def _reconnected(self) -> None:
        """Back after a failure: carry on from the last entry, unless the log was lost."""
        epoch, last = await self._position()
        if epoch != self.hub.epoch:
            self.hub.log_lost(epoch, seq_of(last))
            self._last = last
        self.connected.set()
        log.info("Following the event log at %s again", self._where())

    def _deliver(self, entry: str, fields: dict[bytes, bytes]) -> None:
        self._last = entry
        seq = seq_of(entry)
        if seq <= self.hub.head.seq:  # read twice across a reconnect
            return
        to = fields.get(b"to")
        self.hub.deliver(
            seq,
            fields.get(b"d", b"").decode(),
            topic=fields.get(b"t", b"").decode(),
            to=int(to) if to is not None else None,
            payload=fields.get(b"p", b""),
        )

    async def backfill(
        self, after: int, upto: int, id: int, topics: frozenset[str]
    ) -> list[bytes] | str:
        """The messages for subscriber ``id`` with ``after < seq <= upto``, read from the
        stream; or why it no longer has them (trimmed by ``MAXLEN``)."""
        info = await self._redis.xinfo_stream(self.stream)
        first = info.get("first-entry")
        trimmed = int(info.get("entries-added", 0)) > int(info.get("length", 0))
        # MAXLEN trims from the oldest end: everything after the token is still there if
        # the token's own entry is (or nothing was ever trimmed). The entry just before the
        # first one kept is unknown, so a token naming it is reset too: never a silent gap
        if trimmed and (first is None or after < seq_of(_text(first[0]))):
            return "resume token older than the retained log"
        messages: list[bytes] = []
        start = f"({entry_id(after)}"
        while True:
            raw = await self._redis.xrange(self.stream, start, entry_id(upto), count=1000)
            entries = _entries(raw)
            for entry, fields in entries:
                to = fields.get(b"to")
                topic = fields.get(b"t", b"").decode()
                if to is not None:
                    if int(to) != id:
                        continue
                elif topics and topic not in topics:
                    continue
                messages.append(
                    self.hub.encode_event(
                        seq_of(entry),
                        fields.get(b"d", b"").decode(),
                        topic=topic,
                        payload=fields.get(b"p", b""),
                    )
                )
            if len(entries) < 1000:
                return messages
            start = f"({entries[-1][0]}"
