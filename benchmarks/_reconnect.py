"""The reconnect workload's clients, in the load-generator process.

For longlived: ``ResilientClient``, the client users run (grpclib; it resumes from its
token, drops duplicates, raises ``ResumeExpired`` on a RESET). For the peers, which have
no resume: a grpc.aio client that does what a careful user writes, the same backoff
(longlived's ``Backoff`` with the same defaults: the gRPC connection-backoff algorithm), a
fresh channel per attempt, resubscribing from live. Every event carries (generation,
index), so each client's tally shows what it missed.

Commands (``("rc", command, *args)``) and answers::

    ("open", port, n, resume)   -> ("rc_opened", seconds)  every client subscribed; started
                                   ``OPEN_BATCH`` at a time, as the other workloads open
                                   streams, so the initial connections do not storm the
                                   server (the restart's reconnections do, as they would)
    ("until", what, seconds)    -> ("rc_until", t, count)  what: "received" (every client
                                   has an event) or "again" (every client has an event on a
                                   stream opened after "mark"); t = when the last one did
                                   (None if not all did within ``seconds``), count = how
                                   many did
    ("mark",)                   -> ("rc_marked", cpu) the server is about to be killed
    ("cpu",)                    -> ("rc_cpu", cpu)    this process's CPU seconds so far
    ("finish", last0, last1)    -> ("rc_result", {...})  once every client has the last event
    ("close",)                  -> ("rc_closed",)
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from benchmarks._common import SUBSCRIBE, Stubs, parse_numbered

__all__ = ["Clients"]

POLL = 0.05
"""Seconds between checks of the clients' tallies while waiting for a condition."""
OPEN_BATCH = 100


@dataclass(slots=True)
class _Tally:
    """What one client received."""

    received: set[tuple[int, int]] = field(default_factory=set)
    duplicates: int = 0
    resets: int = 0
    streams: int = 0
    marked_streams: int | None = None
    again_at: float | None = None
    """Arrival of the first event on a stream opened after the mark."""
    opened: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once the client's first stream is open (the server has its subscription)."""

    def record(self, data: str) -> None:
        key = parse_numbered(data)
        if key in self.received:
            self.duplicates += 1
        self.received.add(key)
        marked = self.marked_streams
        if marked is not None and self.again_at is None and self.streams > marked:
            self.again_at = time.monotonic()


class Clients:
    """N reconnecting clients and their tallies."""

    def __init__(self, stubs: Stubs) -> None:
        self.stubs = stubs
        self.tallies: list[_Tally] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.stop = asyncio.Event()
        self.closers: list[asyncio.Task[None]] = []
        """Helper tasks (each ResilientClient's watch for its first stream)."""

    async def handle(self, command: str, *args: Any, timeout: float) -> tuple[Any, ...]:
        if command == "open":
            started = time.monotonic()
            async with asyncio.timeout(timeout):
                await self._open(*args)
            return ("rc_opened", time.monotonic() - started)
        if command == "until":
            what, seconds = args
            return ("rc_until", *await self._until(what, min(seconds, timeout)))
        if command == "mark":
            for tally in self.tallies:
                tally.marked_streams = tally.streams
            return ("rc_marked", time.process_time())
        if command == "cpu":
            return ("rc_cpu", time.process_time())
        if command == "finish":
            return ("rc_result", await self._finish(*args, timeout=timeout))
        if command == "close":
            await self._close(timeout)
            return ("rc_closed",)
        raise ValueError(f"unknown reconnect command {command!r}")

    async def _open(self, port: int, n: int, resume: bool) -> None:
        self.tallies = [_Tally() for _ in range(n)]
        run = self._resilient if resume else self._plain
        for first in range(0, n, OPEN_BATCH):
            batch = range(first, min(first + OPEN_BATCH, n))
            self.tasks += [asyncio.create_task(run(i, port, self.tallies[i])) for i in batch]
            while not all(self.tallies[i].opened.is_set() for i in batch):
                self._check_tasks()
                await asyncio.sleep(POLL)

    async def _until(self, what: str, timeout: float) -> tuple[float | None, int]:
        def ready(t: _Tally) -> bool:
            return bool(t.received) if what == "received" else t.again_at is not None

        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while not all(ready(t) for t in self.tallies):
                    self._check_tasks()
                    await asyncio.sleep(POLL)
        count = sum(ready(t) for t in self.tallies)
        if count < len(self.tallies):
            return None, count
        if what == "received":
            return time.monotonic(), count
        return max(t.again_at for t in self.tallies if t.again_at is not None), count

    async def _finish(self, last0: int, last1: int, *, timeout: float) -> dict[str, Any]:
        """Wait until every client has the last event; what each lost, and how it knew."""
        final = (1, last1)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while not all(final in t.received for t in self.tallies):
                    self._check_tasks()
                    await asyncio.sleep(POLL)
        expected = {(0, i) for i in range(1, last0 + 1)} | {(1, i) for i in range(1, last1 + 1)}
        lost = [len(expected - t.received) for t in self.tallies]
        again = [t.again_at for t in self.tallies if t.again_at is not None]
        return {
            "clients": len(self.tallies),
            "published": [last0, last1],
            "missing_final": sum(final not in t.received for t in self.tallies),
            "lost": sum(lost),
            "lost_announced": sum(n for n, t in zip(lost, self.tallies, strict=True) if t.resets),
            "lost_unannounced": sum(
                n for n, t in zip(lost, self.tallies, strict=True) if not t.resets
            ),
            "clients_losing": sum(1 for n in lost if n),
            "resets": sum(t.resets for t in self.tallies),
            "duplicates": sum(t.duplicates for t in self.tallies),
            "again_median": statistics.median(again) if again else None,
        }

    def _check_tasks(self) -> None:
        for task in self.tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise RuntimeError(f"a client failed: {task.exception()!r}")

    async def _close(self, timeout: float) -> None:
        self.stop.set()
        for task in [*self.tasks, *self.closers]:
            task.cancel()
        async with asyncio.timeout(timeout):
            await asyncio.gather(*self.tasks, *self.closers, return_exceptions=True)
        self.tasks, self.closers = [], []

    # --------------------------------------------------------------------- the clients

    async def _resilient(self, id: int, port: int, tally: _Tally) -> None:
        """longlived's ``ResilientClient``: resume with the token, RESET counted."""
        from longlived import ResilientClient, ResumeExpired, Settings

        settings = Settings(_env_file=None, address=f"127.0.0.1:{port}")
        async with ResilientClient(id, settings=settings) as client:

            async def opened() -> None:
                await client.connected.wait()
                tally.opened.set()

            watch = asyncio.create_task(opened())
            self.closers.append(watch)
            while not self.stop.is_set():
                try:
                    async for response in client:
                        tally.streams = client.connections
                        tally.record(response.data)
                    return  # the server ended the subscription
                except ResumeExpired:
                    tally.resets += 1  # the loss is announced; carry on live

    async def _plain(self, id: int, port: int, tally: _Tally) -> None:
        """A grpc.aio client without resume: the same backoff, a fresh channel each time."""
        import grpc

        from longlived import BackoffSettings

        backoff = BackoffSettings().to_backoff()
        rng = random.Random(id)
        request = self.stubs.messages.Request(id=id)
        decode = self.stubs.messages.Response.FromString
        attempt = 0
        while not self.stop.is_set():
            options = [("grpc.enable_http_proxy", 0), ("grpc.use_local_subchannel_pool", 1)]
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options)
            try:
                call = channel.unary_stream(
                    SUBSCRIBE, request_serializer=type(request).SerializeToString
                )(request, timeout=None)
                tally.streams += 1
                await call.initial_metadata()
                tally.opened.set()
                async for message in call:
                    attempt = 0  # this stream delivered: start the backoff afresh
                    tally.record(decode(message).data)
                return  # ended with OK
            except grpc.aio.AioRpcError:
                pass
            finally:
                await channel.close()
            delay = backoff.compute(attempt, rng)
            attempt += 1
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self.stop.wait()
