"""A typed app built on longlived: a price-ticker service and a client that watches it.

The service subclasses ``SubscriptionManager`` and replaces the mock generator with its own
event source; the client is a ``ResilientClient``. ``mypy --strict`` checks this file.

Run it: ``python examples/typed_app.py`` (server and client in one process, a few ticks).
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
from dataclasses import dataclass

from longlived import ResilientClient, Settings, SubscriptionManager


@dataclass(frozen=True, slots=True)
class Tick:
    """One price update."""

    symbol: str
    price: float

    def render(self) -> str:
        return f"{self.symbol} {self.price:.2f}"


class TickerService(SubscriptionManager):
    """Sends every subscriber a price tick each ``settings.interval`` seconds."""

    def __init__(self, settings: Settings, *, symbols: list[str], seed: int = 0) -> None:
        super().__init__(settings)
        self.symbols = symbols
        self.rng = random.Random(seed)
        self.prices = dict.fromkeys(symbols, 100.0)

    def next_tick(self) -> Tick:
        symbol = self.rng.choice(self.symbols)
        self.prices[symbol] *= 1 + self.rng.uniform(-0.01, 0.01)
        return Tick(symbol, self.prices[symbol])

    async def event_source(self) -> None:
        while True:
            await asyncio.sleep(self.settings.interval)
            self.publish(self.next_tick().render())


async def watch(settings: Settings, id: int, count: int) -> list[str]:
    """Subscribe as ``id`` and return the first ``count`` ticks received."""
    ticks: list[str] = []
    async with ResilientClient(id, settings=settings) as client:
        async for response in client:
            ticks.append(response.data)
            if len(ticks) == count:
                break
    return ticks


async def main(count: int = 5) -> list[str]:
    """Run the service on a free loopback port and watch ``count`` ticks."""
    sock = socket.create_server(("127.0.0.1", 0))
    settings = Settings(address=f"127.0.0.1:{sock.getsockname()[1]}", interval=0.1)
    service = TickerService(settings, symbols=["ACME", "INITECH"])
    await service.start(sock=sock)
    try:
        async with asyncio.timeout(30):
            return await watch(settings, id=1, count=count)
    finally:
        await service.close()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    for tick in asyncio.run(main()):
        print(tick)
