"""Small asyncio helpers shared by the call layer and the transports."""

from __future__ import annotations

import asyncio
import collections
from typing import Any, Literal

__all__ = ["SparseEvent", "wait_first"]


class SparseEvent(asyncio.Event):
    """An ``asyncio.Event`` that makes its waiters' deque only when someone first waits.

    ``asyncio.Event()`` makes an empty ``collections.deque`` at once (760 bytes on CPython
    3.11) for an event that an idle stream never waits on (``Subscriber.aborted``, a
    server stream's ``window_updated``): 1.5 KB of the 10-12 KB an idle stream costs.
    ``set`` and ``clear`` are asyncio's own; one shared empty deque stands in until the
    first ``wait``, which swaps in a deque of this event's own before asyncio's ``wait``
    appends to it.
    ``tests/test_hub.py`` holds it to ``asyncio.Event``'s behaviour.
    """

    def __init__(self) -> None:  # no super().__init__(): that is what makes the deque
        self._waiters = _NO_WAITERS
        self._value = False

    async def wait(self) -> Literal[True]:
        if self._waiters is _NO_WAITERS:
            self._waiters = collections.deque()
        return await super().wait()


_NO_WAITERS: collections.deque[asyncio.Future[Any]] = collections.deque()
"""Every ``SparseEvent``'s waiters until it is first waited on; never appended to."""


async def wait_first(*events: asyncio.Event) -> None:
    """Wait until any of ``events`` is set (for waits that are not the hot path)."""
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waits:
            waiter.cancel()
