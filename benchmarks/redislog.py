"""The shared log on Redis beside the in-memory one, in the same run.

For each log, trial after trial: a fresh ``longlived serve --source none`` process (with
``--redis.url`` for the Redis log, against a redis-server this script starts on a free
loopback port), ``--subscribers`` grpclib subscriptions in this process, and ``--events``
events published through the Publish RPC (``--inflight`` calls at a time, the way several
producers would). Each event carries the ``time.monotonic_ns()`` of its publish; the clock
is system-wide, so the subscriber side measures publish-to-receive latency across processes.

Reported per log, medians over ``--reps`` trials: delivered messages per second (all
subscribers together, from the first publish to the last delivery) and latency p50/p99;
then Redis / in-memory ratios. Run: ``.venv/bin/python benchmarks/redislog.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import socket
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

from grpclib.client import Channel
from grpclib.const import Cardinality

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from longlived import Request, Response  # noqa: E402
from longlived._proto.longlived import PublishReply, PublishRequest  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def process(*argv: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """A child process, killed on the way out."""
    child = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        yield child
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()


async def until_serving(port: int, timeout: float = 20.0) -> None:
    """Wait until something accepts connections on ``port``."""
    async with asyncio.timeout(timeout):
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            await writer.wait_closed()
            return


async def subscriber(channel: Channel, id: int, events: int, latencies: list[int]) -> float:
    """Receive ``events`` events; the monotonic time of the last one."""
    async with channel.request(
        "/longlived.Longlived/Subscribe", Cardinality.UNARY_STREAM, Request, Response
    ) as stream:
        await stream.send_message(Request(id=id, accept_control=True), end=True)
        got = 0
        while got < events:
            message = await stream.recv_message()
            assert message is not None, "the stream ended"
            if message.kind != 0:  # the position at the start
                continue
            latencies.append(time.monotonic_ns() - int(message.data))
            got += 1
        done = time.monotonic()
        await stream.cancel()
    return done


async def publisher(channel: Channel, events: int, inflight: int) -> float:
    """Publish ``events`` events, ``inflight`` calls at a time; when publishing began."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for n in range(events):
        queue.put_nowait(n)

    async def worker() -> None:
        while not queue.empty():
            queue.get_nowait()
            async with channel.request(
                "/longlived.Longlived/Publish", Cardinality.UNARY_UNARY, PublishRequest,
                PublishReply,
            ) as call:  # fmt: skip
                await call.send_message(PublishRequest(data=str(time.monotonic_ns())), end=True)
                await call.recv_message()

    began = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(inflight)))
    return began


async def trial(args: argparse.Namespace, redis_url: str | None) -> tuple[float, float, float]:
    """One trial: (delivered msgs/s, p50 ms, p99 ms)."""
    port = free_port()
    argv = [sys.executable, "-m", "longlived", "serve", "--address", f"127.0.0.1:{port}",
            "--source", "none", "--queue.size", str(max(args.events, 1024)),
            "--log-level", "WARNING"]  # fmt: skip
    if redis_url is not None:
        argv += ["--redis.url", redis_url, "--redis.stream", f"bench-{time.monotonic_ns()}"]
    async with process(*argv):
        await until_serving(port)
        channels = [Channel("127.0.0.1", port) for _ in range(args.connections)]
        try:
            latencies: list[int] = []
            subs = [
                asyncio.ensure_future(
                    subscriber(channels[id % len(channels)], id, args.events, latencies)
                )
                for id in range(args.subscribers)
            ]
            await asyncio.sleep(1.0)  # the subscriptions open (a benchmark, not a test)
            began = await publisher(channels[0], args.events, args.inflight)
            async with asyncio.timeout(args.timeout):
                finished = max(await asyncio.gather(*subs))
        finally:
            for channel in channels:
                channel.close()
    rate = args.subscribers * args.events / (finished - began)
    cuts = statistics.quantiles(latencies, n=100)
    return rate, cuts[49] / 1e6, cuts[98] / 1e6


async def main(args: argparse.Namespace) -> None:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed")
    port = free_port()
    redis_argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                  "--appendonly", "no"]  # fmt: skip
    async with process(*redis_argv):
        await until_serving(port)
        url = f"redis://127.0.0.1:{port}/0"
        results: dict[str, list[tuple[float, float, float]]] = {"memory": [], "redis": []}
        for rep in range(args.reps):
            for name in ("memory", "redis") if rep % 2 == 0 else ("redis", "memory"):
                result = await trial(args, url if name == "redis" else None)
                results[name].append(result)
                print(f"rep {rep + 1} {name}: {result[0]:,.0f} msg/s, "
                      f"p50 {result[1]:.2f} ms, p99 {result[2]:.2f} ms", flush=True)  # fmt: skip
    medians = {
        name: tuple(statistics.median(r[i] for r in runs) for i in range(3))
        for name, runs in results.items()
    }
    print()
    print(f"N={args.subscribers} subscribers on {args.connections} connections, "
          f"E={args.events} events via Publish ({args.inflight} in flight), "
          f"medians of {args.reps}, cpus={os.cpu_count()}")  # fmt: skip
    print("| log | delivered msg/s | p50 ms | p99 ms |")
    print("|---|---|---|---|")
    for name, (rate, p50, p99) in medians.items():
        print(f"| {name} | {rate:,.0f} | {p50:.2f} | {p99:.2f} |")
    memory, redis = medians["memory"], medians["redis"]
    print(f"| redis / memory | {redis[0] / memory[0]:.2f} | {redis[1] / memory[1]:.2f} "
          f"| {redis[2] / memory[2]:.2f} |")  # fmt: skip


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subscribers", type=int, default=100)
    parser.add_argument("--connections", type=int, default=10)
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--inflight", type=int, default=16)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=120.0)
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
