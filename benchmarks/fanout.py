"""Workload ``fanout``: N subscribers, E events as fast as the server goes, all delivered.

One connection per subscriber. The driver publishes events 1..E on the server's own loop,
``per_turn`` of them per loop turn (``await asyncio.sleep(0)`` after each turn, for every
server alike): 1 is the ``one`` variant (every write carries one message: a subscriber
that is current), 10 the ``burst`` variant (a server may coalesce several queued messages
into one write, as a subscriber that is behind allows). The score is the **server's CPU
time per delivered message** (the whole process, all threads, from the first publish until
the last message arrived); delivered messages per second and how busy each process was
(CPU seconds / wall seconds) are reported beside it. Every stream must deliver exactly E
messages, the last with seq E, or the run stops.
"""

from __future__ import annotations

import argparse
from typing import Any

from benchmarks._bench import SERVERS, Bench, Cell, extra_servers
from benchmarks._common import cpu_busy, others

__all__ = ["VARIANTS", "cells", "trial", "warm_up"]

VARIANTS = {"one": 1, "burst": 10}
"""Events published per loop turn."""


def cells(args: argparse.Namespace) -> list[Cell]:
    servers = [*SERVERS, *extra_servers(args)]
    out = []
    for variant in args.fanout_variants:
        counts = args.fanout_n if variant == "one" else args.burst_n
        for n in counts:
            events = max(args.fanout_messages // n, args.fanout_min_events)
            params = {"variant": variant, "per_turn": VARIANTS[variant], "n": n, "events": events}
            out.append(Cell("fanout", f"{variant} N={n}", params, servers))
    return out


def trial(bench: Bench, cell: Cell, server: str, process: Any) -> dict[str, Any]:
    """One trial on ``process`` (a server process kept for the workload)."""
    wait, lg = bench.wait, bench.loadgen
    n, events, per_turn = cell.params["n"], cell.params["events"], cell.params["per_turn"]
    port, _ = process.ask("started", wait, "start", bench.spec(server, queue=events))
    lg.ask("ready", wait, "open", port, n, 1, bench.args.loadgen)
    process.ask("subscribed", wait, "wait", n)
    lg.ask("reading", wait, "read", "count", events)
    server_cpu_id, loadgen_cpu_id = bench.args.server_cpu, bench.args.loadgen_cpu
    busy0 = cpu_busy(server_cpu_id), cpu_busy(loadgen_cpu_id)
    cpu0, t0, t1 = process.ask("published", wait, "fanout", events, per_turn, bench.args.size)
    (result,) = lg.expect("done", wait)
    busy1 = cpu_busy(server_cpu_id), cpu_busy(loadgen_cpu_id)
    (cpu1,) = process.ask("cpu", wait, "cpu")
    lg.ask("closed", wait, "close")
    process.ask("stopped", wait, "stop")
    if result["errors"]:
        raise RuntimeError(f"fanout {cell.label} on {server}: " + "; ".join(result["errors"]))
    messages = n * events
    seconds = result["t_last"] - t0
    server_cpu = cpu1 - cpu0
    return {
        "messages": messages,
        "seconds": seconds,
        "publish_seconds": t1 - t0,
        "server_cpu": server_cpu,
        "loadgen_cpu": result["cpu"],
        "server_us_per_msg": server_cpu / messages * 1e6,
        "loadgen_us_per_msg": result["cpu"] / messages * 1e6,
        "msgs_per_s": messages / seconds,
        "server_busy": server_cpu / seconds,
        "loadgen_busy": result["cpu"] / seconds,
        "paced": (t1 - t0) / seconds,
        "last_bytes": result["last_bytes"],
        "server_cpu_others": others(busy0[0], busy1[0], server_cpu, seconds),
        "loadgen_cpu_others": others(busy0[1], busy1[1], result["cpu"], seconds),
    }


def warm_up(bench: Bench, server: str, process: Any) -> None:
    """An untimed small trial, so a fresh server process pays its first-use costs here."""
    params = {"variant": "one", "per_turn": 1, "n": 10, "events": 200}
    trial(bench, Cell("fanout", "warm-up", params, [server]), server, process)


if __name__ == "__main__":  # the first harness's command: `python benchmarks/fanout.py --quick`
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.run import main

    sys.exit(main(["--only", "fanout", *sys.argv[1:]]))
