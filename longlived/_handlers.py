"""The RPC handlers of the ``Longlived`` service: admission, streaming, unsubscribing.

``SubscriptionManager`` (``server.py``) inherits them; this module holds the request path
from the first byte read to the final status written, so the manager's module can hold its
public API and lifecycle.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
from collections.abc import Mapping
from typing import TYPE_CHECKING

import grpclib.const
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from longlived._proto.longlived import LonglivedBase, Request, Response
from longlived._transport import end_stream, recv_request, write_messages
from longlived._wire import HEARTBEAT_HEADER, NO_RETRY_HEADER, check_request
from longlived.auth import Caller
from longlived.hub import EndReason, Hub, Subscriber
from longlived.settings import Settings

if TYPE_CHECKING:
    import grpclib.server

__all__ = ["PACKAGES", "ServiceHandlers"]

log = logging.getLogger("longlived.server")

PACKAGES = ("longlived", "protos")
"""Proto packages whose ``Longlived`` paths the server answers on."""

_END_STATUS = {
    EndReason.UNSUBSCRIBED: Status.OK,
    EndReason.REPLACED: Status.OK,
    EndReason.TOO_SLOW: Status.RESOURCE_EXHAUSTED,
    EndReason.SHUTDOWN: Status.UNAVAILABLE,
    EndReason.MAX_AGE: Status.UNAVAILABLE,
}


class ServiceHandlers(LonglivedBase):
    """The wire side of the service; the subclass provides the state and the hooks."""

    settings: Settings
    hub: Hub
    messages_sent: int
    rejected: collections.Counter[str]
    _closing: bool
    _rng: random.Random

    async def authenticate(self, metadata: Mapping[str, str | bytes]) -> Caller | None:
        """Who is calling; None refuses the call. Overridden by ``SubscriptionManager``."""
        raise NotImplementedError

    def authorize_subscribe(self, caller: Caller, request: Request) -> bool:
        """Whether ``caller`` may subscribe as ``request.id``."""
        raise NotImplementedError

    def authorize_unsubscribe(self, caller: Caller, id: int, owner: str) -> bool:
        """Whether ``caller`` may end the subscription ``id`` that ``owner`` opened."""
        raise NotImplementedError

    # ------------------------------------------------------------------- handlers

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        mapping = {}
        for package in PACKAGES:
            mapping[f"/{package}.Longlived/Subscribe"] = grpclib.const.Handler(
                self._rpc_subscribe, grpclib.const.Cardinality.UNARY_STREAM, Request, Response
            )
            mapping[f"/{package}.Longlived/Unsubscribe"] = grpclib.const.Handler(
                self._rpc_unsubscribe, grpclib.const.Cardinality.UNARY_UNARY, Request, Response
            )
        return mapping

    def _reject(self, status: Status, message: str, peer: object = None) -> GRPCError:
        """Count, log and build the error for a refused call."""
        self.rejected[status.name] += 1
        log.warning("Refused a call from %s: %s (%s)", peer or "?", message, status.name)
        return GRPCError(status, message)

    async def _admit(
        self, stream: grpclib.server.Stream[Request, object]
    ) -> tuple[Request, Caller]:
        """Read, check and authenticate the request, or raise the status that refuses it."""
        peer = stream.peer.addr() if stream.peer is not None else None
        try:
            request: Request = await recv_request(
                stream, Request, max_size=self.settings.limits.max_message_size
            )
        except GRPCError as exc:
            error = self._reject(exc.status, exc.message or "bad request", peer)
            if exc.status is Status.RESOURCE_EXHAUSTED:
                # too large: unlike "too many subscribers", sending it again cannot help
                await stream.send_trailing_metadata(
                    status=exc.status,
                    status_message=exc.message,
                    metadata={NO_RETRY_HEADER: "request can never be accepted"},
                )
            raise error from None
        caller = await self.authenticate(stream.metadata or {})
        if caller is None:
            raise self._reject(Status.UNAUTHENTICATED, "missing or invalid bearer token", peer)
        try:
            check_request(request)  # after authentication: strangers learn nothing of the rules
        except GRPCError as exc:
            raise self._reject(exc.status, exc.message or "bad request", peer) from None
        return request, caller

    async def _rpc_subscribe(self, stream: grpclib.server.Stream[Request, bytes]) -> None:
        request, caller = await self._admit(stream)  # type: ignore[arg-type]  # send type unused
        id = request.id
        if self._closing:
            raise self._reject(Status.UNAVAILABLE, "server shutting down")
        if not self.authorize_subscribe(caller, request):
            raise self._reject(Status.PERMISSION_DENIED, f"{caller.name} may not subscribe as {id}")
        current = self.hub.get(id)
        if current is not None and not self.authorize_unsubscribe(caller, id, current.owner):
            # replacing a subscription ends it: the same rule as Unsubscribe
            raise self._reject(
                Status.PERMISSION_DENIED, f"{caller.name} may not replace the subscription {id}"
            )
        if id not in self.hub and len(self.hub) >= self.settings.limits.max_subscribers:
            limit = self.settings.limits.max_subscribers
            raise self._reject(Status.RESOURCE_EXHAUSTED, f"too many subscribers (limit {limit})")
        log.info("Received subscribe request from ID: %d", id)
        sub = self.hub.register(
            id,
            topics=request.topics,
            resume=request.resume_token,
            control=request.accept_control or request.heartbeat_ms > 0,
            owner=caller.name,
        )
        try:
            await self._stream(stream, sub, request)
        except asyncio.CancelledError:
            if sub.end_reason is None:
                log.info("Client ID %d disconnected", id)
            raise
        except Exception as exc:
            log.warning("Failed to send data to client %d: %r", id, exc)
            raise
        finally:
            self.hub.release(sub)

    async def _stream(
        self, stream: grpclib.server.Stream[Request, bytes], sub: Subscriber, request: Request
    ) -> None:
        """Write ``sub``'s messages (heartbeats when idle) until it ends, then its status."""
        heartbeat = (
            max(request.heartbeat_ms / 1000, self.settings.heartbeat.min_interval)
            if request.heartbeat_ms
            else None
        )
        age = self._max_age_timer(sub)
        try:
            # the client judges silence by the period actually granted
            granted = {HEARTBEAT_HEADER: str(round(heartbeat * 1000))} if heartbeat else None
            await stream.send_initial_metadata(metadata=granted)
            while (batch := await sub.take(idle=heartbeat)) is not None:
                # an abort leaves the rest unwritten; take() then reports the end
                self.messages_sent += await write_messages(
                    stream, batch or [self.hub.heartbeat()], sub.aborted
                )
        finally:
            if age is not None:
                age.cancel()
        reason = sub.end_reason
        assert reason is not None
        log.info("Stream of client ID %d ended: %s", sub.id, reason.value)
        await end_stream(
            stream, _END_STATUS[reason], reason.value, timeout=self.settings.drain_timeout
        )

    def _max_age_timer(self, sub: Subscriber) -> asyncio.TimerHandle | None:
        """End ``sub`` after ``max_connection_age`` ±10 % (one timer per stream)."""
        age = self.settings.max_connection_age
        if age is None:
            return None
        delay = age * self._rng.uniform(0.9, 1.1)
        return asyncio.get_running_loop().call_later(
            delay, self.hub.end_subscriber, sub, EndReason.MAX_AGE
        )

    async def _rpc_unsubscribe(self, stream: grpclib.server.Stream[Request, Response]) -> None:
        request, caller = await self._admit(stream)  # type: ignore[arg-type]  # send type unused
        sub = self.hub.get(request.id)
        if sub is not None and not self.authorize_unsubscribe(caller, request.id, sub.owner):
            raise self._reject(
                Status.PERMISSION_DENIED, f"{caller.name} may not unsubscribe {request.id}"
            )
        await stream.send_message(await self.unsubscribe(request))
