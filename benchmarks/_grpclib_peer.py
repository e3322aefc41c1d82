"""The plain grpclib peer: the same service written directly on grpclib and betterproto2.

What a user of grpclib would write without longlived: one ``asyncio.Queue`` per
subscriber, a ``Subscribe`` handler that sends its headers, then sends what its queue
holds with ``stream.send_message``, and a publisher that puts the same betterproto2
``Response`` into every queue. grpclib's codec encodes it once per stream (the plain
betterproto2 way); the messages carry ``seq`` and a ``token`` like longlived's, so every
server sends the same bytes.
"""

from __future__ import annotations

import asyncio
import secrets
import socket

import grpclib.const
import grpclib.server
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from longlived import Request, Response

__all__ = ["GrpclibPeer"]


class _Service:
    """``longlived.Longlived`` on grpclib: per-subscriber queues, replace on same id."""

    def __init__(self) -> None:
        self.queues: dict[int, asyncio.Queue[Response | None]] = {}
        self.changed = asyncio.Event()

    async def subscribe(self, stream: grpclib.server.Stream[Request, Response]) -> None:
        request = await stream.recv_message()
        assert request is not None
        queue: asyncio.Queue[Response | None] = asyncio.Queue()
        old = self.queues.get(request.id)
        if old is not None:
            old.put_nowait(None)  # replaced: that stream ends with OK
        self.queues[request.id] = queue
        self.changed.set()
        try:
            # headers now, as longlived sends them: the client sees the subscription is open
            await stream.send_initial_metadata()
            while (message := await queue.get()) is not None:
                await stream.send_message(message)
        finally:
            if self.queues.get(request.id) is queue:
                del self.queues[request.id]
            self.changed.set()

    async def unsubscribe(self, stream: grpclib.server.Stream[Request, Response]) -> None:
        request = await stream.recv_message()
        assert request is not None
        queue = self.queues.pop(request.id, None)
        if queue is None:
            raise GRPCError(Status.NOT_FOUND, f"no subscriber with id {request.id}")
        queue.put_nowait(None)
        await stream.send_message(Response())

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        stream = grpclib.const.Cardinality.UNARY_STREAM
        unary = grpclib.const.Cardinality.UNARY_UNARY
        return {
            "/longlived.Longlived/Subscribe": grpclib.const.Handler(
                self.subscribe, stream, Request, Response
            ),
            "/longlived.Longlived/Unsubscribe": grpclib.const.Handler(
                self.unsubscribe, unary, Request, Response
            ),
        }


class GrpclibPeer:
    """A plain ``grpclib.server.Server`` running ``_Service``."""

    name = "grpclib"

    def __init__(self) -> None:
        self._service = _Service()
        self._server = grpclib.server.Server([self._service])
        self._epoch = secrets.token_hex(8)

    async def start(self, port: int = 0) -> int:
        """Listen on loopback ``port`` (0: a free one); returns it."""
        sock = socket.create_server(("127.0.0.1", port))
        bound: int = sock.getsockname()[1]
        await self._server.start(sock=sock)
        return bound

    def subscribed(self) -> int:
        """Open subscriptions."""
        return len(self._service.queues)

    async def wait_subscribed(self, count: int) -> None:
        """Wait until ``count`` subscriptions are open (unbounded: the caller bounds it)."""
        while len(self._service.queues) < count:
            self._service.changed.clear()
            await self._service.changed.wait()

    def publish(self, data: str, index: int) -> None:
        """Publish event ``index`` with ``data`` to every subscriber."""
        message = Response(data=data, seq=index, token=f"{self._epoch}:{index}")
        for queue in self._service.queues.values():
            queue.put_nowait(message)

    async def emit(self, data: str, index: int) -> None:
        self.publish(data, index)

    async def stop(self) -> None:
        """Stop the server: end every stream (grpclib's close alone leaves them hanging)."""
        for queue in self._service.queues.values():
            queue.put_nowait(None)
        self._server.close()
        await self._server.wait_closed()
