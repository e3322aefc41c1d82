"""An in-process ``CallTransport``: ``SubscriptionManager.subscribe`` runs the wire's rules.

The consumer's reading plays the part of the peer's flow-control window: a write waits
until the consumer has taken what was written, so a consumer that stops reading fills its
subscriber queue and meets the slow-consumer policy, as a peer on the wire would.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import TypeVar

import betterproto2

from longlived._aio import wait_first
from longlived._proto.longlived import Request, Response
from longlived._status import Code
from longlived._wire import decode_request

__all__ = ["LocalTransport"]

M = TypeVar("M", bound=betterproto2.Message)


class LocalTransport:
    """The peer of one in-process subscription: ``responses()`` yields what it is sent."""

    peer = "in-process"

    def __init__(self, request: Request, *, metadata: Mapping[str, str | bytes]) -> None:
        self._request = request
        self._metadata = metadata
        self._pending: deque[bytes] = deque()
        self._arrived = asyncio.Event()
        self._taken = asyncio.Event()
        self.status: Code | None = None
        """The final status, once the call has finished."""
        self.detail: str | None = None

    @property
    def metadata(self) -> Mapping[str, str | bytes]:
        return self._metadata

    async def read_request(self, message_type: type[M], *, max_size: int) -> M:
        # through the bytes, so the same size limit and strict parse apply as on the wire
        return decode_request(bytes(self._request), message_type, max_size=max_size)

    def admitted(self) -> None:
        pass

    async def start(self, metadata: Mapping[str, str] | None, abort: asyncio.Event) -> bool:
        return not abort.is_set()

    async def write(self, messages: Sequence[bytes], abort: asyncio.Event) -> int:
        pending = self._pending
        pending.extend(messages)
        self._arrived.set()
        while pending and not abort.is_set():
            self._taken.clear()
            await wait_first(self._taken, abort)
        if pending:  # aborted: what the consumer has not taken is not delivered
            written = len(messages) - len(pending)
            pending.clear()
            return max(written, 0)
        return len(messages)

    def try_write(self, message: bytes) -> bool:
        return False  # write() hands messages over as fast: no second path to keep

    async def reply(self, message: bytes, *, timeout: float) -> None:
        self._pending.append(message)
        self._arrived.set()

    async def finish(
        self, code: Code, message: str | None, *, final: bool = False, timeout: float
    ) -> None:
        self.status, self.detail = code, message
        self._arrived.set()

    def call_done(self, call: asyncio.Task[None]) -> None:
        """The call's task ended: if it ended without a status (it raised), wake the reader."""
        if self.status is None:
            self.status, self.detail = Code.UNKNOWN, "the call failed"
            self._arrived.set()

    async def responses(self) -> AsyncIterator[Response]:
        """Every message written, in order, until the call finishes."""
        pending = self._pending
        while True:
            while not pending:
                if self.status is not None:
                    return
                self._arrived.clear()
                await self._arrived.wait()
            data = pending.popleft()
            if not pending:
                self._taken.set()
            yield Response.FromString(data)
