"""The processes of the soak, load and fuzz runs: ``python -m tests.prove.roles server|loadgen``.

Both read commands on stdin, one JSON object a line (``{"op": ..., "id": n, ...}``, sent by
``Child.ask``), and answer each with one JSON line on stdout carrying ``"re": n``; commands
run concurrently, so a ``sample`` is answered while a ``stream`` is still under way. A role
whose stdin closes (the run ended or died) stops.

- ``server``: a ``SubscriptionManager`` with no event source of its own, on the settings
  given as JSON (``--settings``) over the defaults; it prints ``ready`` once it listens.
  ``sample`` answers its asyncio task count (after a ``gc.collect()``; commands in flight
  are not counted), the objects the garbage collector tracks, subscribers and
  connections: the run reads RSS and open file descriptors from ``/proc`` itself;
  ``census`` the most numerous kinds of object (to find what a leak is made of).
  ``publish`` fills the history, ``stream`` publishes a numbered sequence at a fixed
  rate, ``tick`` / ``untick`` a numbered sequence for a canary, ``broadcast`` one event
  to everyone, stamped with its ``time.monotonic()``.
- ``loadgen``: ``--streams`` ``Subscribe`` streams over ``--connections`` connections
  (grpclib, many streams per connection). ``open`` opens them all and answers how long
  that took; ``receive`` waits until every stream has broadcast ``k`` and answers each
  delivery's latency (the arrival's ``time.monotonic()`` minus the stamp: one clock for
  the whole machine on Linux); ``close`` cancels them.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gc
import json
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from grpclib.client import Channel, Stream
from grpclib.const import Cardinality

from longlived import Request, Response, Settings, SubscriptionManager

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, object]]]

COMMAND = "prove-command"
"""The name of the tasks answering commands (not counted as the server's own)."""


def emit(record: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


async def commands(handlers: dict[str, Handler], stop: asyncio.Event) -> None:
    """Answer the commands on stdin until it closes or ``stop`` is set."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 24)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    async with asyncio.TaskGroup() as tasks:
        while not stop.is_set():
            line = await reader.readline()
            if not line:
                break
            command = json.loads(line)
            tasks.create_task(_answer(handlers, command), name=COMMAND)
    stop.set()


async def _answer(handlers: dict[str, Handler], command: dict[str, Any]) -> None:
    try:
        answer = await handlers[command["op"]](command)
    except Exception as exc:  # answered, so the run fails with the reason, not a timeout
        answer = {"error": repr(exc)}
    emit({**answer, "re": command["id"]})


# ---------------------------------------------------------------------------- server


class Server:
    """The server under test and the commands it answers."""

    def __init__(self, settings: Settings) -> None:
        self.manager = SubscriptionManager(settings)
        self.ticker: asyncio.Task[int] | None = None

    def handlers(self) -> dict[str, Handler]:
        return {
            "sample": self.sample,
            "census": self.census,
            "publish": self.publish,
            "stream": self.stream,
            "tick": self.tick,
            "untick": self.untick,
            "broadcast": self.broadcast,
        }

    async def sample(self, _: dict[str, Any]) -> dict[str, object]:
        gc.collect()
        server = self.manager._server
        return {
            "tasks": sum(task.get_name() != COMMAND for task in asyncio.all_tasks()),
            "objects": len(gc.get_objects()),
            "subscribers": len(self.manager.hub),
            "streams": self.manager.hub.open_streams,
            "connections": server.connections if server is not None else 0,
            "head": self.manager.hub.head.token,
        }

    async def census(self, command: dict[str, Any]) -> dict[str, object]:
        """The ``top`` most numerous kinds of object the garbage collector tracks."""
        gc.collect()
        kinds = collections.Counter(type(o).__qualname__ for o in gc.get_objects())
        return {"census": dict(kinds.most_common(command.get("top", 30)))}

    async def publish(self, command: dict[str, Any]) -> dict[str, object]:
        """``count`` events of ``size`` bytes on ``topic``, as fast as the loop goes."""
        pad = "x" * command.get("size", 0)
        for n in range(command["count"]):
            self.manager.publish(f"{n}:{pad}", topic=command.get("topic", ""))
            if n % 256 == 255:
                await asyncio.sleep(0)  # let the writers run
        return {"head": self.manager.hub.head.token}

    async def stream(self, command: dict[str, Any]) -> dict[str, object]:
        """``events`` numbered events (``n:padding``) on ``topic`` at ``rate`` per second."""
        loop = asyncio.get_running_loop()
        events, rate, pad = command["events"], command["rate"], "x" * command.get("size", 0)
        topic = command.get("topic", "")
        start = loop.time()
        n = 0
        while n < events:
            due = min(events, int((loop.time() - start) * rate) + 1)
            for n in range(n, due):  # noqa: B020  # n carries on from where it was
                self.manager.publish(f"{n}:{pad}", topic=topic)
            n = due
            await asyncio.sleep(0.005)  # the pace, not a synchronisation
        return {"events": events, "seconds": loop.time() - start}

    async def tick(self, command: dict[str, Any]) -> dict[str, object]:
        """Publish ``0, 1, 2, ...`` on ``topic`` every ``interval`` seconds until ``untick``."""
        assert self.ticker is None, "already ticking"
        self.ticker = asyncio.create_task(self._tick(command["topic"], command["interval"]))
        return {"ticking": True}

    async def _tick(self, topic: str, interval: float) -> int:
        n = 0
        with contextlib.suppress(asyncio.CancelledError):
            while True:
                self.manager.publish(str(n), topic=topic)
                n += 1
                await asyncio.sleep(interval)
        return n

    async def untick(self, _: dict[str, Any]) -> dict[str, object]:
        assert self.ticker is not None, "not ticking"
        self.ticker.cancel()
        ticked = await self.ticker
        self.ticker = None
        return {"ticked": ticked}

    async def broadcast(self, command: dict[str, Any]) -> dict[str, object]:
        """One event to every subscriber: ``k:stamp``."""
        position = self.manager.publish(f"{command['k']}:{time.monotonic()!r}")
        return {"seq": position.seq}


async def serve(settings: Settings) -> None:
    server = Server(settings)
    await server.manager.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    emit({"ready": server.manager.address})
    try:
        async with asyncio.TaskGroup() as tasks:
            reading = tasks.create_task(commands(server.handlers(), stop))
            await stop.wait()
            reading.cancel()
    finally:
        await server.manager.close()


# --------------------------------------------------------------------------- loadgen


class LoadGen:
    """``streams`` subscribers over ``connections`` connections, and what they received."""

    def __init__(self, address: str, streams: int, connections: int, first_id: int) -> None:
        self.address = address
        self.connections = connections
        self.channels: list[Channel] = []  # made in open(): a channel belongs to its loop
        self.ids = range(first_id, first_id + streams)
        self.stack = contextlib.AsyncExitStack()
        self.streams: list[Stream[Request, Response]] = []
        self.latencies: dict[int, list[float]] = {}
        self.changed = asyncio.Event()
        self.readers: list[asyncio.Task[None]] = []

    def handlers(self) -> dict[str, Handler]:
        return {"open": self.open, "receive": self.receive, "close": self.close}

    async def open(self, _: dict[str, Any]) -> dict[str, object]:
        """Open every stream; the seconds from the first request to the last stream's headers.

        The first stream of each connection waits for its headers before the others are
        sent, so the server's SETTINGS (its raised stream limit) are acknowledged first.
        """
        start = time.monotonic()
        host, port = self.address.rsplit(":", 1)
        self.channels = [Channel(host, int(port)) for _ in range(self.connections)]
        count = len(self.channels)
        for n, id in enumerate(self.ids):
            channel = self.channels[n % count]
            request = channel.request(
                "/longlived.Longlived/Subscribe", Cardinality.UNARY_STREAM, Request, Response
            )
            stream = await self.stack.enter_async_context(request)
            await stream.send_message(Request(id=id), end=True)
            if n < count:
                await stream.recv_initial_metadata()
            self.streams.append(stream)
        await asyncio.gather(*(stream.recv_initial_metadata() for stream in self.streams[count:]))
        seconds = time.monotonic() - start
        self.readers = [asyncio.create_task(self._read(stream)) for stream in self.streams]
        return {"opened": len(self.streams), "seconds": seconds}

    async def _read(self, stream: Stream[Request, Response]) -> None:
        while (message := await stream.recv_message()) is not None:
            arrived = time.monotonic()
            k, _, stamp = message.data.partition(":")
            self.latencies.setdefault(int(k), []).append(arrived - float(stamp))
            self.changed.set()

    async def receive(self, command: dict[str, Any]) -> dict[str, object]:
        """Wait until every stream has broadcast ``k``; the latency of each delivery."""
        k = command["k"]
        while len(self.latencies.get(k, ())) < len(self.streams):
            failed = [reader for reader in self.readers if reader.done()]
            if failed:  # a stream ended or failed: the run must hear of it, not wait
                raise AssertionError(f"{len(failed)} streams ended: {failed[0]!r}")
            self.changed.clear()
            await self.changed.wait()
        return {"latencies": self.latencies.pop(k)}

    async def close(self, _: dict[str, Any]) -> dict[str, object]:
        for reader in self.readers:
            reader.cancel()
        await asyncio.gather(*self.readers, return_exceptions=True)
        for stream in self.streams:
            await stream.cancel()
        await self.stack.aclose()
        for channel in self.channels:
            channel.close()
        return {"closed": len(self.streams)}


async def generate(load: LoadGen) -> None:
    stop = asyncio.Event()
    emit({"ready": len(load.ids)})
    await commands(load.handlers(), stop)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.prove.roles")
    parser.add_argument("role", choices=["server", "loadgen"])
    parser.add_argument("--address", required=True)
    parser.add_argument("--settings", default="{}", help="server: JSON over the defaults")
    parser.add_argument("--streams", type=int, default=1)
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--first-id", type=int, default=0)
    args = parser.parse_args()
    if args.role == "server":
        options = json.loads(args.settings)
        settings = Settings(_env_file=None, address=args.address, source="none", **options)
        asyncio.run(serve(settings))
    else:
        load = LoadGen(args.address, args.streams, args.connections, args.first_id)
        asyncio.run(generate(load))


if __name__ == "__main__":
    main()
