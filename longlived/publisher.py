"""``Publisher``: emit events on a longlived server from another process, each one once.

A publish is one ``Publish`` call carrying an idempotency key. When an attempt fails for a
reason worth retrying (nothing listening, the connection broke, even after the server
emitted the event but before its answer came back, the server is shutting down, the attempt
took longer than ``publish.timeout``) the publisher waits a jittered backoff delay and sends
the same request again, with the same key: a server that already emitted the event answers
with the first position (``duplicate``) instead of emitting it twice.

Retrying is bounded twice: by ``backoff.max_attempts`` failed attempts (0: no limit of its
own), and always by ``publish.dedup_window``: no attempt is made that could end later than
that many seconds after the first one began, because past the window the server may have
forgotten the key and a retry could emit the event a second time. With the defaults a
publish keeps trying for about two minutes through a server restart, then raises
``RetriesExhausted``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import Self

import betterproto2
from grpclib.const import Cardinality
from grpclib.exceptions import GRPCError, ProtocolError

from longlived._connect import (
    RETRYABLE_ERRORS,
    RETRYABLE_STATUSES,
    call_metadata,
    describe,
    open_channel,
    pause,
)
from longlived._logfields import fields
from longlived._proto.google.protobuf import Any as ProtoAny
from longlived._proto.longlived import PublishReply, PublishRequest
from longlived._status import CallError
from longlived._transport import ResilientChannel, final_metadata
from longlived._wire import MAX_ID, NO_RETRY_HEADER, check_publish
from longlived.backoff import Backoff
from longlived.errors import (
    LogUnavailable,
    PublishRefused,
    RetriesExhausted,
    StateFull,
    TlsError,
)
from longlived.events import Position, Published
from longlived.payload import encode_payload
from longlived.redislog import RedisAppender
from longlived.settings import Settings

__all__ = ["Publisher"]

log = logging.getLogger(__name__)

PUBLISH_PATH = "/longlived.Longlived/Publish"
"""The Publish RPC exists in the ``longlived`` package only (the original proto has none)."""


class Publisher:
    """Publishes events on a longlived server, retrying without ever emitting one twice.

    ```python
    async with Publisher(settings=Settings()) as publisher:
        published = await publisher.publish("price changed", topic="orders")
        print(published.position.token)
        await publisher.publish("your order has shipped", to=7)
    ```

    Every publish carries an idempotency key, a fresh random one unless
    ``idempotency_key`` is given, and every retry of it carries the same key, so the server
    emits it once. Retrying stops after ``backoff.max_attempts`` failed attempts (0: no
    limit of its own), and always before an attempt could end more than
    ``publish.dedup_window`` seconds after the first one began: past the window the server
    may have forgotten the key. The publisher connects on its first publish; publishes from
    several tasks share its one connection.

    Args:
        settings: address, TLS, keepalive, ``auth.token``, ``backoff`` and ``publish``
            (``timeout`` per attempt; ``dedup_window``, which should be the server's).
        rng: randomness for backoff jitter (seed it for determinism).
        sleep: the sleep used between attempts (injected by tests).
        clock: the monotonic clock the retry budget is measured with (injected by tests).
        metadata: extra request metadata (for example an ``authorization`` header).
    """

    def __init__(
        self,
        *,
        settings: Settings | None = None,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.settings = settings if settings is not None else Settings()
        """The settings it was made with."""
        self.backoff: Backoff = self.settings.backoff.to_backoff()
        """The delays between attempts."""
        self.published = 0
        """Publishes the server answered (duplicates included)."""
        self.retries = 0
        """Attempts made again after a failure worth retrying."""
        self._rng = rng if rng is not None else random.Random()
        self._sleep = sleep
        self._clock = clock
        self._metadata = call_metadata(self.settings, metadata)
        self._channel: ResilientChannel | None = None
        self._direct = self.settings.publish.via == "redis"
        if self._direct and self.settings.redis.url is None:
            raise ValueError("publish.via is redis, but redis.url is not set")
        self._appender: RedisAppender | None = None
        self._closed = False
        self._stop = asyncio.Event()

    async def publish(
        self,
        data: str = "",
        *,
        topic: str = "",
        to: int | None = None,
        payload: betterproto2.Message | None = None,
        idempotency_key: str | None = None,
    ) -> Published:
        """Emit one event: to every subscriber matching ``topic``, or to the subscriber ``to``.

        Args:
            data: the text payload (``Response.data``).
            topic: the topic to publish on ("": subscribers without topics get it).
            to: the one subscriber id to send to (then ``topic`` must be empty).
            payload: a typed payload: any generated message of the app's (packed into a
                ``google.protobuf.Any``) or an ``Any`` already packed, passed to
                subscribers as it is; they decode it with ``client.events(MessageType)``.
            idempotency_key: None picks a fresh random one. A publish with a key the server
                saw within its window is not emitted again.

        Returns:
            The event's position; ``duplicate`` when the server had already emitted an
            event with this key (an earlier attempt whose answer was lost, or an earlier
            publish with the same ``key``), whose position it is.

        Raises:
            PublishRefused: the server refused the event with a status that retrying
                cannot change (``PERMISSION_DENIED``, ``INVALID_ARGUMENT``, ...).
            RetriesExhausted: every attempt allowed failed.
            TlsError: the server's certificate failed verification.
            ValueError: ``to`` is outside 0..2**31-1 or ``idempotency_key`` is empty.
            PayloadTypeError: ``payload`` is not a generated protobuf message.
            RuntimeError: the publisher is closed, or was closed during the publish (the
                event may or may not have been emitted).
        """
        if to is not None and not 0 <= to <= MAX_ID:
            # protobuf would silently keep the low 32 bits: 2**32 + 5 would go to 5
            raise ValueError(f"subscriber id {to} is out of range: it must be from 0 to {MAX_ID}")
        request = PublishRequest(data=data, topic=topic, to=to, payload=_as_any(payload))
        return await self._publish(request, idempotency_key)

    async def put(
        self,
        key: str,
        value: betterproto2.Message,
        *,
        topic: str = "",
        idempotency_key: str | None = None,
    ) -> Published:
        """Set ``key`` of the server's keyed state of ``topic`` to ``value`` (see
        ``SubscriptionManager.put``); retried as ``publish`` is.

        Raises:
            PublishRefused: as ``publish``; ``RESOURCE_EXHAUSTED`` when ``key`` is new and
                the state holds ``state.max_keys`` keys.
        """
        request = PublishRequest(topic=topic, key=key, payload=_as_any(value))
        return await self._publish(request, idempotency_key)

    async def delete(
        self, key: str, *, topic: str = "", idempotency_key: str | None = None
    ) -> Published:
        """Remove ``key`` from the server's keyed state of ``topic``; retried as ``publish``."""
        return await self._publish(
            PublishRequest(topic=topic, key=key, delete=True), idempotency_key
        )

    async def _publish(self, request: PublishRequest, idempotency_key: str | None) -> Published:
        if self._closed:
            raise RuntimeError("publisher is closed")
        if idempotency_key == "":
            raise ValueError("an idempotency key must not be empty (None picks a fresh one)")
        request.idempotency_key = idempotency_key or uuid.uuid4().hex
        reply = await self._send(request)
        self.published += 1
        return Published(_position(reply), reply.duplicate)

    async def _send(self, request: PublishRequest) -> PublishReply:
        """Attempt ``request`` until it is answered, refused or out of attempts."""
        key = request.idempotency_key
        deadline = self._clock() + self.settings.publish.dedup_window
        attempt = 0
        while True:
            if self._closed:
                raise RuntimeError("publisher is closed")
            channel = None if self._direct else self._get_channel()
            try:
                reply = await self._attempt(channel, request)
            except GRPCError as exc:
                if exc.status not in RETRYABLE_STATUSES:
                    raise PublishRefused(exc.status.name, exc.message) from exc
                error: BaseException = exc
            except ssl.SSLCertVerificationError as exc:
                raise TlsError(f"{self.settings.address}: {exc.verify_message or exc}") from exc
            except (*RETRYABLE_ERRORS, LogUnavailable) as exc:
                error = exc
            else:
                if attempt:
                    log.info("Publish %s: answered after %d failed attempts", key, attempt)
                return reply
            if channel is not None and not isinstance(error, GRPCError):
                # the connection failed; a status came over a working one (a server that is
                # draining closes it with GOAWAY itself)
                self._drop_channel(channel)
            if self._closed:
                raise RuntimeError(
                    "publisher closed while publishing: the event may or may not have been emitted"
                ) from error
            attempt += 1
            delay = self._delay(attempt, error, deadline)
            self.retries += 1
            log.warning("Publish %s: %s; retrying in %.2fs", key, describe(error), delay,
                        extra=fields(delay=delay))  # fmt: skip
            await pause(self._sleep, delay, self._stop)

    def _delay(self, failed: int, error: BaseException, deadline: float) -> float:
        """The backoff before the next attempt, or ``RetriesExhausted`` if there is none."""
        delay = self.backoff.compute(failed - 1, self._rng)
        limit = self.settings.backoff.max_attempts
        # the next attempt must end while the server still remembers the key
        too_late = self._clock() + delay + self.settings.publish.timeout > deadline
        if (limit and failed >= limit) or too_late:
            raise RetriesExhausted(failed, error) from error
        return delay

    async def _attempt(
        self, channel: ResilientChannel | None, request: PublishRequest
    ) -> PublishReply:
        """One Publish call (or, with no channel, one append to Redis), within
        ``publish.timeout``."""
        if channel is None:
            return await self._append(request)
        async with asyncio.timeout(self.settings.publish.timeout):
            stream = channel.request(
                PUBLISH_PATH, Cardinality.UNARY_UNARY, PublishRequest, PublishReply,
                metadata=self._metadata or None,
            )  # fmt: skip
            try:
                async with stream:
                    await stream.send_message(request, end=True)
                    reply = await stream.recv_message()
            except GRPCError as exc:
                # raised on the way out too: a large request is refused while still being sent
                if NO_RETRY_HEADER in final_metadata(stream):
                    raise PublishRefused(exc.status.name, exc.message) from exc
                raise
        if reply is None:
            raise ProtocolError("the server ended the Publish call without an answer")
        return reply

    async def _append(self, request: PublishRequest) -> PublishReply:
        """Append ``request`` to the shared log directly, as a server would after checking it."""
        try:
            check_publish(request)
        except CallError as exc:
            raise PublishRefused(exc.code.name, exc.message) from None
        size, limit = len(bytes(request)), self.settings.limits.max_event_size
        if size > limit:
            raise PublishRefused("RESOURCE_EXHAUSTED", f"event of {size} bytes exceeds {limit}")
        if self._appender is None:
            self._appender = RedisAppender(
                self.settings.redis,
                dedup_window=self.settings.publish.dedup_window,
                max_keys=self.settings.state.max_keys,
            )
        appender = self._appender
        try:
            async with asyncio.timeout(self.settings.publish.timeout):
                published = await appender.append(
                    request.data,
                    topic=request.topic,
                    to=request.to,
                    payload=bytes(request.payload) if request.payload is not None else b"",
                    key=request.key,
                    deleted=request.delete,
                    idempotency_key=request.idempotency_key,
                )
        except StateFull as exc:
            raise PublishRefused("RESOURCE_EXHAUSTED", str(exc)) from None
        position = published.position
        return PublishReply(seq=position.seq, token=position.token, duplicate=published.duplicate)

    def _get_channel(self) -> ResilientChannel:
        if self._channel is None:
            self._channel = open_channel(self.settings)
        return self._channel

    def _drop_channel(self, channel: ResilientChannel) -> None:
        """Close ``channel`` after a failure; the next attempt opens a new connection."""
        if self._channel is channel:
            self._channel = None
        channel.close()  # publishes in flight on it fail too, and retry with their own keys

    async def aclose(self) -> None:
        """Close the connection. Idempotent.

        A publish still in flight in another task raises ``RuntimeError``; its event may or
        may not have been emitted.
        """
        self._closed = True
        self._stop.set()
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self._appender is not None:
            await self._appender.aclose()
            self._appender = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def _as_any(payload: betterproto2.Message | None) -> ProtoAny | None:
    """``payload`` as longlived's own ``Any`` class: packed, unless it is an ``Any`` already
    (longlived's or the app's own generated class), whose bytes are kept as they are."""
    if payload is None or isinstance(payload, ProtoAny):
        return payload
    return ProtoAny.FromString(encode_payload(payload))


def _position(reply: PublishReply) -> Position:
    """The position a reply names."""
    position = Position.parse(reply.token)
    if position is None:
        # the event was emitted: failing now would only make the caller publish it again
        log.warning("The server answered a token that names no position: %r", reply.token)
        return Position("", reply.seq)
    return position
