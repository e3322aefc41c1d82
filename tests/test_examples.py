from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path

import pytest

from examples import typed_app
from examples.inventory import client, server
from examples.inventory._proto.inventory import Item
from examples.inventory.server import InventoryService
from longlived import Change, Settings, WatchCache
from tests.helpers import cache_until

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 20


async def test_typed_app_receives_its_own_events() -> None:
    ticks = await typed_app.main(count=3)
    assert len(ticks) == 3
    for tick in ticks:
        symbol, price = tick.split()
        assert symbol in {"ACME", "INITECH"}
        assert 90 < float(price) < 110


# ------------------------------------------------------------------ the inventory watch


async def test_the_inventory_client_prints_the_stock_and_its_changes(
    listener: socket.socket, quiet: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = quiet.model_copy(update={"interval": 0.01, "source": "none"})
    service = InventoryService(settings, seed=3, changes=30)
    await service.start(sock=listener)
    try:
        async with asyncio.timeout(TIMEOUT):
            final = await client.watch(settings, id=1, changes=30)
    finally:
        await service.close()
    assert final == service.items(Item, topic=server.TOPIC)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"synced: {len(server.starting_stock(3))} items"
    assert len(lines) == 31
    assert all(line.split()[0] in {"added", "updated", "deleted"} for line in lines[1:])


def diff(old: dict[str, Item], new: dict[str, Item]) -> set[tuple[str, str]]:
    """The changes that turn ``old`` into ``new``."""
    return (
        {("deleted", key) for key in old.keys() - new.keys()}
        | {("added", key) for key in new.keys() - old.keys()}
        | {("updated", key) for key in old.keys() & new.keys() if old[key] != new[key]}
    )


async def start_inventory(port: int, seed: int) -> asyncio.subprocess.Process:
    """``python -m examples.inventory.server`` with the stock of ``seed`` and no changes."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "examples.inventory.server", "--address", f"127.0.0.1:{port}",
        "--seed", str(seed), "--changes", "0",
        cwd=ROOT, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip


async def test_a_cache_converges_on_a_server_killed_and_restarted_with_other_stock(
    listener: socket.socket, settings: Settings
) -> None:
    port = listener.getsockname()[1]
    listener.close()  # the server processes listen on its port
    watched = settings
    first = await start_inventory(port, seed=1)
    second = None
    try:
        async with WatchCache(Item, 5, topic=server.TOPIC, settings=watched) as cache:
            seen: list[Change[Item]] = []
            cache.on_change(seen.append)
            async with asyncio.timeout(TIMEOUT):
                await cache.wait_synced()
            before = server.starting_stock(1)
            assert cache.items() == before
            seen.clear()
            first.kill()  # kill -9: no drain, no goodbye
            await first.wait()
            second = await start_inventory(port, seed=2)
            after = server.starting_stock(2)
            await cache_until(cache, lambda: cache.snapshots >= 2, timeout=TIMEOUT)
            assert cache.items() == after
            assert {(change.type, change.key) for change in seen} == diff(before, after)
            assert len(seen) == len(diff(before, after))  # each difference exactly once
            assert cache.client.failures >= 1
    finally:
        for process in (first, second):
            if process is not None and process.returncode is None:
                process.kill()
                await process.wait()
