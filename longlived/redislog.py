"""The shared event log on Redis Streams: several replicas, one order of events.

Every replica (and every ``Publisher``) appends with ``XADD``; each replica follows the
stream with ONE reader (``XREAD BLOCK`` from the last entry it read) and fans out to its
own subscribers through the hub, so every subscriber on every replica sees the same events
in the same order. A position is the stream entry id, ``ms-n``, folded into one integer
(``ms << 22 | n``) so tokens keep their form (``epoch:seq``) and stay valid on every
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
from longlived.errors import LogUnavailable, StateFull
from longlived.events import Position, Published
from longlived.hub import EndReason, Hub, StateItem
from longlived.settings import RedisSettings

__all__ = ["RedisAppender", "RedisLog", "entry_id", "seq_of"]

log = logging.getLogger(__name__)

_N_BITS = 22
"""Bits of a position kept for the ``n`` of an entry id ``ms-n``: up to 4M entries in one
millisecond (Redis counts ``n`` up while its clock stands still or steps back), and room
for ``ms`` until the year 2109 within 64 bits."""

_POOL = 32
"""Connections each pool opens to Redis at most (commands beyond wait for one)."""
_POOL_WAIT = 10.0
"""Seconds a command waits for a free connection before it fails as unavailable."""
_BLOCK = 1.0
"""Seconds the reader's XREAD waits for new entries."""
_BATCH = 1000
"""Entries the reader takes per XREAD."""
_CHECK = 5.0
"""Seconds between the reader's checks that the log is still the one it follows."""

# Atomically: answer a key seen within the window with its first entry, or append, and
# keep the keyed state (the hash KEYS[3]: "<topic length>:<topic><key>" -> "<entry id>
# <value>") in step with the stream. KEYS[2] is always given (a key of the same slot, for
# Redis Cluster); ARGV[3] says whether it is an idempotency key to honour; ARGV[4] is the
# state change ('', 'put' or 'del') of field ARGV[5] with value ARGV[6], at most KEYS[4]
# fields (the bound the replicas recorded) or else ARGV[7].
_APPEND = """
local dedup = ARGV[3] == '1'
if dedup then
  local seen = redis.call('GET', KEYS[2])
  if seen then return {seen, 1} end
end
local op = ARGV[4]
if op == 'put' and redis.call('HEXISTS', KEYS[3], ARGV[5]) == 0
    and redis.call('HLEN', KEYS[3]) >= tonumber(redis.call('GET', KEYS[4]) or ARGV[7]) then
  return {'', 2}
end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', unpack(ARGV, 8))
if dedup then redis.call('SET', KEYS[2], id, 'PX', ARGV[2]) end
if op == 'put' then
  redis.call('HSET', KEYS[3], ARGV[5], id .. ' ' .. ARGV[6])
elseif op == 'del' then
  redis.call('HDEL', KEYS[3], ARGV[5])
end
return {id, 0}
"""

# Atomically: the log's epoch (made on first use), its newest entry id and, if ARGV[2] is
# '1', the keyed state at that entry.
_POSITION = """
redis.call('SET', KEYS[2], ARGV[1], 'NX')
local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local last = '0-0'
if newest[1] then last = newest[1][1] end
local state = {}
if ARGV[2] == '1' then state = redis.call('HGETALL', KEYS[3]) end
return {redis.call('GET', KEYS[2]), last, state}
"""


# Record an owner unless another holds the id (ARGV[3] == '1': take it over anyway).
_CLAIM = """
local current = redis.call('GET', KEYS[1])
if current and current ~= ARGV[1] and ARGV[3] ~= '1' then return current end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return ARGV[1]
"""

# Keep a claim alive while its stream is open, unless it changed hands meanwhile.
_REFRESH = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


def _cancelled() -> None:
    """Re-raise a cancellation that surfaced as another error: a command interrupted by
    ``Task.cancel()`` can fail with a ``ConnectionError`` of redis-py's, and a loop that
    retries on errors would then never stop."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def seq_of(entry: bytes | str) -> int:
    """The position of a stream entry id ``ms-n``: ``ms << 22 | n``."""
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


def _fields(
    data: str, topic: str, to: int | None, payload: bytes, key: str, deleted: bool
) -> list[bytes]:
    fields = [b"d", data.encode(), b"t", topic.encode()]
    if to is not None:
        fields += [b"to", str(to).encode()]
    if payload:
        fields += [b"p", payload]
    if key:
        fields += [b"k", key.encode()]
        if deleted:
            fields += [b"x", b"1"]
    return fields


def _value(data: str, payload: bytes) -> bytes:
    """A key's value as the state hash keeps it: the length of ``data``, ``data``, payload."""
    encoded = data.encode()
    return b"%d:" % len(encoded) + encoded + payload


def _field(topic: str, key: str) -> bytes:
    """A key's field in the state hash: the topic's length, the topic, the key (topics and
    keys may hold any character, so no separator can tell them apart)."""
    encoded = topic.encode()
    return b"%d:" % len(encoded) + encoded + key.encode()


def _state(raw: object) -> list[StateItem]:
    """The keyed state as ``HGETALL`` of the state hash returns it (a flat list)."""
    flat = cast("list[bytes]", raw or [])
    items: list[StateItem] = []
    for field, value in zip(flat[::2], flat[1::2], strict=True):
        size, _, rest = field.partition(b":")
        topic, key = rest[: int(size)], rest[int(size) :]
        entry, _, rest = value.partition(b" ")
        size, _, rest = rest.partition(b":")
        length = int(size)
        items.append(
            (topic.decode(), key.decode(), seq_of(entry), rest[:length].decode(), rest[length:])
        )
    return items


def _client(settings: RedisSettings, *, reads: bool) -> aioredis.Redis:
    """A client for the log: reads (and the idempotent writes: owners) retry once on a
    fresh connection when a Redis restart broke the pooled one; appends never do (one may
    have gone through). Every command is bounded by ``settings.timeout``."""
    assert settings.url is not None
    options: dict[str, Any] = {
        "health_check_interval": 1,
        # the reader's XREAD (on the client that never retries) blocks _BLOCK seconds on top
        "socket_timeout": settings.timeout + (0.0 if reads else _BLOCK),
        "socket_connect_timeout": settings.timeout,
    }
    if reads:
        options |= {"retry": Retry(NoBackoff(), 1), "retry_on_error": [RedisConnectionError]}
    else:  # redis-py's cluster client would otherwise retry (an append twice) by itself
        options["retry"] = Retry(NoBackoff(), 0)
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

    def __init__(
        self, settings: RedisSettings, *, dedup_window: float, max_keys: int = 100_000
    ) -> None:
        if settings.url is None:
            raise ValueError("redis.url is not set")
        self.settings = settings
        self._epoch: str | None = None
        name = settings.stream
        self.stream = f"{{{name}}}:events"
        self._epoch_key = f"{{{name}}}:epoch"
        self._dedup_prefix = f"{{{name}}}:dedup:"
        self._owner_prefix = f"{{{name}}}:owner:"
        self._state_key = f"{{{name}}}:state"
        self._max_key = f"{{{name}}}:state:max"
        self.max_keys = max_keys
        self._window_ms = max(1, round(dedup_window * 1000))
        self._redis = _client(settings, reads=True)
        self._writes = _client(settings, reads=False)
        self._append = self._writes.register_script(_APPEND)
        self._position_script = self._redis.register_script(_POSITION)
        self._claim = self._redis.register_script(_CLAIM)
        self._refresh_claim = self._redis.register_script(_REFRESH)

    async def aclose(self) -> None:
        """Close the connections."""
        await self._redis.aclose()
        await self._writes.aclose()

    def _where(self) -> str:
        url = self.settings.url or ""
        return url.rpartition("@")[2]  # never a password in a log line

    async def _position(self, *, state: bool = False) -> tuple[str, str, list[StateItem]]:
        """The log's epoch (made on first use), the id of its newest entry and (``state``)
        the keyed state at that entry, all read at one moment."""
        keys = [self.stream, self._epoch_key, self._state_key]
        answer = await self._position_script(
            keys=keys, args=[secrets.token_hex(8), "1" if state else "0"]
        )
        epoch, last, items = cast("list[Any]", answer)
        return _text(epoch or b""), _text(last), _state(items)

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
        deleted: bool = False,
        idempotency_key: str = "",
    ) -> Published:
        """Append one event; its position (the first one's, for a repeated
        ``idempotency_key``). A keyed event (``key``) changes the keyed state in the same
        atomic step.

        With an ``idempotency_key``, an append whose connection broke is tried once more
        (the key makes that safe); without one it is not, since it may have been appended
        already.

        Raises:
            StateFull: a put of a new key beyond ``max_keys`` (nothing was appended).
            LogUnavailable: Redis cannot be reached; nothing was appended, or (a command
                that timed out) it may have been: retry with the same key.
        """
        epoch = await self.epoch()
        dedup = idempotency_key
        keys = [self.stream, self._dedup_prefix + dedup, self._state_key, self._max_key]
        op = ("del" if deleted else "put") if key else ""
        field = _field(topic, key)
        args: list[Any] = [self.settings.maxlen, self._window_ms, "1" if dedup else "0"]
        args += [op, field, _value(data, payload) if op == "put" else b"", self.max_keys]
        args += _fields(data, topic, to, payload, key, deleted)
        try:
            try:
                answer = await self._append(keys=keys, args=args)
            except RedisConnectionError:
                if not dedup:  # it may have been appended before the connection broke
                    raise
                answer = await self._append(keys=keys, args=args)  # the key makes it safe
        except RedisError as exc:
            self._epoch = None  # Redis may come back as a new log
            raise LogUnavailable(f"cannot append to the event log: {exc}") from exc
        entry, outcome = cast("list[Any]", answer)
        if outcome == 2:
            raise StateFull(
                "the keyed state holds as many keys as the replicas allow (state.max_keys): "
                f"{key!r} on topic {topic!r} was not put"
            )
        return Published(Position(epoch, seq_of(_text(entry))), bool(outcome))


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
        max_keys: int = 100_000,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        super().__init__(settings, dedup_window=dedup_window, max_keys=max_keys)
        self.hub = hub
        self._backoff = backoff
        self._rng = rng if rng is not None else random.Random()
        self._sleep = sleep
        self._last = "0-0"
        self._reader: asyncio.Task[None] | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._claimed: dict[int, str] = {}
        self.connected = asyncio.Event()
        """Set while the reader is following the stream."""
        self.disconnected = asyncio.Event()
        """Set while it is not (Redis unavailable)."""

    async def epoch(self) -> str:
        return self.hub.epoch  # the one this replica follows

    async def start(self) -> None:
        """Reach Redis, take its epoch and the stream's end, and start following it.

        Raises:
            LogUnavailable: Redis cannot be reached (the server does not start).
        """
        try:
            version = str((await self._redis.info("server")).get("redis_version", "0"))
            epoch, last, state = await self._position(state=True)
            # every appender (a Publisher straight to Redis too) honours the replicas' bound
            await self._redis.set(self._max_key, self.max_keys)
        except RedisError as exc:
            await self.aclose()
            raise LogUnavailable(f"cannot reach the event log at {self._where()}: {exc}") from exc
        if int(version.split(".")[0]) < 7:
            await self.aclose()
            # XINFO's entries-added, which tells a trimmed stream, came with Redis 7
            raise LogUnavailable(f"the event log needs Redis 7 or newer, not {version}")
        self.hub.start_at(epoch, seq_of(last), state)
        self.hub.backfill = self.backfill
        self._last = last
        self.connected.set()
        self._reader = asyncio.create_task(self._follow(), name="longlived-redis-reader")
        self._refresher = asyncio.create_task(self._refresh(), name="longlived-redis-claims")
        log.info("Following the event log %s at %s (epoch %s)", self.stream, self._where(), epoch)

    async def catch_up(self, timeout: float) -> None:
        """Wait until this replica's reader has delivered every entry appended so far (what
        this replica emitted included: an append returns before the reader has read it).

        Raises:
            LogUnavailable: Redis cannot be reached, or the reader is not there in time.
        """
        try:
            _, last, _ = await self._position()
        except RedisError as exc:
            raise LogUnavailable(f"cannot read the event log: {exc}") from exc
        try:
            async with asyncio.timeout(timeout):
                await self.hub.reach(seq_of(last))
        except TimeoutError:
            raise LogUnavailable(
                f"this replica has not read the event log up to {last} within {timeout:g}s"
            ) from None

    async def close(self) -> None:
        """Stop following and close the connections, within ``redis.timeout`` plus one
        read's block."""
        tasks = [task for task in (self._reader, self._refresher) if task is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            # a blocked XREAD can outlive its cancellation inside redis-py (seen with a
            # replica started beside another); closing the connections below ends it
            await asyncio.wait(tasks, timeout=self.settings.timeout + _BLOCK)
        await self.aclose()
        stuck = [task for task in tasks if not task.done()]
        if stuck:
            await asyncio.wait(stuck, timeout=self.settings.timeout)
        for task in stuck:
            if not task.done():
                log.warning("%s did not stop with the event log closed", task.get_name())

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

    async def claim(self, id: int, owner: str, *, take_over: bool = False) -> str:
        """Record ``owner`` as the holder of ``id`` (kept while its stream is open, and
        ``claim_ttl`` seconds after), unless another caller holds it and ``take_over`` is
        False; who holds it now.

        Raises:
            LogUnavailable: Redis cannot be reached.
        """
        key = f"{self._owner_prefix}{id}"
        args: list[str | int] = [owner, self.settings.claim_ttl, "1" if take_over else "0"]
        try:
            holder = _text(await self._claim(keys=[key], args=args))
        except RedisError as exc:
            raise LogUnavailable(f"cannot record the owner of {id}: {exc}") from exc
        if holder == owner:
            self._claimed[id] = owner
        return holder

    async def _refresh(self) -> None:
        """Keep the claims of open streams from expiring (every third of ``claim_ttl``)."""
        ttl = self.settings.claim_ttl
        while True:
            await self._sleep(ttl / 3)
            open_now = {
                id: owner
                for id, owner in self._claimed.items()
                if (sub := self.hub.get(id)) is not None and sub.owner == owner
            }
            self._claimed = open_now
            try:
                for id, owner in open_now.items():
                    await self._refresh_claim(keys=[f"{self._owner_prefix}{id}"], args=[owner, ttl])
            except RedisError as exc:
                _cancelled()
                log.warning("Could not refresh subscriber ownership in the event log: %s", exc)

    # ------------------------------------------------------------------ reading

    async def _follow(self) -> None:
        """The one reader: deliver every entry after the last one read, in order.

        It checks the log is still the one it follows (its epoch, and that nothing after
        its last entry was trimmed away) after a failure, when it is behind (a full batch)
        and every ``_CHECK`` seconds; it never ends on an error, only on cancellation.
        """
        loop = asyncio.get_running_loop()
        failures, checked = 0, loop.time()
        while True:
            try:
                if failures or loop.time() - checked > _CHECK:
                    await self._check()
                    checked = loop.time()
                    if failures:
                        failures = 0
                        self.disconnected.clear()
                        self.connected.set()
                        log.info("Following the event log at %s again", self._where())
                answer = await self._writes.xread(  # the client that never retries by itself
                    {self.stream: self._last}, block=round(_BLOCK * 1000), count=_BATCH
                )
                batch = [e for _, entries in cast("list[tuple[bytes, object]]", answer or [])
                         for e in _entries(entries)]  # fmt: skip
            except Exception as exc:  # Redis errors, and anything else: the reader goes on
                _cancelled()  # unless it is being stopped: redis-py may turn that into an error
                self.connected.clear()
                self.disconnected.set()
                delay = self._backoff.compute(min(failures, 64), self._rng)
                failures += 1
                log.warning("The event log at %s is unavailable (%r); reading again in %.2fs",
                            self._where(), exc, delay)  # fmt: skip
                await self._sleep(delay)
                continue
            for entry, fields in batch:
                self._deliver(entry, fields)
            if len(batch) == _BATCH:  # behind: make sure it has not been trimmed past us
                checked = loop.time() - _CHECK - 1

    async def _check(self) -> None:
        """Follow a new log if this one was lost; end every stream if events after the
        last one read were trimmed before this replica read them (its clients resume and
        get RESET rather than a silent gap)."""
        epoch, _, _ = await self._position()
        if epoch != self.hub.epoch:
            reason = EndReason.LOG_LOST
        elif await self._trimmed_after(seq_of(self._last)):
            reason = EndReason.EVENTS_LOST
        else:
            return
        epoch, last, state = await self._position(state=True)  # the state at one entry
        self.hub.log_lost(epoch, seq_of(last), state, reason=reason)
        self._last = last

    async def _trimmed_after(self, seq: int) -> bool:
        """Whether an entry after ``seq`` may have been trimmed away.

        Trimming takes the oldest first, so if the entry at ``seq`` is still there (or
        nothing was ever trimmed) nothing after it is missing. The entry just before the
        first one kept is unknown: ``seq`` naming it counts as trimmed too, no risk taken.
        """
        info = await self._redis.xinfo_stream(self.stream)
        first = info.get("first-entry")
        trimmed = int(info.get("entries-added", 0)) > int(info.get("length", 0))
        return trimmed and (first is None or seq < seq_of(_text(first[0])))

    def _deliver(self, entry: str, fields: dict[bytes, bytes]) -> None:
        self._last = entry
        try:
            seq = seq_of(entry)
            if seq <= self.hub.head.seq:  # read twice across a reconnect
                return
            to = fields.get(b"to")
            data = fields.get(b"d", b"").decode()
            topic = fields.get(b"t", b"").decode()
            key = fields.get(b"k", b"").decode()
            target = int(to) if to is not None else None
        except ValueError as exc:  # not one of ours (a bad id, bad UTF-8): never the reader's end
            log.error("Skipping entry %s of the event log: %s", entry, exc)
            return
        self.hub.deliver(
            seq, data, topic=topic, to=target, payload=fields.get(b"p", b""), key=key,
            deleted=b"x" in fields,
        )  # fmt: skip

    async def backfill(
        self, after: int, upto: int, id: int, topics: frozenset[str]
    ) -> list[bytes] | str:
        """The messages for subscriber ``id`` with ``after < seq <= upto``, read from the
        stream; or why it no longer has them (trimmed by ``MAXLEN``)."""
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
                        key=fields.get(b"k", b"").decode(),
                        deleted=b"x" in fields,
                    )
                )
            if len(entries) < 1000:
                break
            start = f"({entries[-1][0]}"
        # checked after reading: a trim during the reads is caught too
        if await self._trimmed_after(after):
            return "resume token older than the retained log"
        return messages
