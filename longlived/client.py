"""``ResilientClient``: subscribe, receive, back off, resume.

A client holds one subscription id and remembers the position (token) of the last message
it received. Iterating it yields the DATA ``Response`` messages the server sends; when the
stream fails for a reason worth retrying (the server went away, the connection broke, the
server is shutting down, the subscriber was too slow, heartbeats stopped) it logs the
failure, waits a jittered backoff delay and subscribes again with its token, so the server
replays what it missed: no gap, and duplicates are dropped.

A stream the server ends with OK (``Unsubscribe``, or a newer subscription with the same
id) ends the iteration; a RESET raises ``ResumeExpired`` (resync, then iterate again); a
server certificate that fails verification raises ``TlsError``; any other status raises
``SubscriptionClosed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Collection, Mapping
from types import TracebackType
from typing import Literal, Self, TypeVar

import betterproto2
from grpclib.const import Cardinality
from grpclib.exceptions import GRPCError

from longlived._connect import (
    RETRYABLE_ERRORS,
    RETRYABLE_STATUSES,
    call_metadata,
    describe,
    open_channel,
    pause,
)
from longlived._logfields import fields
from longlived._proto.longlived import Request, Response, ResponseKind
from longlived._transport import ResilientChannel
from longlived._wire import HEARTBEAT_HEADER, MAX_ID, NO_RETRY_HEADER, check_topics
from longlived.backoff import Backoff
from longlived.errors import ResumeExpired, RetriesExhausted, SubscriptionClosed, TlsError
from longlived.events import Position
from longlived.metrics import Sample, client_samples
from longlived.payload import TypedEvent, unpack
from longlived.settings import Settings

__all__ = ["RETRYABLE_STATUSES", "ResilientClient"]

M = TypeVar("M", bound=betterproto2.Message)

log = logging.getLogger(__name__)


class ResilientClient:
    """A subscription that survives server restarts and broken connections without loss.

    ```python
    async with ResilientClient(7, settings=Settings()) as client:
        while True:
            try:
                async for response in client:
                    print(response.data)
                break  # the server ended the subscription (Unsubscribe)
            except ResumeExpired:
                resync()  # events were lost: rebuild state, then carry on
    ```

    ``connected`` is set while a stream is open (the server has registered the id);
    ``disconnected`` is set while it is not. Both are ``asyncio.Event`` objects, so apps
    and tests can wait on them. ``token`` is the position to resume from: persist it to
    resume in a later process (``resume_token=``).

    Args:
        id: the subscriber id sent in every ``Subscribe``: from 0 to 2**31 - 1 (the wire
            carries an int32, and the server refuses negative ids).
        settings: address, backoff, package, topics, heartbeat and timeouts.
        topics: receive only events published on these topics (default
            ``settings.topics``; empty: all). Events sent to this id always arrive.
        resume_token: start after this position instead of live.
        rng: randomness for backoff jitter (seed it for determinism).
        sleep: the sleep used between attempts (injected by tests).
        metadata: extra request metadata (for example an ``authorization`` header).
        snapshot: follow the keyed state: every stream without a usable token starts
            with the current values (SNAPSHOT messages), then SYNCED, and iterating yields
            those too; a lost position gets a fresh snapshot instead of RESET. ``WatchCache``
            builds on this.

    Raises:
        ValueError: ``id`` is out of range, or a topic name is not allowed.
    """

    def __init__(
        self,
        id: int,
        *,
        settings: Settings | None = None,
        topics: Collection[str] | None = None,
        resume_token: str = "",
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        metadata: Mapping[str, str] | None = None,
        snapshot: bool = False,
    ) -> None:
        if not 0 <= id <= MAX_ID:
            # protobuf would silently keep the low 32 bits: 2**32 + 5 would subscribe as 5
            raise ValueError(f"subscriber id {id} is out of range: it must be from 0 to {MAX_ID}")
        self.id = id
        """The subscriber id."""
        self.snapshot = snapshot
        """Whether it follows the keyed state (SNAPSHOT, SYNCED, then changes)."""
        self.settings = settings if settings is not None else Settings()
        """The settings it was made with."""
        self.topics = list(self.settings.topics if topics is None else topics)
        """The topics it receives (empty: every topic)."""
        if (problem := check_topics(self.topics)) is not None:
            raise ValueError(problem)
        self.backoff: Backoff = self.settings.backoff.to_backoff()
        """The delays between attempts."""
        self.connected = asyncio.Event()
        """Set while a stream is open (the server has registered the id)."""
        self.disconnected = asyncio.Event()
        """Set while no stream is open."""
        self.disconnected.set()
        self.connections = 0
        """How many times a stream has been opened."""
        self.failures = 0
        """How many attempts have failed in total."""
        self.duplicates = 0
        """Messages dropped because they were already delivered."""
        self.delivered = 0
        """DATA messages handed to the app."""
        self.resets = 0
        """RESET messages received."""
        self._token = resume_token
        self._position = Position.parse(resume_token)
        self._rng = rng if rng is not None else random.Random()
        self._sleep = sleep
        self._metadata = call_metadata(self.settings, metadata)
        self._channel: ResilientChannel | None = None
        self._iterator: AsyncGenerator[Response, None] | None = None
        self._closed = False
        self._stop = asyncio.Event()
        self._progress = False
        self._reset_streak = 0
        self._reading = False  # an iteration is waiting for the next message

    @property
    def token(self) -> str:
        """Position of the last message received ("" before the first)."""
        return self._token

    @property
    def closed(self) -> bool:
        """Whether ``aclose()`` was called."""
        return self._closed

    @property
    def package(self) -> Literal["longlived", "protos"]:
        """Proto package of the paths called (``protos`` for the original Go server)."""
        return self.settings.package

    @property
    def heartbeat(self) -> float:
        """Heartbeat period asked of the server, seconds (0: none)."""
        return self.settings.heartbeat.interval

    def _path(self, method: str) -> str:
        return f"/{self.package}.Longlived/{method}"

    def _request(self) -> Request:
        return Request(
            id=self.id,
            resume_token=self._token,
            topics=self.topics,
            heartbeat_ms=_milliseconds(self.heartbeat),
            accept_control=True,
            snapshot=self.snapshot,
        )

    def _get_channel(self) -> ResilientChannel:
        if self._channel is None:
            self._channel = open_channel(self.settings)
        return self._channel

    def _drop_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    # ------------------------------------------------------------------ receiving

    def __aiter__(self) -> AsyncGenerator[Response, None]:
        if self._closed:
            raise RuntimeError("client is closed")
        if self._iterator is None:
            # the first iteration, or the previous one ended (RESET, unsubscribe): start anew
            self._iterator = self._messages()
        return self._iterator

    async def events(self, message_type: type[M]) -> AsyncIterator[TypedEvent[M]]:
        """Iterate as ``async for response in client``, each event's payload decoded as
        ``message_type`` (the app's own generated message):

        ```python
        async for event in client.events(Order):
            print(event.payload.id)  # an Order, for mypy too
        ```

        Only events with a value come through: a snapshot's SNAPSHOT messages and the puts
        of keyed state (``key`` set), not SYNCED nor deletes; follow keyed state with
        ``WatchCache``, which sees all of them.

        Raises what iterating raises, and ``PayloadTypeError`` for an event whose payload
        is missing or of another type (the client's position is already past it).
        """
        async for response in self:
            if response.kind == ResponseKind.SYNCED or response.deleted:
                continue
            yield TypedEvent(
                payload=unpack(response.payload, message_type),
                token=response.token,
                topic=response.topic,
                data=response.data,
                key=response.key,
            )

    async def _messages(self) -> AsyncGenerator[Response, None]:
        try:
            async with contextlib.aclosing(self._attempts()) as attempts:
                self._reading = True
                async for response in attempts:
                    self._reading = False
                    yield response
                    self._reading = True
        finally:
            self._reading = False
            self._iterator = None

    async def _attempts(self) -> AsyncGenerator[Response, None]:
        if self._reset_streak > 1:
            # RESET after RESET with no event in between: do not hammer the server
            delay = self.backoff.compute(min(self._reset_streak - 2, 64), self._rng)
            log.warning("Client ID %d: repeated RESET; resubscribing in %.2fs", self.id, delay,
                        extra=fields(subscriber=self.id, delay=delay))  # fmt: skip
            await self._pause(delay)
        attempt = 0
        while not self._closed:
            self._progress = False
            try:
                async with contextlib.aclosing(self._stream_once()) as stream:
                    async for response in stream:
                        yield response
                if not self._closed:
                    log.info("Client ID %d: the server ended the subscription", self.id,
                             extra=fields(subscriber=self.id, token=self._token))  # fmt: skip
                return
            except GRPCError as exc:
                if exc.status not in RETRYABLE_STATUSES:
                    raise SubscriptionClosed(exc.status.name, exc.message) from exc
                error: BaseException = exc
            except ssl.SSLCertVerificationError as exc:
                raise TlsError(f"{self.settings.address}: {exc.verify_message or exc}") from exc
            except RETRYABLE_ERRORS as exc:
                error = exc
            if self._closed:
                return
            if self._progress:
                attempt = 0  # that stream delivered messages: start the backoff afresh
            self.failures += 1
            self._drop_channel()
            attempt += 1
            limit = self.settings.backoff.max_attempts
            if limit and attempt >= limit:
                raise RetriesExhausted(attempt, error) from error
            delay = self.backoff.compute(attempt - 1, self._rng)
            log.warning("Client ID %d: %s; resubscribing in %.2fs", self.id, describe(error), delay,
                        extra=fields(subscriber=self.id, delay=delay))  # fmt: skip
            await self._pause(delay)

    async def _pause(self, delay: float) -> None:
        """Sleep ``delay`` seconds, or less if the client is closed meanwhile."""
        await pause(self._sleep, delay, self._stop)

    async def _stream_once(self) -> AsyncGenerator[Response, None]:
        channel = self._get_channel()
        async with channel.request(
            self._path("Subscribe"), Cardinality.UNARY_STREAM, Request, Response,
            metadata=self._metadata or None,
        ) as stream:  # fmt: skip
            try:
                async with asyncio.timeout(self.settings.connect_timeout):
                    await stream.send_message(self._request(), end=True)
                    await stream.recv_initial_metadata()
            except GRPCError as exc:
                if NO_RETRY_HEADER in (stream.trailing_metadata or {}):
                    raise SubscriptionClosed(exc.status.name, exc.message) from exc
                raise
            if self._closed:  # aclose() while the server answered: the channel is closed
                return
            silence = self._silence(stream.initial_metadata)
            self._set_connected(True)
            try:
                while True:
                    async with asyncio.timeout(silence):
                        response = await stream.recv_message()
                    if response is None or self._closed:  # nothing after aclose() returned
                        return
                    self._progress = True
                    if self._accept(response):
                        yield response
            except TimeoutError:
                log.warning("Client ID %d: no message for %.1fs: stream is dead", self.id, silence,
                            extra=fields(subscriber=self.id, token=self._token))  # fmt: skip
                raise
            finally:
                self._set_connected(False)

    def _silence(self, metadata: Mapping[str, str | bytes] | None) -> float | None:
        """How long the stream may stay silent: ``misses`` x the heartbeat period granted."""
        if not self.heartbeat:
            return None
        granted = (metadata or {}).get(HEARTBEAT_HEADER)
        period = self.heartbeat
        if isinstance(granted, str) and granted.isdecimal():
            period = max(period, int(granted) / 1000)
        return period * self.settings.heartbeat.misses

    def _accept(self, response: Response) -> bool:
        """Track the position; True if ``response`` is new DATA for the app."""
        if response.kind == ResponseKind.RESET:
            self.resets += 1
            self._reset_streak += 1
            self._move_to(response)
            log.warning("Client ID %d: RESET from the server: %s", self.id, response.data,
                        extra=fields(subscriber=self.id, token=response.token))  # fmt: skip
            raise ResumeExpired(response.token, response.data)
        if response.kind in _STATE_KINDS:  # a snapshot replaces the state: never a duplicate
            self._move_to(response)
            return True
        position = Position.parse(response.token)
        if (
            position is not None
            and self._position is not None
            and position.epoch == self._position.epoch
            and position.seq <= self._position.seq
        ):
            if response.kind == ResponseKind.DATA:
                self.duplicates += 1
            return False
        self._move_to(response)
        if response.kind != ResponseKind.DATA:
            return False
        self._reset_streak = 0
        self.delivered += 1
        return True

    def forget_position(self) -> None:
        """Subscribe afresh next time (live, or from a new snapshot): drop the token."""
        self._token, self._position = "", None

    def _move_to(self, response: Response) -> None:
        if response.token:  # the original server sends no positions
            self._token = response.token
            self._position = Position.parse(response.token)

    def _set_connected(self, up: bool) -> None:
        if up:
            self.connections += 1
            log.info("Client ID %d subscribed to %s", self.id, self.settings.address,
                     extra=fields(subscriber=self.id, peer=self.settings.address))  # fmt: skip
            self.disconnected.clear()
            self.connected.set()
        else:
            self.connected.clear()
            self.disconnected.set()

    def stats(self) -> list[Sample]:
        """The client's counters, as a metrics endpoint serves them."""
        return client_samples([self])

    # -------------------------------------------------------------------- control

    async def unsubscribe(self) -> Response:
        """Ask the server to end this id's stream (status OK ends the iteration).

        Raises:
            SubscriptionClosed: NOT_FOUND when the server has no subscriber with this id.
            RuntimeError: the client is closed.
        """
        if self._closed:  # a channel opened now would never be closed
            raise RuntimeError("client is closed")
        channel = self._get_channel()
        try:
            async with (
                asyncio.timeout(self.settings.connect_timeout),
                channel.request(
                    self._path("Unsubscribe"), Cardinality.UNARY_UNARY, Request, Response,
                    metadata=self._metadata or None,
                ) as stream,
            ):  # fmt: skip
                await stream.send_message(Request(id=self.id), end=True)
                response = await stream.recv_message()
        except GRPCError as exc:
            raise SubscriptionClosed(exc.status.name, exc.message) from exc
        assert response is not None
        return response

    async def aclose(self) -> None:
        """Stop receiving and close the connection. Idempotent.

        Safe to call from another task than the one iterating, even while it is still
        connecting: that iteration then ends, and yields no message once this returned.
        """
        self._closed = True
        self._stop.set()
        iterator, self._iterator = self._iterator, None
        self._drop_channel()  # ends a stream being read in another task, or its connect
        if iterator is not None and not self._reading:
            await iterator.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


_STATE_KINDS = frozenset({ResponseKind.SNAPSHOT, ResponseKind.SYNCED})


def _milliseconds(period: float) -> int:
    """``period`` seconds in whole milliseconds; never 0 for a period > 0 (0 asks for none)."""
    return max(round(period * 1000), 1) if period > 0 else 0
