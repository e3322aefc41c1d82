"""The processes of a chaos run: ``python -m tests.chaos.roles server|publisher|subscriber``.

- ``server``: a ``SubscriptionManager`` with no event source of its own, on the in-memory
  log or (``--redis URL``) the shared one; it prints ``ready`` once it listens.
- ``publisher``: publishes ``0, 1, 2, ...`` on topic ``seq`` through the Publish RPC, one
  every ``--interval`` seconds, each with the idempotency key ``seq-<n>`` (so retries through
  any fault emit it once); on SIGINT it finishes the publish in flight and prints
  ``published <count>``.
- ``subscriber``: a ``ResilientClient`` with heartbeats; it prints one JSON line per event
  (``{"n": 7}``) and per RESET (``{"reset": "why"}``), flushed at once, so the run can tally
  what reached the app, in order.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys

from longlived import (
    BackoffSettings,
    HeartbeatSettings,
    KeepaliveSettings,
    Publisher,
    PublishSettings,
    QueueSettings,
    RedisSettings,
    ResilientClient,
    ResumeExpired,
    Settings,
    SubscriptionManager,
)

TOPIC = "seq"


def settings_for(
    address: str, *, redis: str | None = None, queue: int = 1024, keepalive: float = 0.5
) -> Settings:
    """What every role of a run uses: fast backoff, heartbeats and keepalive, so a fault is
    noticed within about a second. With ``redis``, the publisher appends to it directly."""
    return Settings(
        publish=PublishSettings(via="redis" if redis else "server"),
        address=address,
        source="none",
        backoff=BackoffSettings(initial=0.05, max=0.5, multiplier=1.6, jitter=0.2),
        heartbeat=HeartbeatSettings(interval=0.2, misses=3),
        keepalive=KeepaliveSettings(time=keepalive, timeout=keepalive),
        queue=QueueSettings(size=queue),
        redis=RedisSettings(url=redis),
        connect_timeout=1.0,
        drain_timeout=1.0,
    )


def emit(record: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


async def serve(settings: Settings) -> None:
    manager = SubscriptionManager(settings)
    await manager.start()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, lambda: asyncio.ensure_future(manager.close()))
    emit({"ready": manager.address})
    await manager.wait_closed()


async def publish(settings: Settings, interval: float, start: int, pad: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, stop.set)
    n = start
    async with Publisher(settings=settings) as publisher:
        while not stop.is_set():
            data = f"{n}:{'x' * pad}" if pad else str(n)
            await publisher.publish(data, topic=TOPIC, idempotency_key=f"seq-{n}")
            n += 1
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await stop.wait()
    emit({"published": n})


async def subscribe(settings: Settings, id: int) -> None:
    async with ResilientClient(id, settings=settings, topics=[TOPIC]) as client:
        while True:
            try:
                async for response in client:
                    emit({"n": int(response.data.partition(":")[0])})
                return
            except ResumeExpired as exc:  # events were lost: the run counts what RESET said
                emit({"reset": exc.reason})


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos.roles")
    parser.add_argument("role", choices=["server", "publisher", "subscriber"])
    parser.add_argument("--address", required=True)
    parser.add_argument("--redis")
    parser.add_argument("--queue", type=int, default=1024)
    parser.add_argument("--keepalive", type=float, default=0.5, help="time and timeout")
    parser.add_argument("--id", type=int, default=1)
    parser.add_argument("--interval", type=float, default=0.01)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--pad", type=int, default=0, help="bytes of padding per event")
    args = parser.parse_args()
    settings = settings_for(
        args.address, redis=args.redis, queue=args.queue, keepalive=args.keepalive
    )
    if args.role == "server":
        asyncio.run(serve(settings))
    elif args.role == "publisher":
        asyncio.run(publish(settings, args.interval, args.start, args.pad))
    else:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(subscribe(settings, args.id))


if __name__ == "__main__":
    main()
