"""longlived in the benchmark: a ``SubscriptionManager`` fed by the benchmark's driver."""

from __future__ import annotations

from longlived import QueueSettings, RedisSettings, Settings, SubscriptionManager

__all__ = ["Ours"]

_QUEUE_LIMIT = 1_000_000
"""The largest ``queue.size`` the settings allow."""


class _Manager(SubscriptionManager):
    """The server as a user subclasses it, with no event source of its own."""

    async def event_source(self) -> None:
        """Nothing: the benchmark driver publishes."""


class Ours:
    """longlived's ``SubscriptionManager`` with default settings, but for two things.

    ``queue.size`` holds a whole trial's events, so a burst that outruns the writers is
    delivered rather than cut off as a slow subscriber (the peers' queues are unbounded);
    ``redis.url`` puts the log on Redis (the reconnect workload's loss-free variant).
    """

    def __init__(
        self, *, name: str, queue: int, redis_url: str | None = None, redis_stream: str = ""
    ) -> None:
        self.name = name
        self._queue = min(max(queue, 1024), _QUEUE_LIMIT)
        self._redis = RedisSettings(url=redis_url, stream=redis_stream or "longlived-bench")
        self._shared = redis_url is not None
        self.manager = self._manager(0)

    def _manager(self, port: int) -> _Manager:
        settings = Settings(
            _env_file=None,  # a .env in the working directory does not change the run
            address=f"127.0.0.1:{port}",
            queue=QueueSettings(size=self._queue),
            redis=self._redis,
        )
        return _Manager(settings)

    async def start(self, port: int = 0) -> int:
        """Listen on loopback ``port`` (0: a free one), as ``longlived serve`` does (the
        manager makes its own listener); returns the port."""
        if port:
            self.manager = self._manager(port)
        await self.manager.start()
        return int(self.manager.address.rsplit(":", 1)[1])

    def subscribed(self) -> int:
        """Open subscriptions."""
        return len(self.manager.subscribers)

    async def wait_subscribed(self, count: int) -> None:
        """Wait until ``count`` subscriptions are open (unbounded: the caller bounds it)."""
        await self.manager.wait_for(lambda: len(self.manager.hub) >= count)

    def publish(self, data: str, index: int) -> None:
        """Publish ``data`` to every subscriber (the in-memory log)."""
        self.manager.publish(data)

    async def emit(self, data: str, index: int) -> None:
        """Publish ``data`` on whichever log this server has (Redis: once it is appended)."""
        if self._shared:
            await self.manager.emit(data)
        else:
            self.manager.publish(data)

    async def stop(self) -> None:
        """Drain and close the server."""
        await self.manager.close()
