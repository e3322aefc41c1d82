"""The ``longlived`` command as a user runs it: real processes, signals, restarts."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable

import pytest

TIMEOUT = 20
GOT = re.compile(r'Client ID (\d+) got response: "data mock for: (\d+)"')


class Process:
    """A ``python -m longlived`` child whose log lines are collected as they arrive."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._changed = asyncio.Event()
        self._reader = asyncio.ensure_future(self._read())

    @classmethod
    async def start(cls, *args: str) -> Process:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "longlived", *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        return cls(proc)

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            self.lines.append(raw.decode().rstrip("\n"))
            self._changed.set()
        self._changed.set()

    async def wait_for(self, predicate: Callable[[list[str]], bool]) -> None:
        """Wait until ``predicate(lines)`` holds (bounded by the caller)."""
        while not predicate(self.lines):
            if self._reader.done():
                raise AssertionError("process ended:\n" + "\n".join(self.lines))
            self._changed.clear()
            await self._changed.wait()

    async def stop(self, signum: int = signal.SIGINT) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(signum)
        async with asyncio.timeout(TIMEOUT):
            code = await self.proc.wait()
            await self._reader
        return code

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
        await self.proc.wait()
        await self._reader


def got_from(lines: list[str], start: int = 0) -> set[int]:
    """Client ids that logged their own mock data in ``lines[start:]``."""
    ids = set()
    for line in lines[start:]:
        if (match := GOT.search(line)) is not None:
            assert match.group(1) == match.group(2), line  # each client gets its own data
            ids.add(int(match.group(1)))
    return ids


@pytest.fixture
async def processes() -> AsyncIterator[list[Process]]:
    started: list[Process] = []
    yield started
    for process in started:
        await process.kill()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_demo_runs_ten_clients_and_stops_cleanly_on_sigint(
    processes: list[Process],
) -> None:
    demo = await Process.start(
        "demo", "--address", "127.0.0.1:0", "--interval", "0.2", "--stagger", "0.05"
    )
    processes.append(demo)
    async with asyncio.timeout(TIMEOUT):
        await demo.wait_for(lambda lines: got_from(lines) == set(range(1, 11)))
    assert await demo.stop(signal.SIGINT) == 0
    output = "\n".join(demo.lines)
    assert "Traceback" not in output
    assert "SIGINT received: shutting down" in output
    assert "Server closed" in output


async def test_demo_stops_after_duration(processes: list[Process]) -> None:
    demo = await Process.start(
        "demo", "--address", "127.0.0.1:0", "--count", "2", "--stagger", "0",
        "--interval", "0.1", "--duration", "1",
    )  # fmt: skip
    processes.append(demo)
    async with asyncio.timeout(TIMEOUT):
        assert await demo.proc.wait() == 0
        await demo._reader
    assert got_from(demo.lines) == {1, 2}


async def test_clients_survive_a_server_restart(processes: list[Process]) -> None:
    address = f"127.0.0.1:{free_port()}"
    fast = ["--address", address, "--interval", "0.2"]
    server = await Process.start("serve", *fast)
    processes.append(server)
    async with asyncio.timeout(TIMEOUT):
        await server.wait_for(lambda lines: any("Listening on" in line for line in lines))
    clients = await Process.start(
        "clients", *fast, "--count", "3", "--stagger", "0",
        "--backoff.initial", "0.2", "--backoff.max", "0.5",
    )  # fmt: skip
    processes.append(clients)
    async with asyncio.timeout(TIMEOUT):
        await clients.wait_for(lambda lines: got_from(lines) == {1, 2, 3})
        assert await server.stop(signal.SIGTERM) == 0
        # every client logs the failure and retries with a backoff delay
        await clients.wait_for(
            lambda lines: (
                {
                    int(m.group(1))
                    for line in lines
                    if (m := re.search(r"Client ID (\d+): .*resubscribing in", line))
                }
                == {1, 2, 3}
            )
        )
        mark = len(clients.lines)
        server = await Process.start("serve", *fast)
        processes.append(server)
        await clients.wait_for(lambda lines: got_from(lines, mark) == {1, 2, 3})
    assert await clients.stop(signal.SIGINT) == 0
    assert "Traceback" not in "\n".join(clients.lines + server.lines)
