"""The load: many concurrent subscribers on one server process receive a broadcast.

``generators`` load-generator processes (``tests.prove.roles loadgen``) each open their share
of ``subscribers`` streams over ``connections`` connections, many streams per connection
(the server's ``max_streams_per_connection`` raised for it, as a user would). Figures: the
time until every stream is open, the server's RSS per subscriber (its RSS with every stream
open, less before, over the subscribers), and for ``broadcasts`` events published to
everyone, each stamped with its ``time.monotonic()``, the delivery latency of every copy:
median and worst. Every stream must get every broadcast; timings are reported, never
asserted.
"""

from __future__ import annotations

import asyncio
import math
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, field

from tests.chaos.harness import Child
from tests.prove.probe import WAIT, Resources, sample, server, settle

__all__ = ["Load", "load"]


@dataclass
class Load:
    """What one run saw."""

    subscribers: int
    connections: int
    open_seconds: float = 0.0
    before: Resources | None = None
    opened: Resources | None = None
    after: Resources | None = None
    latencies: list[float] = field(default_factory=list)
    """Seconds from publish to arrival, every copy of every broadcast."""

    @property
    def kb_per_subscriber(self) -> float:
        assert self.before is not None
        assert self.opened is not None
        return (self.opened.rss_kb - self.before.rss_kb) / self.subscribers

    def problems(self) -> list[str]:
        found = []
        if self.opened is not None and self.opened.subscribers != self.subscribers:
            found.append(f"{self.opened.subscribers} of {self.subscribers} subscribed")
        return found


async def load(
    *,
    subscribers: int = 10_000,
    generators: int = 2,
    connections: int = 8,
    broadcasts: int = 10,
) -> Load:
    """One load run; see the module docstring. ``connections`` in all, shared out."""
    per_connection = math.ceil(subscribers / connections)
    run = Load(subscribers, connections)
    options = {
        "max_streams_per_connection": max(1024, per_connection),
        "limits": {"max_subscribers": max(100_000, subscribers)},
    }
    async with server(**options) as (child, settings), AsyncExitStack() as stack:
        run.before = await sample(child)
        loads: list[Child] = []
        for n in range(generators):
            share = subscribers // generators + (n < subscribers % generators)
            lines = max(1, connections // generators + (n < connections % generators))
            gen = await Child.start(
                "loadgen", "--address", settings.address, "--streams", str(share),
                "--connections", str(lines), "--first-id", str(n * subscribers),
                module="tests.prove.roles", control=True,
            )  # fmt: skip
            stack.push_async_callback(_end, gen)
            loads.append(gen)
        async with asyncio.timeout(WAIT):
            for gen in loads:
                await gen.wait_for(lambda records: bool(records))
        start = time.monotonic()
        async with asyncio.timeout(WAIT * 5):
            await asyncio.gather(*(gen.ask("open") for gen in loads))
        run.open_seconds = time.monotonic() - start
        run.opened = await sample(child)
        for k in range(broadcasts):
            async with asyncio.timeout(WAIT):
                await child.ask("broadcast", k=k)
                answers = await asyncio.gather(*(gen.ask("receive", k=k) for gen in loads))
            for answer in answers:
                latencies = answer["latencies"]
                assert isinstance(latencies, list)
                run.latencies += [float(x) for x in latencies]
        async with asyncio.timeout(WAIT * 2):
            await asyncio.gather(*(gen.ask("close") for gen in loads))
        run.after = await settle(child, run.before)
    return run


async def _end(gen: Child) -> None:
    await gen.kill()
    gen.forget()
