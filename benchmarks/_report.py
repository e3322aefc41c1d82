"""The results as Markdown: the targets first, then one table per workload."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from benchmarks._bench import UVLOOP, Cell, Stat

__all__ = ["markdown"]

OURS = "longlived"
PEERS = ("grpc.aio", "grpclib")


def _show(value: Stat | None, digits: int = 1, unit: str = "") -> str:
    return "-" if value is None else value.show(digits, unit=unit)


def _busy(cell: Cell, server: str) -> str:
    srv, gen = cell.stat(server, "server_busy"), cell.stat(server, "loadgen_busy")
    if srv is None or gen is None:
        return "-"
    return f"{srv.median:.0%} / {gen.median:.0%}"


def _percent(value: Stat | None) -> str:
    return "-" if value is None else f"{value.median:.0%}"


def _skipped(cells: Sequence[Cell]) -> list[str]:
    return [
        f"- {cell.label}, {server}: skipped: {sample['skipped']}"
        for cell in cells
        for server, samples in cell.samples.items()
        for sample in samples[:1]
        if "skipped" in sample
    ]


def _same_bytes(cells: Sequence[Cell]) -> str:
    """Whether every server's last message of a setting had the same size (it must)."""
    sizes: dict[str, set[int]] = {}
    for c in cells:
        for server in c.servers:
            sizes.setdefault(c.label, set()).update(int(v) for v in c.values(server, "last_bytes"))
    seen = sorted(set().union(*sizes.values())) if sizes else []
    if not seen:
        return "Message sizes: not recorded."
    odd = [label for label, found in sizes.items() if len(found) > 1]
    if odd:
        return f"**Servers sent messages of different sizes** in: {', '.join(odd)}."
    return (
        f"Every server sent the same bytes per message in each setting (the last message: "
        f"{seen[0]}-{seen[-1]} bytes, by E)."
    )


GEN_BOUND = 0.85
"""Load-generator busy share from which a figure is marked as measuring the client too."""


CONTENDED = 0.10
"""Share of a pinned CPU other programs took during a trial from which a figure is marked."""


def _gen_bound(cell: Cell, *servers: str) -> str:
    """`` (gen-bound)`` when the load generator was near its limit in these servers' trials;
    `` (contended)`` when other programs took a share of the server's or its CPU."""
    busy = [v for s in servers for v in cell.values(s, "loadgen_busy")]
    waits = [
        v
        for s in servers
        for m in ("server_cpu_others", "loadgen_cpu_others")
        for v in cell.values(s, m)
    ]
    marks = " (gen-bound)" if busy and max(busy) >= GEN_BOUND else ""
    return marks + (" (contended)" if waits and max(waits) >= CONTENDED else "")


def _others(cell: Cell, server: str) -> str:
    srv, gen = cell.stat(server, "server_cpu_others"), cell.stat(server, "loadgen_cpu_others")
    if srv is None or gen is None:
        return "-"
    return f"{srv.median:.0%} / {gen.median:.0%}"


def _present(cells: Sequence[Cell], *servers: str) -> list[str]:
    return [s for s in servers if any(s in c.servers for c in cells)]


def fanout(cells: Sequence[Cell]) -> list[str]:
    ours = _present(cells, OURS, UVLOOP)
    columns = [*ours, *PEERS, *_present(cells, "floor")]
    pairs = [(a, b) for a in ours for b in PEERS]
    lines = [
        "### fanout: server CPU us per delivered message (lower is better)",
        "",
        "| variant | N | E | " + " | ".join([*columns, *(f"{a} / {b}" for a, b in pairs)]) + " |",
        "|---|--:|--:|" + "--:|" * (len(columns) + len(pairs)),
    ]
    for c in cells:
        p = c.params
        row = [p["variant"], str(p["n"]), str(p["events"])]
        row += [_show(c.stat(s, "server_us_per_msg")) for s in columns]
        row += [_show(c.ratio("server_us_per_msg", a, b), 2) for a, b in pairs]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", _same_bytes(cells)]
    servers = [*ours, *PEERS]
    lines += [
        "",
        "### fanout: delivered messages per second; busy = server / load generator; "
        "paced = publishing time / delivery time",
        "",
        "| variant | N | "
        + " | ".join(
            [
                *(f"{s} msg/s" for s in servers),
                *(f"busy {s}" for s in servers),
                f"paced {servers[0]}",
                *servers[1:],
            ]
        )
        + " |",
        "|---|--:|" + "--:|" * 3 * len(servers),
    ]
    for c in cells:
        row = [c.params["variant"], str(c.params["n"])]
        row += [_show(c.stat(s, "msgs_per_s"), 0) for s in servers]
        row += [_busy(c, s) for s in servers]
        row += [_percent(c.stat(s, "paced")) for s in servers]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def latency(cells: Sequence[Cell]) -> list[str]:
    lines = [
        "### latency: publish to receive, ms (lower is better)",
        "",
        f"*(gen-bound)*: the load generator was {GEN_BOUND:.0%} busy or more in a round, so the "
        "arrival times include its own backlog: read that row as a bound, not a measurement. "
        f"*(contended)*: other programs took {CONTENDED:.0%} or more of the server's or the load "
        "generator's CPU during a round (**others**, from /proc/stat): rerun on a quiet machine.",
        "",
        "| setting | server | p50 | p99 | max | p99 / grpc.aio | p99 / grpclib "
        "| busy srv / gen | others srv / gen | driver late |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for c in cells:
        for server in c.servers:
            ratios = ["-", "-"]
            if server != "grpc.aio":
                ratios[0] = _show(c.ratio("p99_ms", server, "grpc.aio"), 2)
            if server != "grpclib":
                ratios[1] = _show(c.ratio("p99_ms", server, "grpclib"), 2)
            row = [c.label, server + _gen_bound(c, server)]
            row += [_show(c.stat(server, m), 2) for m in ("p50_ms", "p99_ms", "max_ms")]
            row += [*ratios, _busy(c, server), _others(c, server)]
            row.append(_show(c.stat(server, "driver_late_ms"), 1))
            lines.append("| " + " | ".join(row) + " |")
    return lines


def idle(cells: Sequence[Cell]) -> list[str]:
    lines = [
        "### idle: server memory per open stream, and a final event after the hold",
        "",
        "| streams | server | KiB / stream | / grpc.aio | open s | CPU % while held "
        "| final event: all received | final ms | SYNs dropped |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for c in cells:
        for server in c.servers:
            samples = [s for s in c.samples.get(server, []) if "skipped" not in s]
            if not samples:
                continue
            everyone = sum(bool(s["final_all"]) for s in samples)
            ratio = (
                "-"
                if server == "grpc.aio"
                else _show(c.ratio("kib_per_stream", server, "grpc.aio"), 2)
            )
            row = [
                c.label,
                server,
                _show(c.stat(server, "kib_per_stream")),
                ratio,
                _show(c.stat(server, "open_seconds")),
                _show(c.stat(server, "hold_cpu_percent"), 2),
                f"{everyone}/{len(samples)} rounds",
                _show(c.stat(server, "final_ms"), 0),
                " / ".join(str(s.get("listen_overflows")) for s in samples),
            ]
            lines.append("| " + " | ".join(row) + " |")
    return [*lines, "", *_skipped(cells)]


def reconnect(cells: Sequence[Cell]) -> list[str]:
    lines = [
        "### reconnect: server killed and restarted under the clients",
        "",
        "| clients | server | down s | all again s | median again s | bound s | within "
        "| lost | announced | unannounced | duplicates | SYNs dropped | busy srv / gen |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for c in cells:
        for server in c.servers:
            samples = c.samples.get(server, [])
            if not samples:
                continue
            within = sum(bool(s["within_bound"]) for s in samples)
            resume = bool(samples[0]["resume"])

            def count(
                metric: str, *, samples: list[dict[str, Any]] = samples, resume: bool = resume
            ) -> str:
                if not resume:
                    return "n/a"
                return " / ".join(str(s[metric]) for s in samples)

            row = [
                c.label,
                server,
                _show(c.stat(server, "down_seconds"), 2),
                _show(c.stat(server, "again_seconds"), 2),
                _show(c.stat(server, "again_median_seconds"), 2),
                _show(c.stat(server, "bound_seconds"), 2),
                f"{within}/{len(samples)}",
                count("lost"),
                count("lost_announced"),
                count("lost_unannounced"),
                count("duplicates"),
                " / ".join(str(s.get("listen_overflows")) for s in samples),
                _busy(c, server),
            ]
            lines.append("| " + " | ".join(row) + " |")
    return lines


def targets(by_workload: dict[str, list[Cell]]) -> list[str]:
    """The figures the server is judged by, each straight from the tables below."""
    lines = ["### Targets (longlived against the peers, ratios within each round)", ""]
    lines += ["| target | result |", "|---|---|"]
    for c in by_workload.get("fanout", []):
        if c.params["variant"] != "one":
            continue
        ratios = ", ".join(
            f"{_show(c.ratio('server_us_per_msg', OURS, p), 2)} vs {p}" for p in PEERS
        )
        ratios += _gen_bound(c, OURS, *PEERS)
        if UVLOOP in c.servers:
            uv = _show(c.ratio("server_us_per_msg", UVLOOP, "grpc.aio"), 2)
            ratios += f"; on uvloop {uv}{_gen_bound(c, UVLOOP)}"
        lines.append(f"| fanout N={c.params['n']}: server CPU / msg ratio | {ratios} |")
    for c in by_workload.get("latency", []):
        uv = ""
        if UVLOOP in c.servers:
            uv = f"; on uvloop {_show(c.ratio('p99_ms', UVLOOP, 'grpc.aio'), 2)}"
            uv += _gen_bound(c, UVLOOP)
        lines.append(
            f"| latency {c.label}: p99 ratio vs grpc.aio "
            f"| {_show(c.ratio('p99_ms', OURS, 'grpc.aio'), 2)} "
            f"(p99 {_show(c.stat(OURS, 'p99_ms'), 2)} ms){_gen_bound(c, OURS, 'grpc.aio')}{uv} |"
        )
    for c in by_workload.get("idle", []):
        samples = [s for s in c.samples.get(OURS, []) if "skipped" not in s]
        if not samples:
            continue
        everyone = sum(bool(s["final_all"]) for s in samples)
        lines.append(
            f"| idle {c.label}: KiB / stream; all receive the final event after "
            f"{c.params['hold']:g} s | {_show(c.stat(OURS, 'kib_per_stream'))} KiB; "
            f"{everyone}/{len(samples)} rounds |"
        )
    for c in by_workload.get("reconnect", []):
        for server in ("longlived", "longlived+redis"):
            samples = c.samples.get(server, [])
            if not samples:
                continue
            within = sum(bool(s["within_bound"]) for s in samples)
            key = "lost" if server == "longlived+redis" else "lost_unannounced"
            lost = " / ".join(str(s[key]) for s in samples)
            lines.append(
                f"| reconnect {c.label} ({server}): all again within the bound; "
                f"{'lost' if key == 'lost' else 'unannounced losses'} "
                f"| {within}/{len(samples)} rounds "
                f"({_show(c.stat(server, 'again_seconds'), 2)} s); {lost} |"
            )
    return lines


WORKLOADS = {"fanout": fanout, "latency": latency, "idle": idle, "reconnect": reconnect}


def markdown(by_workload: dict[str, list[Cell]], header: Sequence[str]) -> str:
    """The whole report: header lines, the targets, each workload's tables."""
    lines = [*header, "", *targets(by_workload)]
    for name, render in WORKLOADS.items():
        if by_workload.get(name):
            lines += ["", *render(by_workload[name])]
    return "\n".join(lines).rstrip() + "\n"
