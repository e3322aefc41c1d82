"""Workload ``idle``: many open streams and nothing to send; what they cost the server.

N streams (1,000 and 10,000), each on its own connection or 100 per connection. A fresh
server process per trial (so earlier trials' freed memory cannot hide the cost); its
resident memory (``VmRSS``) is read once it is listening and again once every stream has
its headers and the server counts N subscriptions: the difference / N is the **KiB per
stream** (for own connections it includes the connection's cost). The streams are then
held while the server's CPU is sampled: the largest N for ``--hold`` seconds (60 in the
full run), smaller ones for ``--hold-small``. Then one final event is published and every
stream must receive it; the time from publish to the last arrival is reported too.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from benchmarks._bench import SERVERS, UVLOOP, Bench, Cell
from benchmarks._common import listen_overflows, rss_kb

__all__ = ["cells", "trial"]

FD_MARGIN = 200
"""File descriptors a process needs besides one per connection."""


def cells(args: argparse.Namespace) -> list[Cell]:
    servers = [*SERVERS, UVLOOP] if args.uvloop else list(SERVERS)
    out = []
    for n in args.idle_n:
        hold = args.hold if n == max(args.idle_n) else args.hold_small
        for per_connection in args.idle_per_connection:
            if per_connection > n:
                continue
            params = {"n": n, "per_connection": per_connection, "hold": hold}
            how = "own connections" if per_connection == 1 else f"{per_connection} per connection"
            out.append(Cell("idle", f"{n:,} streams, {how}", params, servers))
    return out


def trial(bench: Bench, cell: Cell, server: str, process: Any) -> dict[str, Any]:
    """One trial on a fresh server process (``process`` is ignored)."""
    wait, lg = bench.wait, bench.loadgen
    n, per_connection, hold = cell.params["n"], cell.params["per_connection"], cell.params["hold"]
    connections = -(-n // per_connection)
    fresh = bench.server_process(server)
    try:
        for name, setup in (("server", fresh.setup), ("loadgen", lg.setup)):
            if setup["nofile"] < connections + FD_MARGIN:
                return {
                    "skipped": f"{name} may open {setup['nofile']} files; "
                    f"{connections + FD_MARGIN} needed (raise ulimit -n)"
                }
        port, _ = fresh.ask("started", wait, "start", bench.spec(server))
        (before,) = fresh.ask("rss", wait, "rss")
        loadgen_before = rss_kb(lg.pid)
        overflows = listen_overflows()
        (open_seconds,) = lg.ask("ready", wait, "open", port, n, per_connection, bench.args.loadgen)
        (count,) = fresh.ask("subscribed", wait, "wait", n)
        (after,) = fresh.ask("rss", wait, "rss")
        loadgen_after = rss_kb(lg.pid)
        overflows_after = listen_overflows()
        (cpu0,) = fresh.ask("cpu", wait, "cpu")
        time.sleep(hold)  # the orchestrator idles; the streams stay open
        (cpu1,) = fresh.ask("cpu", wait, "cpu")
        lg.ask("reading", wait, "read", "final", 1)
        (t_published,) = fresh.ask("published", wait, "one", 1, bench.args.size)
        (result,) = lg.expect("done", wait)
        lg.ask("closed", wait, "close")
        fresh.ask("stopped", wait, "stop")
    finally:
        fresh.close()
    return {
        "subscribed": count,
        "kib_per_stream": (after - before) / n,
        "rss_before_kib": before,
        "rss_after_kib": after,
        "loadgen_kib_per_stream": (loadgen_after - loadgen_before) / n,
        "open_seconds": open_seconds,
        "listen_overflows": None
        if overflows is None or overflows_after is None
        else overflows_after - overflows,
        "hold_seconds": hold,
        "hold_cpu_percent": (cpu1 - cpu0) / hold * 100 if hold else None,
        "final_received": result["received"],
        "final_all": result["received"] == n and not result["errors"],
        "final_ms": (result["t_last"] - t_published) * 1e3,
        "errors": result["errors"],
    }
