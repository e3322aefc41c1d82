"""``SubscriptionManager``: the ``Longlived`` service on top of the hub.

It answers on ``/longlived.Longlived/*`` and on the original example's
``/protos.Longlived/*`` paths with the same handlers, so clients of either proto work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Self

import grpclib.const
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from longlived._grpc import GrpcServer, end_stream, wait_for_room
from longlived._proto.longlived import LonglivedBase, Request, Response, ResponseKind
from longlived.hub import EndReason, Hub, Kind, Position
from longlived.settings import Settings

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator

    import grpclib.server

__all__ = ["PACKAGES", "SubscriptionManager", "encode_message"]

log = logging.getLogger(__name__)

PACKAGES = ("longlived", "protos")
"""Proto packages whose ``Longlived`` paths the server answers on."""

_GOAWAY_GRACE = 1.0
"""Seconds close() lets clients disconnect on their own before it sends GOAWAY."""

_END_STATUS = {
    EndReason.UNSUBSCRIBED: Status.OK,
    EndReason.REPLACED: Status.OK,
    EndReason.TOO_SLOW: Status.RESOURCE_EXHAUSTED,
    EndReason.SHUTDOWN: Status.UNAVAILABLE,
}


class SubscriptionManager(LonglivedBase):
    """The server: holds subscriptions, pushes events down them, shuts down cleanly.

    Use it as an async context manager (or call ``start`` and ``close``)::

        async with SubscriptionManager(Settings()) as manager:
            manager.send(7, "hello")
            await manager.wait_closed()

    Subclass it and override ``event_source`` to feed your own events; the default is the
    original example's mock generator (``data mock for: <id>`` to every subscriber every
    ``settings.interval``).

    Args:
        settings: configuration; ``Settings()`` reads env vars and ``.env``.
        sleep: the sleep the mock generator uses (injected by tests).
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        self.settings = settings if settings is not None else Settings()
        self.hub = Hub(
            encode=encode_message,
            queue_size=self.settings.queue.size,
            history_size=self.settings.replay.size,
            policy=self.settings.queue.policy,
        )
        self._sleep = sleep
        self._server: GrpcServer | None = None
        self._source: asyncio.Task[None] | None = None
        self._closing = False
        self._closed = asyncio.Event()

    # ----------------------------------------------------------------- public API

    @property
    def subscribers(self) -> list[int]:
        """Ids with an open subscription right now."""
        return self.hub.ids()

    def send(self, id: int, data: str) -> Position:
        """Send ``data`` to subscriber ``id`` only; returns the event's position.

        The event is kept in the history even if ``id`` is not subscribed right now, so a
        subscriber resuming as ``id`` still receives it.
        """
        return self.hub.send(id, data)

    def publish(self, data: str, *, topic: str = "") -> Position:
        """Send ``data`` to every subscriber whose topics match; returns its position.

        The event is encoded once; the same bytes go to every subscriber.
        """
        return self.hub.publish(data, topic=topic)

    async def event_source(self) -> None:
        """Produce events until cancelled. Override it to feed your own.

        The default is the original example's generator: every ``settings.interval``
        seconds, ``data mock for: <id>`` to each subscriber.
        """
        log.info("Starting data generation")
        while True:
            await self._sleep(self.settings.interval)
            for id in self.hub.ids():
                self.send(id, f"data mock for: {id}")

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds, re-checked whenever subscribers come or go.

        Unbounded by itself: wrap it in ``asyncio.timeout``.
        """
        await self.hub.wait_for(predicate)

    # ------------------------------------------------------------------ lifecycle

    async def start(self, *, sock: socket.socket | None = None) -> None:
        """Listen on ``settings.address`` (or on ``sock``) and start the event source."""
        if self._server is not None:
            raise RuntimeError("SubscriptionManager is already started")
        server = GrpcServer([self], max_streams=self.settings.max_streams_per_connection)
        if sock is not None:
            await server.start(sock=sock)
        else:
            await server.start(self.settings.host, self.settings.port)
        self._server = server
        self._source = asyncio.create_task(self._run_source(), name="longlived-event-source")
        log.info("Listening on %s", self.address)

    @property
    def address(self) -> str:
        """``host:port`` the server listens on (the real port when started on port 0)."""
        listener = self._server._server if self._server is not None else None
        if not isinstance(listener, asyncio.Server) or not listener.sockets:
            return self.settings.address
        host, port = listener.sockets[0].getsockname()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def close(self) -> None:
        """End every stream with UNAVAILABLE, then close connections and the server.

        Streams get ``settings.shutdown_timeout`` seconds to end; handlers still running
        then are cancelled. Idempotent.
        """
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        try:
            if self._source is not None:
                self._source.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._source
            # connections without streams need no grace before GOAWAY
            idle = self._server.idle_connections() if self._server is not None else []
            self.hub.end_all(EndReason.SHUTDOWN)
            try:
                async with asyncio.timeout(self.settings.shutdown_timeout):
                    await self.hub.wait_for(lambda: self.hub.open_streams == 0)
            except TimeoutError:
                log.warning(
                    "%d streams did not end within %.1fs; cancelling them",
                    self.hub.open_streams,
                    self.settings.shutdown_timeout,
                )
            if self._server is not None:
                self._server.close()
                for connection in idle:
                    connection.goaway()
                # Clients that read their final status close their connections themselves;
                # a GOAWAY arriving with the status would make some clients drop it unread.
                await self._server.wait_disconnected(
                    min(_GOAWAY_GRACE, self.settings.shutdown_timeout)
                )
                self._server.goaway_all()
                async with asyncio.timeout(self.settings.shutdown_timeout):
                    await self._server.wait_closed()
            log.info("Server closed")
        finally:
            self._closed.set()

    async def wait_closed(self) -> None:
        """Wait until ``close()`` has finished."""
        await self._closed.wait()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _run_source(self) -> None:
        try:
            await self.event_source()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("The event source failed; no more events will be produced")

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

    async def _rpc_subscribe(self, stream: grpclib.server.Stream[Request, bytes]) -> None:
        request = await stream.recv_message()
        if request is None:
            raise GRPCError(Status.INVALID_ARGUMENT, "Subscribe needs a Request message")
        if self._closing:
            raise GRPCError(Status.UNAVAILABLE, "server shutting down")
        id = request.id
        _check_topics(request.topics)
        log.info("Received subscribe request from ID: %d", id)
        heartbeat = (
            max(request.heartbeat_ms / 1000, self.settings.heartbeat.min_interval)
            if request.heartbeat_ms
            else None
        )
        sub = self.hub.register(
            id,
            topics=request.topics,
            resume=request.resume_token,
            control=request.accept_control or heartbeat is not None,
        )
        try:
            await stream.send_initial_metadata()
            while (batch := await sub.take(idle=heartbeat)) is not None:
                for message in batch or [self.hub.heartbeat()]:
                    if not await wait_for_room(stream, len(message) + 5, sub.ended):
                        break
                    await stream.send_message(message)
            reason = sub.end_reason
            assert reason is not None
            log.info("Stream of client ID %d ended: %s", id, reason.value)
            await end_stream(
                stream, _END_STATUS[reason], reason.value, timeout=self.settings.shutdown_timeout
            )
        except asyncio.CancelledError:
            if sub.end_reason is None:
                log.info("Client ID %d disconnected", id)
            raise
        except Exception as exc:
            log.warning("Failed to send data to client %d: %r", id, exc)
            raise
        finally:
            self.hub.release(sub)

    async def _rpc_unsubscribe(self, stream: grpclib.server.Stream[Request, Response]) -> None:
        request = await stream.recv_message()
        if request is None:
            raise GRPCError(Status.INVALID_ARGUMENT, "Unsubscribe needs a Request message")
        await stream.send_message(await self.unsubscribe(request))

    # ------------------------------------------------- the generated service methods

    async def unsubscribe(self, message: Request) -> Response:
        """End the stream of ``message.id`` with status OK.

        Raises:
            GRPCError: NOT_FOUND when no subscriber has that id.
        """
        if not self.hub.end(message.id, EndReason.UNSUBSCRIBED):
            raise GRPCError(Status.NOT_FOUND, f"no subscriber with id {message.id}")
        log.info("Unsubscribed client: %d", message.id)
        return Response()

    async def subscribe(self, message: Request) -> AsyncGenerator[Response, None]:
        """In-process subscription: yields what the subscriber ``message.id`` would receive.

        The wire path does not go through this method (it streams pre-encoded bytes); it is
        for code in the same process. Close it (``contextlib.aclosing``) to unsubscribe.
        """
        _check_topics(message.topics)
        sub = self.hub.register(
            message.id,
            topics=message.topics,
            resume=message.resume_token,
            control=message.accept_control,
        )
        try:
            while batch := await sub.take():
                for data in batch:
                    yield Response.FromString(data)
        finally:
            self.hub.release(sub)


MAX_TOPICS = 256
MAX_TOPIC_LENGTH = 256


def _check_topics(topics: list[str]) -> None:
    if len(topics) > MAX_TOPICS:
        raise GRPCError(
            Status.INVALID_ARGUMENT, f"too many topics: {len(topics)} (at most {MAX_TOPICS})"
        )
    for topic in topics:
        if not 0 < len(topic) <= MAX_TOPIC_LENGTH:
            raise GRPCError(
                Status.INVALID_ARGUMENT,
                f"topic {topic[:40]!r} must be 1-{MAX_TOPIC_LENGTH} characters long",
            )


def encode_message(kind: Kind, position: Position, data: str, topic: str) -> bytes:
    """One wire ``Response``: DATA, HEARTBEAT or RESET at ``position``."""
    return bytes(
        Response(
            data=data,
            seq=position.seq,
            token=position.token,
            kind=ResponseKind(kind.value),
            topic=topic,
        )
    )
