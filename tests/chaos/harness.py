"""The chaos harness: real processes, a fault injector, and the tally of what the apps saw.

One run of a fault: start the server (or two replicas on a Redis of the run's own), a
publisher of a numbered sequence and three subscribers, each subscriber behind a TCP proxy
the run controls; wait until every subscriber receives; inject the fault and undo it; wait
until every subscriber receives an event published after the recovery (the recovery time);
stop the publisher and wait for every subscriber to have the last number it published.

The tally checks each subscriber's sequence: every number exactly once and in order, except
gaps a RESET announced (the in-memory log lost at a restart). Nothing here sleeps to
synchronise: waits are on lines the processes print, each bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.proxy import Proxy, proxy_to
from tests.redis_server import RedisServer, redis_server
from tests.test_cli import free_port

__all__ = ["FAULTS", "Child", "Outcome", "Run", "run_fault"]

SUBSCRIBERS = 3
WAIT = 30.0
"""Bound on every wait of a run (a busy 2-core machine included)."""


class Child:
    """A ``python -m tests.chaos.roles`` process whose JSON lines are collected."""

    def __init__(self, proc: asyncio.subprocess.Process, log: Path) -> None:
        self.proc = proc
        self.log = log
        """Its stderr (log lines), kept for a failure's message."""
        self.records: list[dict[str, object]] = []
        self.times: list[float] = []
        self._changed = asyncio.Event()
        self._asked = 0
        self._reader = asyncio.ensure_future(self._read())

    @classmethod
    async def start(
        cls, *args: str, module: str = "tests.chaos.roles", control: bool = False
    ) -> Child:
        """Start ``python -m module args``; ``control``: it reads commands on stdin (``ask``)."""
        fd, name = tempfile.mkstemp(prefix="longlived-chaos-", suffix=".log")
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", module, *args,
                stdin=asyncio.subprocess.PIPE if control else None,
                stdout=asyncio.subprocess.PIPE, stderr=fd, limit=1 << 24,
            )  # fmt: skip
        finally:
            os.close(fd)
        return cls(proc, Path(name))

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            self.records.append(json.loads(raw))
            self.times.append(time.monotonic())
            self._changed.set()
        self._changed.set()

    async def wait_for(self, predicate: Callable[[list[dict[str, object]]], bool]) -> None:
        """Wait until ``predicate(records)`` holds (bounded by the caller)."""
        while not predicate(self.records):
            if self._reader.done():
                tail = self.log.read_text().splitlines()[-10:]
                raise AssertionError(
                    f"process ended early: {self.records[-3:]}\n" + "\n".join(tail)
                )
            self._changed.clear()
            await self._changed.wait()

    async def ask(self, op: str, **args: object) -> dict[str, object]:
        """Send the command ``op`` as a JSON line on its stdin; its answer, the record
        carrying the command's number as ``re`` (commands may be answered out of order).
        Unbounded by itself: the caller bounds it."""
        assert self.proc.stdin is not None, "started without control=True"
        self._asked += 1
        number = self._asked
        self.proc.stdin.write((json.dumps({"op": op, "id": number, **args}) + "\n").encode())
        await self.proc.stdin.drain()
        await self.wait_for(lambda records: any(r.get("re") == number for r in records))
        answer = next(r for r in self.records if r.get("re") == number)
        if "error" in answer:
            raise AssertionError(f"{op} failed in the child: {answer['error']}")
        return answer

    def send(self, signum: int) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signum)

    async def stop(self, signum: int = signal.SIGINT) -> None:
        self.send(signum)
        async with asyncio.timeout(WAIT):
            await self.proc.wait()
            await self._reader

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
        await self.proc.wait()
        await self._reader

    def forget(self) -> None:
        """Remove its log file."""
        self.log.unlink(missing_ok=True)

    def numbers(self) -> list[int]:
        return [int(str(r["n"])) for r in self.records if "n" in r]


@dataclass
class Outcome:
    """What one run saw."""

    published: int = 0
    delivered: int = 0
    lost: int = 0
    """Numbers a subscriber never got, where no RESET announced a gap."""
    announced: int = 0
    """Numbers lost where a RESET said so (the in-memory log lost at a restart)."""
    duplicated: int = 0
    out_of_order: int = 0
    recovery: float = 0.0
    """Seconds from the fault's undoing until every subscriber received again."""


def tally(records: list[dict[str, object]], published: int, outcome: Outcome) -> None:
    """Add one subscriber's sequence to ``outcome``."""
    seen: set[int] = set()
    last = -1
    reset = True  # a subscriber starts live: what came before it subscribed is not lost
    for record in records:
        if "reset" in record:
            reset = True
            continue
        n = int(str(record["n"]))
        outcome.delivered += 1
        if n in seen:
            outcome.duplicated += 1
            continue
        if n < last:
            outcome.out_of_order += 1
        elif n > last + 1 and last >= 0:
            gap = n - last - 1
            if reset:
                outcome.announced += gap
            else:
                outcome.lost += gap
        seen.add(n)
        last = max(last, n)
        reset = False
    if last < published - 1:
        outcome.lost += published - 1 - last  # never arrived at all


@dataclass
class Run:
    """The processes and proxies of one run."""

    redis: RedisServer | None
    ports: list[int]
    proxies: list[Proxy] = field(default_factory=list)
    servers: list[Child | None] = field(default_factory=list)
    subscribers: list[Child] = field(default_factory=list)
    publisher: Child | None = None
    queue: int = 1024
    keepalive: float = 0.5
    all: list[Child] = field(default_factory=list)
    """Every server process started (killed ones included)."""

    def _server_args(self, index: int) -> list[str]:
        args = ["server", "--address", f"127.0.0.1:{self.ports[index]}"]
        args += ["--queue", str(self.queue), "--keepalive", str(self.keepalive)]
        if self.redis is not None:
            args += ["--redis", self.redis.url]
        return args

    async def start_server(self, index: int = 0) -> None:
        child = await Child.start(*self._server_args(index))
        self.all.append(child)
        async with asyncio.timeout(WAIT):
            await child.wait_for(lambda records: bool(records))
        self.servers[index] = child

    async def kill_server(self, index: int = 0) -> None:
        child = self.servers[index]
        assert child is not None
        await child.kill()
        self.servers[index] = None

    def retarget(self, index: int) -> None:
        """New connections through every proxy go to server ``index`` (a client moved)."""
        for proxy in self.proxies:
            proxy.upstream = ("127.0.0.1", self.ports[index])

    async def received_after(self, mark: float) -> float:
        """Wait until every subscriber got an event after ``mark``; the seconds it took."""
        async with asyncio.timeout(WAIT):
            for sub in self.subscribers:
                await sub.wait_for(functools.partial(_after, sub, mark))
        return max(next(t for t, r in zip(s.times, s.records, strict=True)
                        if t > mark and "n" in r) for s in self.subscribers) - mark  # fmt: skip

    async def finish(self) -> Outcome:
        """Stop publishing, wait for the last number everywhere, tally."""
        assert self.publisher is not None
        await self.publisher.stop()
        published = int(str(self.publisher.records[-1]["published"]))
        outcome = Outcome(published=published)
        with contextlib.suppress(TimeoutError):  # what never arrives is counted as lost
            async with asyncio.timeout(WAIT):
                for sub in self.subscribers:
                    await sub.wait_for(functools.partial(_has, sub, published - 1))
        for sub in self.subscribers:
            tally(sub.records, published, outcome)
        return outcome


def _after(sub: Child, mark: float, _: object = None) -> bool:
    return any(t > mark and "n" in r for t, r in zip(sub.times, sub.records, strict=True))


def _has(sub: Child, n: int, _: object = None) -> bool:
    return n in sub.numbers()


def _has_many(sub: Child, count: int, _: object = None) -> bool:
    return len(sub.numbers()) >= count


@asynccontextmanager
async def started(
    *, redis: bool, replicas: int = 1, queue: int = 1024, pad: int = 0, keepalive: float = 0.5
) -> AsyncIterator[Run]:
    """A run's processes, all receiving; everything is killed on the way out."""
    async with AsyncExitStack() as stack:
        shared = await stack.enter_async_context(redis_server()) if redis else None
        ports = [free_port() for _ in range(replicas)]
        run = Run(shared, ports, queue=queue, keepalive=keepalive)
        run.servers = [None] * replicas
        stack.push_async_callback(_kill_all, run)
        for index in range(replicas):
            await run.start_server(index)
        for id in range(SUBSCRIBERS):
            proxy, port = await stack.enter_async_context(proxy_to(("127.0.0.1", run.ports[0])))
            run.proxies.append(proxy)
            run.subscribers.append(
                await Child.start("subscriber", "--address", f"127.0.0.1:{port}", "--id", str(id))
            )
        publish_to = f"127.0.0.1:{run.ports[0]}"
        args = ["publisher", "--address", publish_to, "--pad", str(pad)]
        run.publisher = await Child.start(*args, *(["--redis", shared.url] if shared else []))
        async with asyncio.timeout(WAIT):
            for sub in run.subscribers:
                await sub.wait_for(functools.partial(_has_many, sub, 20))
        yield run


async def _kill_all(run: Run) -> None:
    for child in [*run.all, *run.subscribers, run.publisher]:
        if child is not None:
            await child.kill()
            child.forget()


# ---------------------------------------------------------------------------- faults


async def kill9_restart(run: Run) -> float:
    """kill -9 the server, start it again on the same port."""
    await run.kill_server()
    await run.start_server()
    return time.monotonic()


async def sigstop_server(run: Run) -> float:
    """SIGSTOP the server longer than keepalive time + timeout, then SIGCONT."""
    server = run.servers[0]
    assert server is not None
    server.send(signal.SIGSTOP)
    await _quiet_for(run, 1.5)
    server.send(signal.SIGCONT)
    return time.monotonic()


async def sigterm_drain(run: Run) -> float:
    """SIGTERM: the server drains (UNAVAILABLE, GOAWAY) and exits; start it again."""
    server = run.servers[0]
    assert server is not None
    await server.stop(signal.SIGTERM)
    await run.start_server()
    return time.monotonic()


async def sigstop_client(run: Run) -> float:
    """SIGSTOP one subscriber until the server ends its stream as too slow (its queue, the
    flow-control window and the socket buffers all full), then SIGCONT."""
    sub = run.subscribers[0]
    server = run.servers[0]
    assert server is not None
    sub.send(signal.SIGSTOP)
    try:
        async with asyncio.timeout(WAIT):
            while "too slow" not in server.log.read_text():
                await _quiet_for(run, 0.1)  # the log file gives no event to wait on
    finally:
        sub.send(signal.SIGCONT)
    return time.monotonic()


async def blackhole(run: Run) -> float:
    """Every proxy forwards nothing, sockets open, for longer than keepalive time +
    timeout (and the heartbeat misses); then traffic flows again."""
    for proxy in run.proxies:
        proxy.freeze()
    await _quiet_for(run, 2.0)
    for proxy in run.proxies:
        proxy.thaw()
    return time.monotonic()


async def cut_mid_frame(run: Run) -> float:
    """Every proxy cuts its connections in the middle of the server's next write."""
    for proxy in run.proxies:
        await proxy.cut()
    return time.monotonic()


async def replica_kill9(run: Run) -> float:
    """kill -9 the replica the subscribers are on; they move to the other one."""
    run.retarget(1)
    await run.kill_server(0)
    return time.monotonic()


async def redis_freeze(run: Run) -> float:
    """SIGSTOP Redis longer than its command timeout, then SIGCONT."""
    assert run.redis is not None
    run.redis.freeze()
    await _quiet_for(run, 1.5)
    run.redis.freeze(False)
    return time.monotonic()


async def _quiet_for(run: Run, seconds: float) -> None:
    """Let the fault last ``seconds``: the publisher keeps publishing meanwhile (its lines
    are the clock here; no sleep synchronises anything)."""
    assert run.publisher is not None
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await run.publisher.wait_for(lambda _: False)


Fault = Callable[[Run], Awaitable[float]]


@dataclass(frozen=True, slots=True)
class Kind:
    """One fault kind and the setting it runs in."""

    name: str
    fault: Fault
    redis: bool = False
    replicas: int = 1
    queue: int = 1024
    pad: int = 0
    """Bytes of padding per event."""
    keepalive: float = 0.5
    """The server's keepalive time and timeout."""
    lossless: bool = True
    """False where the in-memory log is lost and RESET announces the gap."""


FAULTS = [
    Kind("kill -9 + restart (memory)", kill9_restart, lossless=False),
    Kind("kill -9 + restart (redis)", kill9_restart, redis=True),
    Kind("SIGSTOP server", sigstop_server),
    Kind("SIGTERM drain + restart (memory)", sigterm_drain, lossless=False),
    Kind("SIGTERM drain + restart (redis)", sigterm_drain, redis=True),
    # keepalive would notice the stopped client first: here its queue must overflow
    Kind("SIGSTOP client past its queue", sigstop_client, queue=64, pad=16_384, keepalive=60),
    Kind("black-holed connections", blackhole),
    Kind("cut mid-frame", cut_mid_frame),
    Kind("replica kill -9, clients moved", replica_kill9, redis=True, replicas=2),
    Kind("Redis SIGSTOP", redis_freeze, redis=True),
]


async def run_fault(kind: Kind) -> Outcome:
    """One run of ``kind``."""
    async with started(
        redis=kind.redis,
        replicas=kind.replicas,
        queue=kind.queue,
        pad=kind.pad,
        keepalive=kind.keepalive,
    ) as run:
        undone = await kind.fault(run)
        recovery = await run.received_after(undone)
        outcome = await run.finish()
        outcome.recovery = recovery
        return outcome
