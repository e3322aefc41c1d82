"""One object per call: the rules of ``Subscribe`` and ``Unsubscribe``, without gRPC.

A call admits its request (authentication first, then the body, within
``limits.admission_timeout``), checks it, authorizes it (ownership of an id outlives its
stream while events sent to it can still be replayed), registers the subscriber, writes
its messages and heartbeats, and ends with a status. It talks to its peer only through a
``CallTransport``: the grpclib one in ``_transport``, an in-process one for
``SubscriptionManager.subscribe``, or a fake in tests.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol, TypeVar

import betterproto2

from longlived._logfields import fields
from longlived._proto.longlived import PublishReply, PublishRequest, Request, Response
from longlived._status import CallError, Code
from longlived._wire import HEARTBEAT_HEADER, check_publish, check_request
from longlived.auth import Caller
from longlived.errors import LogUnavailable, StateFull
from longlived.events import Position
from longlived.subscriber import EndReason, Subscriber

if TYPE_CHECKING:
    from longlived.events import Published
    from longlived.hub import Hub
    from longlived.settings import Settings

__all__ = [
    "END_STATUS",
    "CallHost",
    "CallTransport",
    "PublishCall",
    "SubscribeCall",
    "UnsubscribeCall",
]

log = logging.getLogger("longlived.server")

M = TypeVar("M", bound=betterproto2.Message)

END_STATUS = {
    EndReason.UNSUBSCRIBED: Code.OK,
    EndReason.REPLACED: Code.OK,
    EndReason.TOO_SLOW: Code.RESOURCE_EXHAUSTED,
    EndReason.SHUTDOWN: Code.UNAVAILABLE,
    EndReason.MAX_AGE: Code.UNAVAILABLE,
    EndReason.LOG_LOST: Code.UNAVAILABLE,
    EndReason.EVENTS_LOST: Code.UNAVAILABLE,
}
"""The status a stream ends with, by why it ended."""


class CallTransport(Protocol):
    """What a call needs of its peer's stream."""

    @property
    def peer(self) -> str:
        """The peer's address, for log lines."""
        ...

    @property
    def metadata(self) -> Mapping[str, str | bytes]:
        """The request metadata (available before the body)."""
        ...

    async def read_request(self, message_type: type[M], *, max_size: int) -> M:
        """The one request message; raises ``CallError`` naming what is wrong with it."""
        ...

    def admitted(self) -> None:
        """The call passed admission: it no longer counts as a stream awaiting admission."""

    async def start(self, metadata: Mapping[str, str] | None, abort: asyncio.Event) -> bool:
        """Send the initial metadata; False if ``abort`` was set first."""
        ...

    async def write(self, messages: Sequence[bytes], abort: asyncio.Event) -> int:
        """Write ``messages`` in order; how many were written (fewer only if aborted)."""
        ...

    def try_write(self, message: bytes) -> bool:
        """Write one message at once if the peer can take it without any wait; False
        (nothing written) otherwise. Called only between ``start`` and ``finish``, while
        ``write`` is not running."""
        ...

    async def reply(self, message: bytes, *, timeout: float) -> None:
        """Send the single response message of a unary call; drop the peer if it cannot
        take it within ``timeout``."""

    async def finish(
        self, code: Code, message: str | None, *, final: bool = False, timeout: float
    ) -> None:
        """Send the final status; drop the peer if it cannot take it within ``timeout``."""


class CallHost(Protocol):
    """What a call needs of the server: settings, the hub, the hooks and the counters."""

    settings: Settings
    hub: Hub
    messages_sent: int
    rng: random.Random

    @property
    def accepting(self) -> bool:
        """Whether new subscriptions are accepted (False while draining)."""
        ...

    async def authenticate(self, metadata: Mapping[str, str | bytes]) -> Caller | None:
        """Who is calling; None refuses the call."""
        ...

    def authorize_subscribe(self, caller: Caller, request: Request) -> bool:
        """Whether ``caller`` may subscribe as ``request.id``."""
        ...

    def authorize_unsubscribe(self, caller: Caller, id: int, owner: str) -> bool:
        """Whether ``caller`` may end (or take over) the id ``owner`` holds."""
        ...

    def authorize_publish(self, caller: Caller, request: PublishRequest) -> bool:
        """Whether ``caller`` may publish ``request``."""
        ...

    async def emit(
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
        """Emit one event."""
        ...

    async def owner_of(self, id: int) -> str | None:
        """Who holds ``id`` (see ``Hub.owner``; on every replica with a shared log)."""
        ...

    async def claim(self, id: int, owner: str, *, take_over: bool = False) -> str:
        """Record that ``owner`` holds ``id`` (where the hub alone does not), unless another
        caller does and ``take_over`` is False; who holds it now."""
        ...

    def refused(self, code: Code, message: str, peer: str) -> None:
        """Count and log a refused call."""


async def admit(
    host: CallHost,
    transport: CallTransport,
    message_type: type[M],
    *,
    max_size: int,
    check: Callable[[M], None],
) -> tuple[M, Caller]:
    """Authenticate, then read and ``check`` the request, within the admission timeout.

    Authentication comes first, from the metadata: a stranger's body is never read, and
    strangers learn nothing of the request rules.
    """
    limit = host.settings.limits.admission_timeout
    try:
        async with asyncio.timeout(limit):
            caller = await host.authenticate(transport.metadata)
            if caller is None:
                raise CallError(Code.UNAUTHENTICATED, "missing or invalid bearer token")
            request = await transport.read_request(message_type, max_size=max_size)
    except TimeoutError:
        raise CallError(
            Code.DEADLINE_EXCEEDED, f"no complete request within {limit:g}s of the call"
        ) from None
    check(request)
    return request, caller


async def admit_request(host: CallHost, transport: CallTransport) -> tuple[Request, Caller]:
    """``admit`` for the ``Request`` of Subscribe and Unsubscribe."""
    return await admit(
        host,
        transport,
        Request,
        max_size=host.settings.limits.max_message_size,
        check=check_request,
    )


async def check_owner(host: CallHost, caller: Caller, id: int, action: str) -> str | None:
    """Refuse ``caller`` acting on ``id`` if another caller holds it; the holder, if any."""
    try:
        # every unauthenticated caller is the same one: their ids are only this replica's
        owner = await host.owner_of(id) if caller.authenticated else host.hub.owner(id)
    except LogUnavailable as exc:  # fail closed: nobody's ownership is guessed
        raise CallError(Code.UNAVAILABLE, str(exc)) from None
    if owner is not None and not host.authorize_unsubscribe(caller, id, owner):
        raise CallError(Code.PERMISSION_DENIED, f"{caller.name} may not {action} {id}")
    return owner


class _Call:
    """What every call has: its server, its peer, and the way it refuses."""

    def __init__(self, host: CallHost, transport: CallTransport) -> None:
        self.host = host
        self.transport = transport

    def _fields(self, sub: Subscriber, status: Code | None = None) -> dict[str, object]:
        """The log fields of a line about ``sub``'s stream."""
        name = status.name if status is not None else None
        return fields(subscriber=sub.id, peer=self.transport.peer, status=name)

    async def _refuse(self, exc: CallError) -> None:
        """Count, log and answer a refusal."""
        self.host.refused(exc.code, exc.message, self.transport.peer)
        await self.transport.finish(
            exc.code, exc.message, final=exc.final, timeout=self.host.settings.drain_timeout
        )


class SubscribeCall(_Call):
    """One ``Subscribe``: admission, registration, the write loop and the final status."""

    async def run(self) -> None:
        """Serve the call to its end; it never raises ``CallError``."""
        host, transport = self.host, self.transport
        try:
            request, caller = await admit_request(host, transport)
            await self._authorize(request, caller)
            await self._caught_up(request.resume_token)
        except CallError as exc:
            await self._refuse(exc)
            return
        transport.admitted()
        log.info("Received subscribe request from ID: %d", request.id, extra=fields(
            subscriber=request.id, peer=transport.peer, token=request.resume_token))  # fmt: skip
        sub = host.hub.register(
            request.id,
            topics=request.topics,
            resume=request.resume_token,
            control=request.accept_control or request.heartbeat_ms > 0,
            snapshot=request.snapshot,
            owner=caller.name,
        )
        try:
            if sub.gap is not None and not await self._fill(sub):
                return
            await self._stream(sub, request)
        except asyncio.CancelledError:
            if sub.end_reason is None:
                log.info("Client ID %d disconnected", sub.id, extra=self._fields(sub))
            raise
        except Exception as exc:  # logged here, answered here: not raised to be logged again
            log.warning("Failed to send data to client %d: %r", sub.id, exc,
                        extra=self._fields(sub, Code.UNKNOWN))  # fmt: skip
            await self._abandon(sub, Code.UNKNOWN, "internal error")
        finally:
            host.hub.release(sub)

    async def _abandon(self, sub: Subscriber, code: Code, message: str) -> None:
        """End the call early: ``sub`` leaves the hub before the status, which may take a
        while to go out."""
        self.host.hub.release(sub)
        await self.transport.finish(code, message, timeout=self.host.settings.drain_timeout)

    async def _caught_up(self, token: str) -> None:
        """With a shared log, a token from a replica ahead of this one (its reader is
        behind) waits until this one has read that far; UNAVAILABLE if it does not within
        ``redis.timeout``."""
        hub = self.host.hub
        position = Position.parse(token) if token else None
        if hub.backfill is None or position is None or position.epoch != hub.epoch:
            return
        limit = self.host.settings.redis.timeout
        try:
            async with asyncio.timeout(limit):
                await hub.reach(position.seq)
        except TimeoutError:
            raise CallError(
                Code.UNAVAILABLE,
                f"this replica has not read up to the resume position within {limit:g}s",
            ) from None

    async def _fill(self, sub: Subscriber) -> bool:
        """Fetch what ``sub`` missed before the history from the shared log; False (and
        the call answered UNAVAILABLE, so the client retries) if the log cannot be read."""
        try:
            await self.host.hub.fill(sub)
        except Exception as exc:  # the log's own errors: a connection lost, a timeout
            log.warning("Client ID %d cannot resume now: the event log failed: %r", sub.id, exc,
                        extra=self._fields(sub, Code.UNAVAILABLE))  # fmt: skip
            await self._abandon(sub, Code.UNAVAILABLE, "the event log is unavailable; retry")
            return False
        return True

    async def _authorize(self, request: Request, caller: Caller) -> None:
        host, id = self.host, request.id
        if not host.accepting:
            raise CallError(Code.UNAVAILABLE, "server shutting down")
        if not host.authorize_subscribe(caller, request):
            raise CallError(Code.PERMISSION_DENIED, f"{caller.name} may not subscribe as {id}")
        # taking over an id ends its stream or reads its events: the rule of Unsubscribe,
        # and it holds while the id's events can still be replayed, not only while it is open
        owner = await check_owner(host, caller, id, "take over the subscription")
        limit = host.settings.limits.max_subscribers
        if id not in host.hub and len(host.hub) >= limit:
            raise CallError(Code.RESOURCE_EXHAUSTED, f"too many subscribers (limit {limit})")
        if not caller.authenticated:
            return
        try:
            holder = await host.claim(id, caller.name, take_over=owner not in (None, caller.name))
        except LogUnavailable as exc:
            raise CallError(Code.UNAVAILABLE, str(exc)) from None
        if holder != caller.name:  # another caller claimed it since the check
            raise CallError(Code.PERMISSION_DENIED, f"{caller.name} may not take over {id}")

    async def _stream(self, sub: Subscriber, request: Request) -> None:
        """Write ``sub``'s messages (heartbeats when idle) until it ends, then its status."""
        host, transport = self.host, self.transport
        settings = host.settings
        heartbeat = (
            max(request.heartbeat_ms / 1000, settings.heartbeat.min_interval)
            if request.heartbeat_ms
            else None
        )
        age = self._max_age_timer(sub)
        try:
            # the client judges silence by the period actually granted
            granted = {HEARTBEAT_HEADER: str(round(heartbeat * 1000))} if heartbeat else None
            if await transport.start(granted, sub.aborted):
                sub.sink = self._direct
                while (batch := await sub.take(idle=heartbeat)) is not None:
                    # an abort leaves the rest unwritten; take() then reports the end
                    sent = await transport.write(batch or [host.hub.heartbeat()], sub.aborted)
                    host.messages_sent += sent  # after the await: direct writes count meanwhile
        finally:
            sub.sink = None
            if age is not None:
                age.cancel()
        reason = sub.end_reason
        assert reason is not None  # only an end (or its flush deadline) aborts
        log.info("Stream of client ID %d ended: %s", sub.id, reason.value,
                 extra=self._fields(sub, END_STATUS[reason]))  # fmt: skip
        await transport.finish(END_STATUS[reason], reason.value, timeout=settings.drain_timeout)

    def _direct(self, message: bytes) -> bool:
        """``sub.sink``: a message written at once, without queue or task switch."""
        if self.transport.try_write(message):
            self.host.messages_sent += 1
            return True
        return False

    def _max_age_timer(self, sub: Subscriber) -> asyncio.TimerHandle | None:
        """End ``sub`` after ``max_connection_age`` ±10 % (one timer per stream)."""
        age = self.host.settings.max_connection_age
        if age is None:
            return None
        delay = age * self.host.rng.uniform(0.9, 1.1)
        return asyncio.get_running_loop().call_later(
            delay, self.host.hub.end_subscriber, sub, EndReason.MAX_AGE
        )


class UnsubscribeCall(_Call):
    """One ``Unsubscribe``: admission, authorization, ending the stream, the answer."""

    async def run(self) -> None:
        """Serve the call to its end; it never raises ``CallError``."""
        host, transport = self.host, self.transport
        timeout = host.settings.drain_timeout
        try:
            request, caller = await admit_request(host, transport)
            sub = host.hub.get(request.id)
            if sub is not None:
                await check_owner(host, caller, request.id, "unsubscribe")
        except CallError as exc:
            await self._refuse(exc)
            return
        if sub is None:  # an answer, not a refusal
            await transport.finish(
                Code.NOT_FOUND, f"no subscriber with id {request.id}", timeout=timeout
            )
            return
        transport.admitted()
        # what is queued is still delivered, but not to a peer that stopped reading
        host.hub.end_subscriber(sub, EndReason.UNSUBSCRIBED, flush_timeout=timeout)
        log.info("Unsubscribed client: %d", request.id, extra=fields(subscriber=request.id))
        await transport.reply(bytes(Response()), timeout=timeout)
        await transport.finish(Code.OK, None, timeout=timeout)


class PublishCall(_Call):
    """One ``Publish``: admission, authorization, the event, its position."""

    async def run(self) -> None:
        """Serve the call to its end; it never raises ``CallError``."""
        host, transport = self.host, self.transport
        try:
            request, caller = await admit(
                host,
                transport,
                PublishRequest,
                max_size=host.settings.limits.max_event_size,
                check=check_publish,
            )
            if not host.authorize_publish(caller, request):
                raise CallError(Code.PERMISSION_DENIED, f"{caller.name} may not publish")
            if not host.accepting:  # emitted now, it would be lost with this server's log
                raise CallError(Code.UNAVAILABLE, "server shutting down")
        except CallError as exc:
            await self._refuse(exc)
            return
        transport.admitted()
        try:
            published = await host.emit(
                request.data,
                topic=request.topic,
                to=request.to,
                payload=bytes(request.payload) if request.payload is not None else b"",
                key=request.key,
                deleted=request.delete,
                # one caller's keys are its own: nobody can suppress another's publish
                idempotency_key=(
                    f"{caller.name}:{request.idempotency_key}" if request.idempotency_key else ""
                ),
            )
        except StateFull as exc:
            await self._refuse(CallError(Code.RESOURCE_EXHAUSTED, str(exc), final=True))
            return
        except LogUnavailable as exc:  # it may or may not be in: the publisher retries, same key
            await self._refuse(CallError(Code.UNAVAILABLE, str(exc)))
            return
        position = published.position
        reply = PublishReply(seq=position.seq, token=position.token, duplicate=published.duplicate)
        timeout = host.settings.drain_timeout
        await transport.reply(bytes(reply), timeout=timeout)
        await transport.finish(Code.OK, None, timeout=timeout)
