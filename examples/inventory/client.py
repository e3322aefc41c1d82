"""Watches the inventory service: a typed cache of every item, printing each change.

``WatchCache(Item, ...)`` holds the current ``Item`` of every key and reports changes as
``Change[Item]``: mypy sees an ``Item`` in every value, with no casts. The cache survives
restarts, drains and broken connections on its own, and after a restart with other stock
it reports exactly what differs.

Run it: ``python -m examples.inventory.client`` (after starting the server).
"""

from __future__ import annotations

import argparse
import asyncio
import logging

from longlived import Change, Settings, WatchCache

from ._proto.inventory import Item
from .server import TOPIC


def describe(change: Change[Item]) -> str:
    """One line for a change, as the client prints it."""
    item = change.value
    return f"{change.type:<8} {change.key}: {item.count} x {item.name} at {item.price}c"


async def watch(settings: Settings, *, id: int, changes: int = -1) -> dict[str, Item]:
    """Print the stock once synced, then ``changes`` changes (-1: until cancelled);
    returns the stock at the end."""
    async with WatchCache(Item, id, topic=TOPIC, settings=settings) as cache:
        await cache.wait_synced()
        print(f"synced: {len(cache)} items")
        seen = 0
        async for change in cache.changes():
            print(describe(change))
            seen += 1
            if seen == changes:
                break
        return cache.items()


DESCRIPTION = "Watches the inventory service: a typed cache of every item, printing each change."


def main() -> None:
    parser = argparse.ArgumentParser(description=DESCRIPTION)
    parser.add_argument("--address", default="127.0.0.1:7070")
    parser.add_argument("--id", type=int, default=1, help="the subscriber id")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    settings = Settings(address=args.address)
    asyncio.run(watch(settings, id=args.id))


if __name__ == "__main__":
    main()
