"""The peer in the benchmark: the same service on grpcio's asyncio server (``grpc.aio``).

It is written the idiomatic grpc.aio way: one ``asyncio.Queue`` per subscriber, a
``Subscribe`` handler that is an async generator yielding what its queue holds, and a
publisher that puts the same ``Response`` object into every queue (grpcio serializes it
once per stream when it is yielded).
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from typing import Any

import grpc
from _common import Stubs, payload

__all__ = ["Peer"]


class _Servicer:
    """``longlived.Longlived`` on grpc.aio: per-subscriber queues, replace on same id."""

    def __init__(self, messages: Any) -> None:
        self._messages = messages
        self.queues: dict[int, asyncio.Queue[Any]] = {}
        self.changed = asyncio.Event()

    async def Subscribe(self, request: Any, context: Any) -> AsyncIterator[Any]:
        queue: asyncio.Queue[Any] = asyncio.Queue()
        old = self.queues.get(request.id)
        if old is not None:
            old.put_nowait(None)  # replaced: that stream ends with OK
        self.queues[request.id] = queue
        self.changed.set()
        # headers now, as longlived sends them: the client sees the subscription is open
        await context.send_initial_metadata(())
        try:
            while (message := await queue.get()) is not None:
                yield message
        finally:
            if self.queues.get(request.id) is queue:
                del self.queues[request.id]
            self.changed.set()

    async def Unsubscribe(self, request: Any, context: Any) -> Any:
        queue = self.queues.pop(request.id, None)
        if queue is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no subscriber with id {request.id}")
        else:
            queue.put_nowait(None)
        return self._messages.Response()


class Peer:
    """A grpc.aio server running ``_Servicer``; messages carry a token like longlived's."""

    name = "peer"

    def __init__(self, stubs: Stubs, *, size: int) -> None:
        self._stubs = stubs
        self._servicer = _Servicer(stubs.messages)
        self._server = grpc.aio.server()
        self._epoch = secrets.token_hex(8)
        self.size = size

    async def start(self) -> int:
        """Listen on a free loopback port; returns it."""
        self._stubs.services.add_LonglivedServicer_to_server(self._servicer, self._server)
        port: int = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        return port

    def subscribed(self) -> int:
        """Open subscriptions."""
        return len(self._servicer.queues)

    async def wait_subscribed(self, count: int) -> None:
        """Wait until ``count`` subscriptions are open (unbounded: the caller bounds it)."""
        while len(self._servicer.queues) < count:
            self._servicer.changed.clear()
            await self._servicer.changed.wait()

    def publish(self, index: int) -> None:
        """Publish event ``index`` to every subscriber."""
        message = self._stubs.messages.Response(
            data=payload(index, self.size), seq=index, token=f"{self._epoch}:{index}"
        )
        for queue in self._servicer.queues.values():
            queue.put_nowait(message)

    async def stop(self) -> None:
        """Stop the server, cancelling what is still open."""
        await self._server.stop(None)
