"""Small asyncio helpers shared by the call layer and the transports."""

from __future__ import annotations

import asyncio

__all__ = ["wait_first"]


async def wait_first(*events: asyncio.Event) -> None:
    """Wait until any of ``events`` is set (for waits that are not the hot path)."""
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waits:
            waiter.cancel()
