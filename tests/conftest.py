"""Shared fixtures: real servers on ephemeral loopback ports; the event loops tests run on."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import socket
from collections.abc import AsyncIterator, Callable, Mapping

import pytest

from longlived import BackoffSettings, Settings, SubscriptionManager
from tests.helpers import running
from tests.test_cli import Process

ON_UVLOOP = {"test_attacks", "test_edges", "test_resume", "test_security", "test_transport"}
"""Modules whose async tests also run on uvloop (``longlived[uvloop]``): where the server
meets the socket. ``TEST_LOOPS=asyncio,uvloop`` runs every async test on both."""


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """asyncio's loop for every test; uvloop's too for ``ON_UVLOOP`` (or as TEST_LOOPS says)."""
    wanted = os.environ.get("TEST_LOOPS")
    if wanted:
        names = set(wanted.split(","))
    else:
        names = {"asyncio", "uvloop"} if item.path.stem in ON_UVLOOP else {"asyncio"}
    factories: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {}
    if "asyncio" in names:
        factories["asyncio"] = asyncio.new_event_loop
    if "uvloop" in names and importlib.util.find_spec("uvloop") is not None:
        import uvloop  # not where the dev extra leaves it out (Windows)

        factories["uvloop"] = uvloop.new_event_loop
    return factories


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
