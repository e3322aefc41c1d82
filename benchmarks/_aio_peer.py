"""The grpc.aio peer: the same service on grpcio's asyncio server (the official C-core).

It is written the idiomatic grpc.aio way: one ``asyncio.Queue`` per subscriber, a
``Subscribe`` handler that is an async generator yielding what its queue holds, and a
publisher that puts the same ``Response`` object into every queue (grpcio serializes it
once per stream when it is yielded). Its messages carry ``seq`` and a ``token`` like
longlived's, so every server sends the same bytes.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from typing import Any

import grpc

from benchmarks._common import Stubs

__all__ = ["AioPeer"]


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

    async def Publish(self, request: Any, context: Any) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in the benchmark")


class AioPeer:
    """A grpc.aio server running ``_Servicer``; messages carry a token like longlived's."""

    name = "grpc.aio"

    def __init__(self, stubs: Stubs) -> None:
        self._stubs = stubs
        self._servicer = _Servicer(stubs.messages)
        self._server = grpc.aio.server()
        self._epoch = secrets.token_hex(8)

    async def start(self, port: int = 0) -> int:
        """Listen on loopback ``port`` (0: a free one); returns it."""
        self._stubs.services.add_LonglivedServicer_to_server(self._servicer, self._server)
        bound: int = self._server.add_insecure_port(f"127.0.0.1:{port}")
        if bound == 0:
            raise OSError(f"grpc.aio could not listen on 127.0.0.1:{port}")
        await self._server.start()
        return bound

    def subscribed(self) -> int:
        """Open subscriptions."""
        return len(self._servicer.queues)

    async def wait_subscribed(self, count: int) -> None:
        """Wait until ``count`` subscriptions are open (unbounded: the caller bounds it)."""
        while len(self._servicer.queues) < count:
            self._servicer.changed.clear()
            await self._servicer.changed.wait()

    def publish(self, data: str, index: int) -> None:
        """Publish event ``index`` with ``data`` to every subscriber."""
        message = self._stubs.messages.Response(
            data=data, seq=index, token=f"{self._epoch}:{index}"
        )
        for queue in self._servicer.queues.values():
            queue.put_nowait(message)

    async def emit(self, data: str, index: int) -> None:
        self.publish(data, index)

    async def stop(self) -> None:
        """Stop the server, cancelling what is still open."""
        await self._server.stop(None)
