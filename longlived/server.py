"""``SubscriptionManager``: the ``Longlived`` service on top of the hub.

It answers on ``/longlived.Longlived/*`` and on the original example's
``/protos.Longlived/*`` paths with the same call objects (``_call``), so clients of either
proto work, and serves gRPC health and reflection beside them behind the same door
(authentication, admission timeout, per-connection limits). Authentication, limits,
keepalive, TLS, maximum connection age, graceful drain and metrics all come from
``Settings``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import socket
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Self, TypeVar

import betterproto2
import grpclib.const
import grpclib.server
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.health.check import ServiceStatus

from longlived._call import SubscribeCall
from longlived._dedup import Deduplicator
from longlived._local import LocalTransport
from longlived._logfields import fields
from longlived._proto.google.protobuf import Any as ProtoAny
from longlived._proto.longlived import PublishRequest, Request, Response
from longlived._status import Code
from longlived._transport import (
    ConnectionLimits,
    GrpcServer,
    grpc_config,
    guarded,
    longlived_mapping,
)
from longlived._wire import PACKAGES, check_keyed, encode_message
from longlived.auth import ANONYMOUS, Caller, bearer_token, match_token
from longlived.errors import ListenError, LogUnavailable, SubscriptionClosed
from longlived.events import Published
from longlived.hub import EndReason, Hub, Position
from longlived.metrics import MetricsServer, Sample, on_loop, serve_metrics
from longlived.payload import encode_payload, unpack
from longlived.redislog import RedisLog
from longlived.settings import Settings
from longlived.tls import server_context

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator

    from longlived._transport import Servable

__all__ = ["PACKAGES", "SubscriptionManager"]

M = TypeVar("M", bound=betterproto2.Message)

log = logging.getLogger(__name__)

_SENT_HELP = (
    "Messages written to subscribers: each event once per subscriber it reaches, events "
    "replayed to resuming subscribers, heartbeats and control messages such as RESET."
)
"""Why ``messages_sent`` passes ``events_published`` times the subscribers."""

_GOAWAY_GRACE = 1.0
"""Seconds close() lets clients disconnect on their own before it sends GOAWAY."""


@contextlib.contextmanager
def _listener(address: str, name: str) -> Iterator[None]:
    """An ``OSError`` starting the listener ``name`` on ``address`` becomes a ``ListenError``."""
    try:
        yield
    except OSError as exc:
        raise ListenError(address, name, exc) from exc


class SubscriptionManager:
    """The server: holds subscriptions, pushes events down them, drains cleanly.

    Use it as an async context manager (or call ``start`` and ``close``):

    ```python
    async with SubscriptionManager(Settings()) as manager:
        manager.send(7, "hello")
        await manager.wait_closed()
    ```

    Subclass it and override ``event_source`` to feed your own events; the default is the
    original example's mock generator (``data mock for: <id>`` to every subscriber every
    ``settings.interval``). Override ``authenticate``, ``authorize_subscribe`` and
    ``authorize_unsubscribe`` to change who may do what.

    Args:
        settings: configuration; ``Settings()`` reads env vars and ``.env``.
        sleep: the sleep the mock generator uses (injected by tests).
        payload_types: the app's message types carried as typed payloads; server
            reflection describes them, so tools like grpcurl can decode payloads.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        payload_types: Iterable[type[betterproto2.Message]] = (),
    ) -> None:
        self.payload_types = list(payload_types)
        """The app's message types that server reflection describes."""
        self.settings = settings if settings is not None else Settings()
        """The settings it was made with."""
        self.hub = Hub(
            encode=encode_message,
            queue_size=self.settings.queue.size,
            history_size=self.settings.replay.size,
            policy=self.settings.queue.policy,
            dedup=Deduplicator(
                window=self.settings.publish.dedup_window,
                max_keys=self.settings.publish.dedup_max_keys,
            ),
            max_keys=self.settings.state.max_keys,
        )
        """The event core: positions, history, subscribers and the keyed state."""
        self.health = ServiceStatus()
        """SERVING while the server accepts subscriptions (grpc.health.v1)."""
        self.messages_sent = 0
        """Messages written to subscribers (``longlived_messages_sent_total``)."""
        self.rejected: collections.Counter[str] = collections.Counter()
        """Calls refused, by status name."""
        self._sleep = sleep
        self.rng = random.Random()
        """Randomness for the jitter of ``max_connection_age``."""
        self._server: GrpcServer | None = None
        self._log: RedisLog | None = None
        self._source: asyncio.Task[None] | None = None
        self._metrics: MetricsServer | None = None
        self._closing = False
        self._closed = asyncio.Event()

    # ----------------------------------------------------------------- public API

    @property
    def accepting(self) -> bool:
        """Whether new subscriptions are accepted (False once ``close()`` began)."""
        return not self._closing

    def refused(self, code: Code, message: str, peer: str) -> None:
        """Count and log a refused call (the calls report each refusal here)."""
        self.rejected[code.name] += 1
        log.warning("Refused a call from %s: %s (%s)", peer, message, code.name,
                    extra=fields(peer=peer, status=code.name))  # fmt: skip

    @property
    def subscribers(self) -> list[int]:
        """Ids with an open subscription right now."""
        return self.hub.ids()

    def send(self, id: int, data: str) -> Position:
        """Send ``data`` to subscriber ``id`` only; returns the event's position.

        The event is kept in the history even if ``id`` is not subscribed right now, so a
        subscriber resuming as ``id`` still receives it. In-memory log only: with
        ``settings.redis.url`` set, use ``await emit(data, to=id)``.
        """
        self._in_memory("send")
        return self.hub.send(id, data)

    def publish(self, data: str, *, topic: str = "") -> Position:
        """Send ``data`` to every subscriber whose topics match; returns its position.

        The event is encoded once; the same bytes go to every subscriber. In-memory log
        only: with ``settings.redis.url`` set, use ``await emit(data, topic=topic)``.
        """
        self._in_memory("publish")
        return self.hub.publish(data, topic=topic)

    def _in_memory(self, method: str) -> None:
        if self._log is not None:
            raise RuntimeError(
                f"{method}() emits into the in-memory log; with a shared log "
                "(settings.redis.url) events go through Redis: use await emit(...)"
            )

    async def emit(
        self,
        data: str = "",
        *,
        topic: str = "",
        to: int | None = None,
        payload: bytes | betterproto2.Message = b"",
        key: str = "",
        deleted: bool = False,
        idempotency_key: str = "",
    ) -> Published:
        """Emit one event, as the Publish RPC does: to subscriber ``to``, or to every
        subscriber matching ``topic``.

        Args:
            data: the text payload (``Response.data``).
            topic: the topic to publish on (with ``to`` unset).
            to: the one subscriber id to send to.
            payload: a typed payload: any generated message of the app's (packed into a
                ``google.protobuf.Any``), an ``Any`` already packed, or its encoded bytes;
                subscribers decode it with ``client.events(MessageType)``.
            key: a keyed event: ``payload`` becomes the value of ``key`` in the keyed
                state of ``topic`` (see ``put``), or with ``deleted`` the key is removed.
            deleted: with ``key``: remove it.
            idempotency_key: a second emit with the same key within
                ``settings.publish.dedup_window`` seconds emits nothing and returns the
                first one's position.

        Raises:
            StateFull: a put of a new key beyond ``settings.state.max_keys``.
            ValueError: a keyed event with ``to``, a put without payload, a key too long.
            LogUnavailable: with a shared log, Redis cannot be reached.
        """
        if isinstance(payload, betterproto2.Message):
            payload = encode_payload(payload)
        if problem := check_keyed(key, deleted, to, bool(payload)):
            raise ValueError(problem)
        if self._log is not None:
            return await self._log.append(
                data, topic=topic, to=to, payload=payload, key=key, deleted=deleted,
                idempotency_key=idempotency_key,
            )  # fmt: skip
        position, duplicate = self.hub.emit(
            data, topic=topic, to=to, payload=payload, key=key, deleted=deleted,
            idempotency_key=idempotency_key,
        )  # fmt: skip
        return Published(position, duplicate)

    async def put(
        self,
        key: str,
        value: betterproto2.Message,
        *,
        topic: str = "",
        idempotency_key: str = "",
    ) -> Published:
        """Set ``key`` of the keyed state of ``topic`` to ``value``: an event to every
        subscriber of ``topic``, and the value snapshots carry from now on.

        A subscriber with ``snapshot`` (``WatchCache``) gets every current value, then
        SYNCED, then each change; works the same with a shared log on every replica.

        Raises:
            StateFull: ``key`` is new and the state holds ``settings.state.max_keys``.
        """
        return await self.emit(topic=topic, payload=value, key=key, idempotency_key=idempotency_key)

    async def delete(self, key: str, *, topic: str = "", idempotency_key: str = "") -> Published:
        """Remove ``key`` from the keyed state of ``topic`` (an event to its subscribers;
        emitted even if the key is not there)."""
        return await self.emit(topic=topic, key=key, deleted=True, idempotency_key=idempotency_key)

    def get(self, key: str, message_type: type[M], *, topic: str = "") -> M | None:
        """The current value of ``key`` in ``topic``, decoded as ``message_type``."""
        entry = self.hub.state.get(topic, key)
        return None if entry is None else _decode(entry.payload, message_type)

    def items(self, message_type: type[M], *, topic: str = "") -> dict[str, M]:
        """Every key of ``topic`` and its value, decoded as ``message_type`` (a copy)."""
        return {k: _decode(e.payload, message_type) for k, e in self.hub.state.items(topic)}

    async def event_source(self) -> None:
        """Produce events until cancelled. Override it to feed your own.

        The default is the original example's generator: every ``settings.interval``
        seconds, ``data mock for: <id>`` to each subscriber; with ``settings.source``
        ``none``, nothing (events come from Publish calls and the app).
        """
        if self.settings.source == "none":
            log.info("No event source: events come from Publish")
            return
        log.info("Starting data generation")
        while True:
            await self._sleep(self.settings.interval)
            for id in self.hub.ids():
                try:
                    await self.emit(f"data mock for: {id}", to=id)
                except LogUnavailable as exc:  # the log's reader says so too; carry on
                    log.debug("Mock event for %d not emitted: %s", id, exc)

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds, re-checked whenever subscribers come or go.

        Unbounded by itself: wrap it in ``asyncio.timeout``.
        """
        await self.hub.wait_for(predicate)

    def stats(self) -> list[Sample]:
        """The server's counters, as the metrics endpoint serves them."""
        hub = self.hub.stats
        return [
            Sample("longlived_subscribers", "gauge", "Open subscriptions.", len(self.hub)),
            Sample("longlived_events_published", "counter", "Events emitted.", hub.events),
            Sample("longlived_messages_sent", "counter", _SENT_HELP, self.messages_sent),
            Sample(
                "longlived_slow_subscriber_disconnects",
                "counter",
                "Subscribers cut off or reset for falling behind.",
                hub.slow,
            ),
            Sample("longlived_resumes", "counter", "Subscriptions resumed.", hub.resumes),
            Sample("longlived_resets", "counter", "RESET messages sent.", hub.resets),
            Sample(
                "longlived_resyncs",
                "counter",
                "Fresh snapshots sent to keyed subscribers instead of RESET.",
                hub.resyncs,
            ),
            Sample(
                "longlived_state_keys", "gauge", "Keys in the keyed state.", len(self.hub.state)
            ),
            Sample(
                "longlived_rejected_calls",
                "counter",
                "Calls refused, by status.",
                dict(self.rejected),
                label="status",
            ),
        ]

    @property
    def metrics_port(self) -> int | None:
        """Port of the ``/metrics`` endpoint, if it is on."""
        return self._metrics.port if self._metrics is not None else None

    # --------------------------------------------------------------------- hooks

    async def authenticate(self, metadata: Mapping[str, str | bytes]) -> Caller | None:
        """Who is calling, from the request metadata; None refuses the call (UNAUTHENTICATED).

        The default accepts everyone when ``settings.auth.tokens`` is empty, and otherwise a
        ``authorization: Bearer <token>`` header naming one of those tokens.
        """
        tokens = self.settings.auth.tokens
        if not tokens:
            return ANONYMOUS
        token = bearer_token(metadata)
        return match_token(token, tokens) if token is not None else None

    def authorize_subscribe(self, caller: Caller, request: Request) -> bool:
        """Whether ``caller`` may subscribe as ``request.id``. Default: yes."""
        return True

    def authorize_unsubscribe(self, caller: Caller, id: int, owner: str) -> bool:
        """Whether ``caller`` may end the subscription ``id`` that ``owner`` opened.

        Default: anyone when authentication is off; with it on, only the caller that
        subscribed.
        """
        return not caller.authenticated or caller.name == owner

    async def owner_of(self, id: int) -> str | None:
        """Who holds ``id``: see ``Hub.owner``; with a shared log, as recorded in Redis
        (every replica sees the same owner).

        Raises:
            LogUnavailable: the shared log cannot be read (the call is refused).
        """
        if self._log is not None:
            return await self._log.owner(id) or self.hub.owner(id)
        return self.hub.owner(id)

    async def claim(self, id: int, owner: str, *, take_over: bool = False) -> str:
        """Record ``owner`` as the holder of ``id``, unless another caller holds it (and
        ``take_over`` is False); who holds it now. With a shared log, atomically in Redis
        (two callers racing for a free id on two replicas: one wins); in memory the hub
        records it when the subscriber registers."""
        if self._log is not None:
            return await self._log.claim(id, owner, take_over=take_over)
        return owner

    def authorize_publish(self, caller: Caller, request: PublishRequest) -> bool:
        """Whether ``caller`` may publish ``request``.

        Default: anyone when authentication is off; with it on, only the callers listed
        in ``settings.auth.publishers``.
        """
        return not caller.authenticated or caller.name in self.settings.auth.publishers

    # ------------------------------------------------------------------ lifecycle

    def setup_server(self, server: grpclib.server.Server) -> None:
        """Called by ``start`` with the grpclib server before it listens. Override it to
        add grpclib event listeners (``grpclib.events.listen``) for middleware and tracing:
        ``RecvRequest``, ``RecvMessage``, ``SendInitialMetadata``, ``SendMessage`` and
        ``SendTrailingMetadata`` fire for every RPC, ``Longlived`` ones included."""

    async def prepare(self) -> None:
        """Called by ``start`` once the event log is ready, before the server listens.
        Override it to put the initial keyed state: no subscriber sees it half-built (with
        a shared log, ``start`` waits until this replica has read back what it put)."""

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        return longlived_mapping(self)

    def services(self) -> list[Servable]:
        """The gRPC services this server runs: itself, plus health and reflection.

        Health and reflection sit behind the same authentication as ``Longlived`` (except
        ``settings.auth.public_methods``) and the same admission timeout.
        """
        # imported here, not at module level: grpclib's health and reflection messages go into
        # protobuf's default pool, where grpcio's copies of them clash (duplicate symbols);
        # an app that never serves them can use grpcio's clients beside longlived
        from longlived._services import health_service, with_reflection

        services: list[Servable] = [self]
        aliases = tuple(f"{p}.Longlived" for p in PACKAGES[1:])
        if self.settings.health:
            services.append(health_service(self, self.health, aliases=aliases))
        if self.settings.reflection:
            services = with_reflection(services, self.payload_types, aliases=aliases)
        # reflection describes the Longlived service itself, so it is built first
        return [self, *guarded(services[1:], self, public=self.settings.auth.public_methods)]

    async def start(self, *, sock: socket.socket | None = None) -> None:
        """Listen on ``settings.address`` (or on ``sock``) and start the event source.

        All or nothing: if a listener cannot start (a port in use), whatever did start is
        closed again, ``ListenError`` (an ``OSError``) names the address and the listener,
        and ``start`` may be called again.
        """
        if self._server is not None:
            raise RuntimeError("SubscriptionManager is already started")
        settings = self.settings
        server = GrpcServer(
            self.services(),
            limits=ConnectionLimits(
                max_streams=settings.max_streams_per_connection,
                max_pending=settings.limits.max_pending_streams,
                max_metadata_size=settings.limits.max_metadata_size,
                resets_per_second=settings.limits.resets_per_second,
                reset_burst=settings.limits.reset_burst,
            ),
            max_message_size=settings.limits.max_message_size,
            config=grpc_config(
                settings.keepalive,
                max_request=max(settings.limits.max_message_size, settings.limits.max_event_size),
            ),
        )
        ssl = server_context(settings.tls)
        self.setup_server(server)
        metrics = None
        shared = None
        try:
            if settings.redis.url is not None:
                shared = RedisLog(
                    settings.redis,
                    self.hub,
                    dedup_window=settings.publish.dedup_window,
                    max_keys=settings.state.max_keys,
                    backoff=settings.backoff.to_backoff(),
                )
                await shared.start()
                self._log = shared  # prepare() emits into it
            if settings.metrics.port is not None:
                with _listener(f"{settings.metrics.host}:{settings.metrics.port}", "metrics"):
                    metrics = serve_metrics(
                        on_loop(self.stats, asyncio.get_running_loop()),
                        host=settings.metrics.host,
                        port=settings.metrics.port,
                    )
            await self.prepare()
            if shared is not None:  # what prepare() put is in this replica's state
                await shared.catch_up(settings.redis.timeout)
            if sock is not None:
                await server.start(sock=sock, ssl=ssl)
            else:
                with _listener(settings.address, "gRPC"):
                    await server.start(settings.host, settings.port, ssl=ssl)
        except BaseException:
            self._log = None
            server.stop()
            if metrics is not None:
                await asyncio.to_thread(metrics.close)
            if shared is not None:
                await shared.close()
            raise
        self._server, self._metrics, self._log = server, metrics, shared
        if metrics is not None:
            log.info("Metrics on http://%s:%d/metrics", settings.metrics.host, metrics.port)
        self.health.set(True)
        self._source = asyncio.create_task(self._run_source(), name="longlived-event-source")
        log.info("Listening on %s%s", self.address, " (TLS)" if ssl else "")

    @property
    def address(self) -> str:
        """``host:port`` the server listens on (the real port when started on port 0)."""
        bound = self._server.address if self._server is not None else None
        if bound is None:
            return self.settings.address
        host, port = bound
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def close(self) -> None:
        """Drain: NOT_SERVING, refuse new subscriptions, end streams, close connections.

        Open streams end with UNAVAILABLE ("server shutting down") once what is queued for
        them is written (a peer that does not read is cut off at the deadline); clients resume from
        their position elsewhere or later. Everything happens within
        ``settings.drain_timeout`` seconds: streams that have not ended by then are
        cancelled and their connections closed. Idempotent.
        """
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        metrics_closed: asyncio.Future[None] | None = None
        self.health.set(False)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.drain_timeout
        try:
            if self._metrics is not None:
                # its shutdown waits out a poll interval, in a thread: beside the drain
                metrics_closed = asyncio.ensure_future(asyncio.to_thread(self._metrics.close))
            if self._source is not None:
                self._source.cancel()
                # wait() rather than await: a cancel aimed at close() itself must propagate
                await asyncio.wait([self._source], timeout=max(deadline - loop.time(), 0.0))
                if not self._source.done():
                    log.warning("The event source did not stop within %.1fs",
                                self.settings.drain_timeout)  # fmt: skip
            # connections without streams need no grace before GOAWAY
            idle = self._server.idle_connections() if self._server is not None else set()
            # what is queued still goes out (an in-memory log dies with the process), within
            # the drain; a peer that does not read is cut off at the deadline
            self.hub.end_all(EndReason.SHUTDOWN, flush_timeout=max(deadline - loop.time(), 0.0))
            try:
                async with asyncio.timeout_at(deadline):
                    await self.hub.wait_for(lambda: self.hub.open_streams == 0)
            except TimeoutError:
                log.warning("%d streams did not end within %.1fs; cancelling them",
                            self.hub.open_streams, self.settings.drain_timeout)  # fmt: skip
            if self._server is not None:
                left = max(deadline - loop.time(), 0.0)
                await self._server.drain(idle, grace=min(_GOAWAY_GRACE, left), timeout=left)
            log.info("Server closed")
        finally:
            if self._server is not None:
                self._server.stop()  # idempotent; stops listening even if close() was cancelled
            if metrics_closed is not None:
                await asyncio.wait([metrics_closed])
            if self._log is not None:
                await self._log.close()
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

    # ------------------------------------------------- the generated service methods

    async def unsubscribe(self, message: Request) -> Response:
        """End the stream of ``message.id`` with status OK (no authorization check).

        What is queued is still delivered (for up to ``settings.drain_timeout`` seconds).

        Raises:
            GRPCError: NOT_FOUND when no subscriber has that id.
        """
        sub = self.hub.get(message.id)
        if sub is None:
            raise GRPCError(Status.NOT_FOUND, f"no subscriber with id {message.id}")
        self.hub.end_subscriber(
            sub, EndReason.UNSUBSCRIBED, flush_timeout=self.settings.drain_timeout
        )
        log.info("Unsubscribed client: %d", message.id, extra=fields(subscriber=message.id))
        return Response()

    async def subscribe(
        self, message: Request, *, metadata: Mapping[str, str] | None = None
    ) -> AsyncGenerator[Response, None]:
        """In-process subscription: yields what the subscriber ``message.id`` would receive.

        It follows the rules of the wire (authentication from ``metadata``, request checks,
        authorization, limits, replay, heartbeats, slow-consumer policy); the stream it
        would end with a status other than OK raises ``SubscriptionClosed``. Close the
        generator (``contextlib.aclosing``) to unsubscribe.
        """
        transport = LocalTransport(message, metadata=metadata or {})
        call = asyncio.create_task(SubscribeCall(self, transport).run())
        call.add_done_callback(transport.call_done)
        try:
            async for response in transport.responses():
                yield response
            await call  # raises what the call raised (a failing hook, say)
            status = transport.status or Code.UNKNOWN  # set by every finished call
            if status is not Code.OK:
                raise SubscriptionClosed(status.name, transport.detail)
        finally:
            call.cancel()
            await asyncio.wait([call])
            if not call.cancelled() and call.exception() is not None:
                log.warning("In-process subscription %d failed: %r", message.id,
                            call.exception())  # fmt: skip


def _decode(payload: bytes, message_type: type[M]) -> M:
    """A stored value (an encoded ``Any``) as ``message_type``."""
    return unpack(ProtoAny.FromString(payload), message_type)
