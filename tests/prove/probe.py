"""What the soak, load and fuzz runs share: the server under test in a process of its own,
and the resources it holds (RSS and open file descriptors from ``/proc``, asyncio tasks
from the process itself)."""

from __future__ import annotations

import asyncio
import json
import os
import platform
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import astuple, dataclass
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

from longlived import Settings
from tests.chaos.harness import Child
from tests.test_cli import free_port

__all__ = ["WAIT", "Resources", "banner", "sample", "server", "settle"]

WAIT = 60.0
"""Bound on every single wait of a run (a busy 2-core machine included)."""

SETTLE = 30.0
"""Seconds the server gets to release what a phase held."""


@dataclass(frozen=True, slots=True)
class Resources:
    """One sample of the server process."""

    rss_kb: int
    fds: int
    tasks: int
    subscribers: int
    connections: int
    objects: int = 0
    """Objects the garbage collector tracks (reported: caches come and go)."""

    def released(self, baseline: Resources) -> bool:
        """Whether it holds no more tasks, descriptors, subscribers or connections than
        ``baseline`` (RSS is judged by the caller: allocators keep freed memory)."""
        return (
            self.tasks <= baseline.tasks
            and self.fds <= baseline.fds
            and self.subscribers <= baseline.subscribers
            and self.connections <= baseline.connections
        )

    def most(self, other: Resources) -> Resources:
        """The larger of each figure of the two samples."""
        return Resources(*(max(a, b) for a, b in zip(astuple(self), astuple(other), strict=True)))

    def figures(self) -> str:
        return (
            f"RSS {self.rss_kb / 1024:.1f} MiB, {self.fds} fds, {self.tasks} tasks, "
            f"{self.subscribers} subscribers, {self.connections} connections, "
            f"{self.objects} objects"
        )


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


async def sample(child: Child) -> Resources:
    """The server's resources now (its tasks after a ``gc.collect()``)."""
    async with asyncio.timeout(WAIT):
        answer = await child.ask("sample")
    pid = child.proc.pid
    return Resources(
        rss_kb=_rss_kb(pid),
        fds=len(os.listdir(f"/proc/{pid}/fd")),
        tasks=int(str(answer["tasks"])),
        subscribers=int(str(answer["subscribers"])),
        connections=int(str(answer["connections"])),
        objects=int(str(answer["objects"])),
    )


async def settle(child: Child, baseline: Resources) -> Resources:
    """Wait until the server has released what it held beyond ``baseline``; the sample.

    Raises ``AssertionError`` naming what it still holds after ``SETTLE`` seconds.
    """
    now = await sample(child)
    try:
        async with asyncio.timeout(SETTLE):
            while not now.released(baseline):
                # another process's handlers ending signal nothing here: look again
                await asyncio.sleep(0.05)
                now = await sample(child)
    except TimeoutError:
        raise AssertionError(
            f"not back to baseline after {SETTLE:g}s: {now.figures()} "
            f"(baseline {baseline.figures()})"
        ) from None
    return now


@asynccontextmanager
async def server(**settings: object) -> AsyncIterator[tuple[Child, Settings]]:
    """The server role (``tests.prove.roles``) on a free loopback port, listening, with
    ``settings`` over the defaults; and the client settings that reach it."""
    address = f"127.0.0.1:{free_port()}"
    child = await Child.start(
        "server", "--address", address, "--settings", json.dumps(settings),
        module="tests.prove.roles", control=True,
    )  # fmt: skip
    try:
        async with asyncio.timeout(WAIT):
            await child.wait_for(lambda records: bool(records))
        yield child, Settings(_env_file=None, address=address)
    except BaseException:
        print(child.log.read_text()[-3000:], flush=True)  # the server's last log lines
        raise
    finally:
        await child.kill()
        child.forget()


def banner(what: str, clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> str:
    """The first line of a run's figures: what, when, on what."""
    return (
        f"{what} run {clock():%Y-%m-%d %H:%M} UTC, Python {platform.python_version()}, "
        f"grpclib {version('grpclib')}, {platform.machine()} {platform.system()}, "
        f"{os.cpu_count()} cores"
    )
