"""The inventory service: keeps a warehouse's stock as keyed state on topic ``inventory``.

Each item is the app's own protobuf message (``inventory.proto``, generated into
``_proto`` with ``python -m longlived.codegen``). The service puts the starting stock, then
changes it now and then: counts go up and down, new items arrive, sold-out ones go away.
Clients follow it with ``WatchCache`` (see ``client.py``).

Run it: ``python -m examples.inventory.server`` (127.0.0.1:7070; ``--help`` for options).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random

from longlived import Settings, SubscriptionManager

from ._proto.inventory import Item

TOPIC = "inventory"
NAMES = ["bolt", "nut", "washer", "gear", "spring", "valve", "hinge", "pulley"]


def starting_stock(seed: int, size: int = 8) -> dict[str, Item]:
    """The stock a service with ``seed`` starts with (the same for the same seed)."""
    rng = random.Random(seed)
    skus = rng.sample(range(100), size)
    return {
        f"sku-{n}": Item(
            sku=f"sku-{n}", name=rng.choice(NAMES), count=rng.randint(1, 50), price=n * 10
        )
        for n in skus
    }


class InventoryService(SubscriptionManager):
    """Puts the starting stock, then makes ``changes`` random changes (-1: forever), one
    every ``settings.interval`` seconds."""

    def __init__(self, settings: Settings, *, seed: int = 0, changes: int = -1) -> None:
        super().__init__(settings, payload_types=[Item])
        self.seed = seed
        self.changes = changes
        self.changes_made = 0

    async def prepare(self) -> None:
        # before the server listens: no client sees the starting stock half-put
        for key, item in starting_stock(self.seed).items():
            await self.put(key, item, topic=TOPIC)

    async def event_source(self) -> None:
        rng = random.Random(self.seed)
        while self.changes_made != self.changes:
            await asyncio.sleep(self.settings.interval)
            await self.change(rng)

    async def change(self, rng: random.Random) -> None:
        """One random change: restock or sell an item, add a new one, or drop one."""
        stock = self.items(Item, topic=TOPIC)
        self.changes_made += 1
        if not stock or rng.random() < 0.2:
            n = rng.randrange(100, 10_000)
            item = Item(sku=f"sku-{n}", name=rng.choice(NAMES), count=rng.randint(1, 9), price=n)
            await self.put(item.sku, item, topic=TOPIC)
            return
        item = stock[rng.choice(sorted(stock))]
        item.count += rng.choice([-3, -1, 1, 5])
        if item.count <= 0:
            await self.delete(item.sku, topic=TOPIC)  # sold out
        else:
            await self.put(item.sku, item, topic=TOPIC)


async def serve(settings: Settings, *, seed: int, changes: int) -> None:
    """Serve until cancelled (Ctrl-C)."""
    async with InventoryService(settings, seed=seed, changes=changes) as service:
        await service.wait_closed()


DESCRIPTION = (
    "The inventory service: keeps a warehouse's stock as keyed state on topic ``inventory``."
)


def main() -> None:
    parser = argparse.ArgumentParser(description=DESCRIPTION)
    parser.add_argument("--address", default="127.0.0.1:7070")
    parser.add_argument("--seed", type=int, default=0, help="picks the starting stock")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between changes")
    parser.add_argument("--changes", type=int, default=-1, help="how many (-1: forever)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    settings = Settings(address=args.address, interval=args.interval, source="none")
    asyncio.run(serve(settings, seed=args.seed, changes=args.changes))


if __name__ == "__main__":
    main()
