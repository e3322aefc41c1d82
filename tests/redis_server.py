"""A redis-server of the test's own, on a free loopback port, that the test can kill.

Persistence is off, as in the Redis restart the guarantees are stated for: a restarted
server comes back empty. Where ``redis-server`` is not installed the tests that need it
skip, unless ``TEST_REQUIRE_REDIS=1`` (``.ci/run`` sets it), which makes that a failure.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import pytest
import redis.asyncio as aioredis
import redis.exceptions

__all__ = ["RedisServer", "redis_cluster", "redis_server"]

BINARY = shutil.which("redis-server")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One redis-server process; ``restart()`` kills it (-9) and starts a fresh, empty one."""

    def __init__(self, port: int, *extra: str) -> None:
        self.port = port
        self.extra = extra
        self.url = f"redis://127.0.0.1:{port}/0"
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        assert BINARY is not None
        self.process = await asyncio.create_subprocess_exec(
            BINARY, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--protected-mode", "no", *self.extra,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        client = aioredis.Redis.from_url(self.url)
        try:
            async with asyncio.timeout(10):
                for _ in range(10_000):  # the process signals nothing when it is ready: ask
                    try:
                        await client.ping()
                        return
                    except (OSError, redis.exceptions.ConnectionError):
                        await asyncio.sleep(0.02)
        finally:
            await client.aclose()

    async def kill(self) -> None:
        """kill -9: nothing is saved."""
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)
            async with asyncio.timeout(10):
                await self.process.wait()

    def freeze(self, frozen: bool = True) -> None:
        """SIGSTOP (or SIGCONT): its sockets stay open, nothing answers."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP if frozen else signal.SIGCONT)

    async def restart(self) -> None:
        await self.kill()
        await self.start()


@asynccontextmanager
async def redis_server() -> AsyncIterator[RedisServer]:
    """A running redis-server, killed on the way out."""
    if BINARY is None:
        reason = "redis-server is not installed"
        if os.environ.get("TEST_REQUIRE_REDIS") == "1":
            pytest.fail(f"{reason}, and TEST_REQUIRE_REDIS=1 requires it")
        pytest.skip(reason)
    server = RedisServer(_free_port())
    await server.start()
    try:
        yield server
    finally:
        await server.kill()


@asynccontextmanager
async def redis_cluster(directory: Path) -> AsyncIterator[list[RedisServer]]:
    """Three redis-server nodes made into one Redis Cluster (no replicas), killed on the
    way out; their cluster state files go in ``directory``."""
    cli = shutil.which("redis-cli")
    if BINARY is None or cli is None:
        reason = "redis-server or redis-cli is not installed"
        if os.environ.get("TEST_REQUIRE_REDIS") == "1":
            pytest.fail(f"{reason}, and TEST_REQUIRE_REDIS=1 requires it")
        pytest.skip(reason)
    nodes = []
    for _ in range(3):
        port = _free_port()
        while port > 55_000:  # a node also listens on port + 10000, its cluster bus
            port = _free_port()
        nodes.append(RedisServer(port, "--cluster-enabled", "yes", "--dir", str(directory),
                                 "--cluster-config-file", f"nodes-{port}.conf"))  # fmt: skip
    try:
        for node in nodes:
            await node.start()
        create = await asyncio.create_subprocess_exec(
            cli, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in nodes),
            "--cluster-replicas", "0", "--cluster-yes",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        async with asyncio.timeout(30):
            assert await create.wait() == 0, "redis-cli --cluster create failed"
            for node in nodes:
                client = aioredis.Redis.from_url(node.url)
                try:
                    for _ in range(10_000):  # the cluster agrees on its state in a moment
                        command = cast("Any", client).execute_command  # untyped in redis-py
                        info = await command("CLUSTER", "INFO")
                        if b"cluster_state:ok" in info:
                            break
                        await asyncio.sleep(0.05)
                finally:
                    await client.aclose()
        yield nodes
    finally:
        for node in nodes:
            await node.kill()
