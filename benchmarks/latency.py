"""Workload ``latency``: publish-to-receive times at a steady rate, below saturation.

N subscribers (one connection each) and events at a fixed rate: N = 100 at 200 events/s
and N = 1000 at 20 events/s, both 20,000 deliveries per second. The server stamps each
event with ``time.monotonic_ns()`` as it publishes it (into the payload, so every server
sends the same bytes); the load generator notes the arrival of every delivery. Reported:
p50, p99 and max over all deliveries of a trial, the p99 ratio against the peers within
each round, and how busy the load generator was: its own processing of a burst of N
messages is part of every arrival time, so a load generator near 100 % busy would be
measuring itself. The driver's own lateness (how far behind schedule it published, when
the loop was busy) is recorded too.
"""

from __future__ import annotations

import argparse
from typing import Any

from benchmarks._bench import SERVERS, Bench, Cell, extra_servers
from benchmarks._common import cpu_busy, others

__all__ = ["cells", "trial"]


def cells(args: argparse.Namespace) -> list[Cell]:
    servers = [*SERVERS, *extra_servers(args)]
    out = []
    for n, rate in args.latency_settings:
        events = max(int(rate * args.latency_seconds), 10)
        params = {"n": n, "rate": rate, "events": events, "seconds": args.latency_seconds}
        out.append(Cell("latency", f"N={n} @ {rate:g}/s", params, servers))
    return out


def trial(bench: Bench, cell: Cell, server: str, process: Any) -> dict[str, Any]:
    """One trial on ``process`` (a server process kept for the workload)."""
    wait, lg = bench.wait, bench.loadgen
    n, rate, events = cell.params["n"], cell.params["rate"], cell.params["events"]
    port, _ = process.ask("started", wait, "start", bench.spec(server, queue=events))
    lg.ask("ready", wait, "open", port, n, 1, bench.args.loadgen)
    process.ask("subscribed", wait, "wait", n)
    lg.ask("reading", wait, "read", "latency", events)
    server_cpu_id, loadgen_cpu_id = bench.args.server_cpu, bench.args.loadgen_cpu
    busy0 = cpu_busy(server_cpu_id), cpu_busy(loadgen_cpu_id)
    published = process.ask(
        "published", wait + events / rate, "paced", rate, events, bench.args.size
    )
    cpu0, t0, _, late_ms = published
    (result,) = lg.expect("done", wait)
    busy1 = cpu_busy(server_cpu_id), cpu_busy(loadgen_cpu_id)
    (cpu1,) = process.ask("cpu", wait, "cpu")
    lg.ask("closed", wait, "close")
    process.ask("stopped", wait, "stop")
    if result["errors"]:
        raise RuntimeError(f"latency {cell.label} on {server}: " + "; ".join(result["errors"]))
    seconds = result["t_last"] - t0
    latency = result["latency_ms"]
    return {
        "deliveries": latency["count"],
        "p50_ms": latency["p50"],
        "p90_ms": latency["p90"],
        "p99_ms": latency["p99"],
        "p999_ms": latency["p999"],
        "max_ms": latency["max"],
        "cdf_ms": latency["cdf"],
        "driver_late_ms": late_ms,
        "seconds": seconds,
        "server_busy": (cpu1 - cpu0) / seconds,
        "loadgen_busy": result["cpu"] / seconds,
        "server_cpu_others": others(busy0[0], busy1[0], cpu1 - cpu0, seconds),
        "loadgen_cpu_others": others(busy0[1], busy1[1], result["cpu"], seconds),
    }
