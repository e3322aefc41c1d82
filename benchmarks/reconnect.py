"""Workload ``reconnect``: a server killed under 1,000 clients and started again.

N clients subscribe (each its own connection); the server publishes numbered events at
``--reconnect-rate`` per second. Once every client has received one, and after a steady
second, the server process is killed (SIGKILL, as a crash) and a fresh process is started
on the same port. From the moment the new server listens (``ready``) the clock runs until
every client has received an event on a new stream: **seconds until all receive again**.
The new server publishes on (numbers restart in generation 1); a second later it stops, and
each client's tally against everything published gives the **events lost**.

- ``longlived``: ``ResilientClient`` resuming with its token from the in-memory log. A
  restart loses that log (its epoch changes), so each client gets one RESET and goes on
  live: the events it missed are lost but *announced* (``lost_unannounced`` must be 0).
- ``longlived+redis``: the same on a Redis log (a redis-server of the run's own): tokens
  survive the restart and resume is loss-free (``lost`` must be 0).
- ``grpc.aio`` and ``grpclib``: no resume; a grpc.aio client with the same backoff
  resubscribes live. Their reconnect time is reported; lost is not applicable.

The target: all clients receiving again within max(5 s, one backoff delay) of ``ready``;
the delay is the one a client sleeps through ``ready`` (the gRPC connection backoff:
1 s, x1.6, ±20 % jitter), computed from how long the server was down.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from benchmarks._bench import Bench, Cell
from benchmarks._common import listen_overflows

__all__ = ["SERVERS", "backoff_bound", "cells", "trial"]

SERVERS = ("longlived", "longlived+redis", "grpc.aio", "grpclib")
STEADY = 1.0
"""Seconds of publishing before the kill, and after every client is back."""


def cells(args: argparse.Namespace) -> list[Cell]:
    servers = [s for s in SERVERS if s != "longlived+redis" or args.redis]
    params = {"n": args.reconnect_n, "rate": args.reconnect_rate, "within": args.reconnect_timeout}
    return [Cell("reconnect", f"{args.reconnect_n:,} clients", params, servers)]


def backoff_bound(
    down: float,
    *,
    initial: float = 1.0,
    multiplier: float = 1.6,
    jitter: float = 0.2,
    floor: float = 5.0,
) -> float:
    """max(``floor``, the longest backoff delay a client can be sleeping ``down`` s in)."""
    elapsed, delay = 0.0, initial
    while elapsed + delay <= down:
        elapsed += delay
        delay *= multiplier
    return max(floor, delay * (1 + jitter))


def trial(bench: Bench, cell: Cell, server: str, process: Any) -> dict[str, Any]:
    """One trial: its own server processes (``process`` is ignored), killed and restarted."""
    wait, lg, size = bench.wait, bench.loadgen, bench.args.size
    n, rate = cell.params["n"], cell.params["rate"]
    spec = bench.spec(server, queue=1024, redis_stream=f"bench-{time.monotonic_ns()}")
    resume = server.startswith("longlived")
    first = bench.server_process(server)
    second = None
    try:
        port, _ = first.ask("started", wait, "start", spec)
        (open_seconds,) = lg.ask("rc_opened", wait, "rc", "open", port, n, resume)
        first.ask("subscribed", wait, "wait", n)
        first.ask("streaming", wait, "stream", rate, 0, size)
        _, subscribed = lg.ask("rc_until", wait, "rc", "until", "received", wait)
        if subscribed < n:
            raise RuntimeError(f"reconnect on {server}: {subscribed} of {n} clients received")
        time.sleep(STEADY)
        (loadgen_cpu0,) = lg.ask("rc_marked", wait, "rc", "mark")
        overflows = listen_overflows()
        killed = first.kill()
        last0 = int(first.counter.value)  # every event up to it was published
        second = bench.server_process(server)
        _, ready = second.ask("started", wait, "start", {**spec, "port": port})
        (server_cpu0,) = second.ask("cpu", wait, "cpu")
        second.ask("streaming", wait, "stream", rate, 1, size)
        again, back = lg.ask("rc_until", wait, "rc", "until", "again", cell.params["within"])
        (server_cpu1,) = second.ask("cpu", wait, "cpu")
        (loadgen_cpu1,) = lg.ask("rc_cpu", wait, "rc", "cpu")
        span = time.monotonic() - ready
        overflows_after = listen_overflows()
        time.sleep(STEADY)
        (last1,) = second.ask("halted", wait, "halt")
        (tally,) = lg.ask("rc_result", wait, "rc", "finish", last0, last1)
        lg.ask("rc_closed", wait, "rc", "close")
        second.ask("stopped", wait, "stop")
    finally:
        first.close()
        if second is not None:
            second.close()
    down = ready - killed
    seconds = None if again is None else again - ready
    bound = backoff_bound(down)
    dropped = None
    if overflows is not None and overflows_after is not None:
        dropped = overflows_after - overflows
    return {
        **tally,
        "open_seconds": open_seconds,
        "down_seconds": down,
        "again_seconds": seconds,
        "again_clients": back,
        "again_median_seconds": (tally["again_median"] - ready) if tally["again_median"] else None,
        "bound_seconds": bound,
        "within_bound": seconds is not None and seconds <= bound,
        "server_busy": (server_cpu1 - server_cpu0) / span,
        "loadgen_busy": (loadgen_cpu1 - loadgen_cpu0) / (span + down),
        "listen_overflows": dropped,
        "resume": resume,
    }
