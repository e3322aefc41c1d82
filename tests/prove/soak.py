"""The soak: many subscribe/unsubscribe cycles and a long event stream against one server
process, whose RSS, open file descriptors and asyncio tasks must come back to where they
started.

A run: start the server, fill its history with events of the stream's size (so the
baseline already holds a full history), warm up (a few hundred cycles and a short stream,
so caches and lazily imported code are in the baseline too), take the baseline; then the
cycles, each ending in one of six ways (Unsubscribe, the client's cancel, a replacing
Subscribe, a resume that replays history, the connection closed, a refused request), on
``workers`` concurrent connections that are renewed now and then; then the stream: a
numbered sequence published at a fixed rate (a long feed, compressed in time) to a few
``ResilientClient`` subscribers, each of which must see every number once, in order. After
each phase the server must release every task, descriptor, subscriber and connection it
held, and its RSS must be within ``rss_slack`` of the baseline; samples along the way give
the peak.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from grpclib.client import Channel, Stream
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError

from longlived import (
    BackoffSettings,
    HeartbeatSettings,
    QueueSettings,
    ReplaySettings,
    Request,
    ResilientClient,
    Response,
    ResumeExpired,
    Settings,
)
from longlived._proto.longlived import LonglivedStub
from tests.chaos.harness import Child
from tests.prove.probe import WAIT, Resources, sample, server, settle

__all__ = ["ENDINGS", "Phase", "Soak", "churn", "soak", "stream"]

ENDINGS = ("unsubscribe", "cancel", "replace", "resume", "disconnect", "refused")
"""How a cycle's subscription ends."""

REPLAYED = 20
"""Events a resuming cycle asks for again."""

TOPIC = "stream"


@dataclass
class Phase:
    """What one phase did and what the server held during and after it."""

    name: str
    count: int = 0
    seconds: float = 0.0
    peak: Resources | None = None
    after: Resources | None = None
    outcomes: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)


@dataclass
class Soak:
    """A whole run."""

    baseline: Resources
    phases: list[Phase] = field(default_factory=list)
    rss_slack_kb: int = 0
    objects_slack: int = 0

    def problems(self) -> list[str]:
        """What went wrong: errors, and resources not back to the baseline."""
        found = []
        for phase in self.phases:
            found += [f"{phase.name}: {error}" for error in phase.errors[:5]]
            after = phase.after
            if after is None:
                continue
            if not after.released(self.baseline):
                found.append(f"{phase.name}: still holds {after.figures()}")
            if after.rss_kb > self.baseline.rss_kb + self.rss_slack_kb:
                found.append(
                    f"{phase.name}: RSS {after.rss_kb} KiB, baseline {self.baseline.rss_kb} KiB "
                    f"+ slack {self.rss_slack_kb} KiB"
                )
            if after.objects > self.baseline.objects + self.objects_slack:
                found.append(
                    f"{phase.name}: {after.objects} objects, baseline {self.baseline.objects} "
                    f"+ slack {self.objects_slack}"
                )
        return found


class _Peak:
    """Samples the server every ``period`` seconds while a phase runs; keeps the largest of
    each figure (not the sample with the largest RSS: RSS may not grow at all, and that
    sample may be the first, taken before any connection was open)."""

    def __init__(self, child: Child, period: float) -> None:
        self.child = child
        self.period = period
        self.peak: Resources | None = None

    async def run(self) -> None:
        while True:
            await self.take()
            await asyncio.sleep(self.period)  # the sampling period, not a synchronisation

    async def take(self) -> None:
        """One sample now (also asked for by a phase at its busiest)."""
        now = await sample(self.child)
        self.peak = now if self.peak is None else self.peak.most(now)


@contextlib.asynccontextmanager
async def _sampled(child: Child, phase: Phase, period: float) -> AsyncIterator[_Peak]:
    peak = _Peak(child, period)
    task = asyncio.create_task(peak.run())
    start = time.monotonic()
    try:
        yield peak
    finally:
        phase.seconds = time.monotonic() - start
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        phase.peak = peak.peak


# ---------------------------------------------------------------------------- cycles


class _Cycler:
    """One worker's connection and its cycles."""

    def __init__(self, settings: Settings, token: str, phase: Phase) -> None:
        self.settings = settings
        self.token = token  # where a resuming cycle resumes from: REPLAYED events back
        self.phase = phase
        self.channel = self._channel()

    def _channel(self) -> Channel:
        return Channel(self.settings.host, self.settings.port)

    def renew(self) -> None:
        self.channel.close()
        self.channel = self._channel()

    async def cycle(self, id: int, ending: str) -> None:
        """One subscription with ``id``, ended the ``ending`` way."""
        try:
            async with asyncio.timeout(WAIT):
                await getattr(self, f"_{ending}")(id)
            self.phase.outcomes[ending] += 1
        except Exception as exc:
            self.phase.errors.append(f"{ending} {id}: {exc!r}")

    def _open(self) -> Stream[Request, Response]:
        return self.channel.request(
            "/longlived.Longlived/Subscribe", Cardinality.UNARY_STREAM, Request, Response
        )

    async def _unsubscribe(self, id: int) -> None:
        async with self._open() as stream:
            await stream.send_message(Request(id=id), end=True)
            await stream.recv_initial_metadata()  # registered
            await LonglivedStub(self.channel).unsubscribe(Request(id=id))
            assert await stream.recv_message() is None  # ended, with OK (else it raises)

    async def _cancel(self, id: int) -> None:
        async with self._open() as stream:
            await stream.send_message(Request(id=id), end=True)
            await stream.recv_initial_metadata()
            await stream.cancel()

    async def _replace(self, id: int) -> None:
        async with self._open() as first:
            await first.send_message(Request(id=id), end=True)
            await first.recv_initial_metadata()
            async with self._open() as second:
                await second.send_message(Request(id=id), end=True)
                await second.recv_initial_metadata()
                assert await first.recv_message() is None  # replaced: ended with OK
                await second.cancel()

    async def _resume(self, id: int) -> None:
        async with self._open() as stream:
            await stream.send_message(Request(id=id, resume_token=self.token), end=True)
            for _ in range(REPLAYED):
                assert await stream.recv_message() is not None
            await stream.cancel()

    async def _disconnect(self, id: int) -> None:
        stream = self._open()  # never exited: its connection is closed under it instead
        await stream.__aenter__()
        await stream.send_message(Request(id=id), end=True)
        await stream.recv_initial_metadata()
        self.renew()

    async def _refused(self, id: int) -> None:
        async with self._open() as stream:
            await stream.send_message(Request(id=-id - 1), end=True)
            status = None
            try:
                await stream.recv_initial_metadata()
                await stream.recv_message()
            except GRPCError as exc:
                status = exc.status
            if status is not Status.INVALID_ARGUMENT:
                raise AssertionError(f"a negative id got {status}, not INVALID_ARGUMENT")


async def churn(
    settings: Settings,
    token: str,
    phase: Phase,
    *,
    count: int,
    workers: int,
    seed: int,
    midway: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """``count`` cycles over ``workers`` connections; the worker whose cycle number is a
    multiple of 500 renews its connection after it (besides the ``disconnect`` endings).
    The worker that takes cycle ``count // 2`` awaits ``midway()`` first (a sample while
    every worker is connected: a short phase may end before the periodic one)."""
    rng = random.Random(seed)
    plan = iter([(n + 1, rng.choice(ENDINGS)) for n in range(count)])

    async def work(cycler: _Cycler) -> None:
        try:
            for id, ending in plan:  # shared: every worker takes the next one
                if id == count // 2 and midway is not None:
                    await midway()
                await cycler.cycle(id, ending)
                if id % 500 == 0:
                    cycler.renew()
        finally:
            cycler.channel.close()

    async with asyncio.TaskGroup() as tasks:
        for _ in range(workers):
            tasks.create_task(work(_Cycler(settings, token, phase)))
    phase.count = count


# ---------------------------------------------------------------------------- stream


def _stream_settings(settings: Settings) -> Settings:
    return settings.model_copy(
        update={
            "backoff": BackoffSettings(initial=0.05, max=0.5, multiplier=1.6, jitter=0.2),
            "heartbeat": HeartbeatSettings(interval=0.5, misses=4),
            "connect_timeout": 5.0,
        }
    )


async def _follow(client: ResilientClient, events: int, phase: Phase) -> None:
    """Read until number ``events - 1``; count what is missing, repeated or reordered."""
    expected = 0
    while expected < events:
        try:
            async for response in client:
                n = int(response.data.partition(":")[0])
                if n != expected:
                    kind = "gap" if n > expected else "repeat"
                    phase.errors.append(f"client {client.id}: {kind}, {n} after {expected - 1}")
                expected = max(expected, n + 1)
                phase.outcomes["delivered"] += 1
                if expected >= events:
                    return
            phase.errors.append(f"client {client.id}: the stream ended at {expected}")
            return
        except ResumeExpired as exc:
            phase.errors.append(f"client {client.id}: RESET ({exc.reason})")


async def stream(
    child: Child, settings: Settings, phase: Phase, *, events: int, rate: float, size: int,
    clients: int,
) -> None:  # fmt: skip
    """``events`` numbered events at ``rate``/s to ``clients`` resilient subscribers."""
    follow = _stream_settings(settings)
    async with contextlib.AsyncExitStack() as stack:
        subs = [
            await stack.enter_async_context(ResilientClient(id, settings=follow, topics=[TOPIC]))
            for id in range(clients)
        ]
        async with asyncio.TaskGroup() as tasks:
            readers = [tasks.create_task(_follow(sub, events, phase)) for sub in subs]
            async with asyncio.timeout(WAIT):
                for sub in subs:
                    await sub.connected.wait()
            bound = WAIT + events / rate * 2
            async with asyncio.timeout(bound):
                await child.ask("stream", events=events, rate=rate, size=size, topic=TOPIC)
                await asyncio.gather(*readers)
        phase.outcomes["reconnects"] = sum(sub.connections - 1 for sub in subs)
    phase.count = events


# ---------------------------------------------------------------------------- a run


async def soak(
    *,
    cycles: int = 100_000,
    events: int = 604_800,
    rate: float = 5_000.0,
    size: int = 100,
    clients: int = 2,
    workers: int = 32,
    history: int = 100_000,
    rss_slack_kb: int = 8_192,
    objects_slack: int = 1_000,
    period: float = 2.0,
    warm_up: int = 2_000,
    seed: int = 1,
) -> Soak:
    """One soak run; see the module docstring. ``warm_up`` cycles come first."""
    options: dict[str, object] = {
        "replay": ReplaySettings(size=history).model_dump(),
        "queue": QueueSettings(size=1024).model_dump(),
    }
    async with server(**options) as (child, settings):
        initial = await sample(child)
        async with asyncio.timeout(WAIT):
            await child.ask("publish", count=history, size=size, topic="fill")
        warm = Phase("warm-up")
        token = await _recent(child)
        await churn(settings, token, warm, count=warm_up, workers=workers, seed=seed)
        await stream(child, settings, warm, events=min(2_000, events), rate=rate, size=size,
                     clients=clients)  # fmt: skip
        baseline = await settle(child, initial)
        run = Soak(baseline, rss_slack_kb=rss_slack_kb, objects_slack=objects_slack)
        if warm.errors:
            run.phases.append(warm)
        cycled = Phase("cycles")
        token = await _recent(child)
        async with _sampled(child, cycled, period) as peak:
            await churn(settings, token, cycled, count=cycles, workers=workers, seed=seed + 1,
                        midway=peak.take)  # fmt: skip
        cycled.after = await _settled(child, run.baseline)
        run.phases.append(cycled)
        feed = Phase("stream")
        async with _sampled(child, feed, period):
            await stream(child, settings, feed, events=events, rate=rate, size=size,
                         clients=clients)  # fmt: skip
        feed.after = await _settled(child, run.baseline)
        run.phases.append(feed)
        return run


async def _recent(child: Child) -> str:
    """A token ``REPLAYED`` events behind the server's head."""
    async with asyncio.timeout(WAIT):
        head = str((await child.ask("sample"))["head"])
    epoch, _, seq = head.partition(":")
    return f"{epoch}:{int(seq) - REPLAYED}"


async def _settled(child: Child, baseline: Resources) -> Resources:
    """The sample once released (or, if it never is, the last one: ``problems`` says so)."""
    try:
        return await settle(child, baseline)
    except AssertionError:
        return await sample(child)
