"""Our server in the benchmark: a ``SubscriptionManager`` fed by the benchmark driver."""

from __future__ import annotations

import socket

from _common import payload

from longlived import QueueSettings, Settings, SubscriptionManager

__all__ = ["Ours"]

_QUEUE_LIMIT = 1_000_000
"""The largest ``queue.size`` the settings allow."""


class _Manager(SubscriptionManager):
    """The server as a user subclasses it, with no event source of its own."""

    async def event_source(self) -> None:
        """Nothing: the benchmark driver publishes."""


class Ours:
    """longlived's ``SubscriptionManager``, default settings but for the queue bound.

    The queue holds a whole trial's events, so a burst that outruns the writers is delivered
    rather than cut off as a slow subscriber (the peer's queues are unbounded).
    """

    name = "ours"

    def __init__(self, *, events: int, size: int) -> None:
        settings = Settings(
            _env_file=None,  # a .env in the working directory does not change the run
            address="127.0.0.1:0",
            queue=QueueSettings(size=min(max(events, 1024), _QUEUE_LIMIT)),
        )
        self.manager = _Manager(settings)
        self.size = size

    async def start(self) -> int:
        """Listen on a free loopback port; returns it."""
        sock = socket.create_server(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        await self.manager.start(sock=sock)
        return port

    def subscribed(self) -> int:
        """Open subscriptions."""
        return len(self.manager.hub)

    async def wait_subscribed(self, count: int) -> None:
        """Wait until ``count`` subscriptions are open (unbounded: the caller bounds it)."""
        await self.manager.wait_for(lambda: len(self.manager.hub) >= count)

    def publish(self, index: int) -> None:
        """Publish event ``index`` to every subscriber."""
        self.manager.publish(payload(index, self.size))

    async def stop(self) -> None:
        """Drain and close the server."""
        await self.manager.close()
