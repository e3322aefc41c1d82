"""Shared fixtures: real servers on ephemeral loopback ports."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable

import pytest

from longlived import BackoffSettings, Settings, SubscriptionManager
from tests.helpers import running
from tests.test_cli import Process


@pytest.fixture
def listener() -> socket.socket:
    """A bound, listening loopback socket on a free port (race-free server start)."""
    return socket.create_server(("127.0.0.1", 0))


@pytest.fixture
def settings(listener: socket.socket) -> Settings:
    """Fast settings pointing at ``listener``: short interval and backoff."""
    port = listener.getsockname()[1]
    return Settings(
        address=f"127.0.0.1:{port}",
        interval=0.05,
        backoff=BackoffSettings(initial=0.05, max=0.2, multiplier=1.6, jitter=0.2),
        drain_timeout=2.0,
        connect_timeout=2.0,
    )


ManagerFactory = Callable[..., SubscriptionManager]


@pytest.fixture
async def manager(
    settings: Settings, listener: socket.socket
) -> AsyncIterator[SubscriptionManager]:
    """A started ``SubscriptionManager`` (mock generator on) on ``listener``."""
    async with running(settings, listener) as server:
        yield server


@pytest.fixture
def quiet(settings: Settings) -> Settings:
    """``settings`` with a mock generator that never fires: tests publish their own events."""
    return settings.model_copy(update={"interval": 3600.0})


@pytest.fixture
async def server(quiet: Settings, listener: socket.socket) -> AsyncIterator[SubscriptionManager]:
    """A started ``SubscriptionManager`` with ``quiet`` settings."""
    async with running(quiet, listener) as manager:
        yield manager


@pytest.fixture
async def processes() -> AsyncIterator[list[Process]]:
    """Child processes to kill at teardown (SIGKILL also ends a stopped process)."""
    started: list[Process] = []
    yield started
    for process in started:
        await process.kill()
