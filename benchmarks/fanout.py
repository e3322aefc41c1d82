"""Fan-out benchmark: longlived's server beside a grpc.aio peer, in the same run.

Workload ``fanout``: N subscribers, E events published as fast as the server allows;
the score is delivered messages per second, N x E / (time from the first publish until the
load generator has received all N x E messages). Each N is run R times per server,
alternating which server goes first; the report is the median of each and their ratio.

Arrangement (the same for both servers): this process orchestrates; each server runs in its
own process (the one running ours never imports grpcio), fed by a driver in that process;
all subscribers live in ONE load-generator process (a grpclib client by default,
``--client grpcio`` for grpc.aio). Everything talks over 127.0.0.1 on free ports.

Run: ``.venv/bin/python benchmarks/fanout.py --quick`` (about a minute), or without
``--quick`` for the full run. ``--help`` lists the knobs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import _loadgen
import _serve
from _common import generate_stubs

SERVERS = ("ours", "peer")
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "fanout-latest.json"
SLACK = 10.0
"""Extra seconds the orchestrator waits beyond a child's own timeout before giving up."""


@dataclass(frozen=True, slots=True)
class Sample:
    """One trial of one server."""

    server: str
    n: int
    events: int
    seconds: float
    """First publish until the last message arrived."""
    publish_seconds: float
    """First publish until the driver had published the last event."""
    server_cpu: float
    """Server process CPU seconds (all threads), first publish until all arrived."""
    loadgen_cpu: float
    """Load-generator CPU seconds over the same span."""

    @property
    def messages(self) -> int:
        return self.n * self.events

    @property
    def rate(self) -> float:
        """Delivered messages per second."""
        return self.messages / self.seconds


@dataclass
class Row:
    """All samples for one N, and their medians."""

    n: int
    events: int
    samples: dict[str, list[Sample]] = field(default_factory=lambda: {s: [] for s in SERVERS})

    def median_rate(self, server: str) -> float:
        return statistics.median(s.rate for s in self.samples[server])

    def median_cpu_us(self, server: str, cpu: str = "server_cpu") -> float:
        """Median CPU microseconds per delivered message (of the server or load generator)."""
        return statistics.median(self._cpu(s, cpu) / s.messages * 1e6 for s in self.samples[server])

    def median_busy(self, server: str, cpu: str) -> float:
        """Median share of one core a process used while the messages flowed."""
        return statistics.median(self._cpu(s, cpu) / s.seconds for s in self.samples[server])

    @staticmethod
    def _cpu(sample: Sample, which: str) -> float:
        return sample.server_cpu if which == "server_cpu" else sample.loadgen_cpu

    @property
    def ratio(self) -> float:
        return self.median_rate("ours") / self.median_rate("peer")


class Child:
    """A child process and the orchestrator's end of its pipe."""

    def __init__(self, name: str, target: Callable[..., None], args: tuple[Any, ...]) -> None:
        context = multiprocessing.get_context("spawn")
        self.name = name
        self.conn, child_end = context.Pipe()
        self.process: BaseProcess = context.Process(
            target=target, args=(child_end, *args), name=f"fanout-{name}", daemon=True
        )
        self.process.start()
        child_end.close()

    def send(self, *command: object) -> None:
        self.conn.send(command)

    def expect(self, kind: str, timeout: float) -> tuple[Any, ...]:
        """The answer ``kind`` with its values; raises on timeout, error or anything else."""
        if not self.conn.poll(timeout):
            raise TimeoutError(f"{self.name}: no {kind!r} within {timeout:.0f}s")
        try:
            message: tuple[Any, ...] = self.conn.recv()
        except EOFError:
            raise RuntimeError(f"{self.name} exited (code {self.process.exitcode})") from None
        if message[0] == "error":
            raise RuntimeError(f"{self.name} failed:\n{message[1]}")
        if message[0] != kind:
            raise RuntimeError(f"{self.name}: expected {kind!r}, got {message!r}")
        return message[1:]

    def close(self, timeout: float = 10.0) -> None:
        """Ask the child to exit; terminate it if it does not."""
        if self.process.is_alive():
            with contextlib.suppress(OSError):  # the child may have closed its end
                self.send("exit")
            self.process.join(timeout)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout)
        self.conn.close()


def trial(
    server: Child, loadgen: Child, *, n: int, events: int, args: argparse.Namespace
) -> Sample:
    """One trial: fresh server, N subscriptions, E events, all delivered."""
    wait = args.timeout + SLACK
    server.send("trial", n, events, args.batch, args.size)
    (port,) = server.expect("port", wait)
    loadgen.send("subscribe", port, n, events, args.connections)
    loadgen.expect("ready", wait)
    server.send("go")
    t0, t_published = server.expect("published", wait)
    t_last, loadgen_cpu, errors = loadgen.expect("done", wait)
    server.send("measure")
    (server_cpu,) = server.expect("cpu", wait)
    loadgen.send("close")
    loadgen.expect("closed", wait)
    server.send("stop")
    server.expect("stopped", wait)
    if errors:
        raise RuntimeError(f"{server.name}, N={n}: " + "; ".join(errors))
    return Sample(server.name, n, events, t_last - t0, t_published - t0, server_cpu, loadgen_cpu)


def events_for(n: int, args: argparse.Namespace) -> int:
    """E for this N: ``--events`` if given, else about ``--messages`` delivered per trial."""
    if args.events is not None:
        return int(args.events)
    return max(int(args.messages) // n, int(args.min_events))


def run(args: argparse.Namespace, stubs_dir: Path) -> list[Row]:
    """Every trial, with the children started once and closed at the end."""
    children: dict[str, Child] = {}
    try:
        for kind in SERVERS:
            children[kind] = Child(kind, _serve.main, (kind, str(stubs_dir), args.timeout))
        loadgen = Child("loadgen", _loadgen.main, (args.client, str(stubs_dir), args.timeout))
        children["loadgen"] = loadgen
        rows = []
        for n in args.subscribers:
            row = Row(n, events_for(n, args))
            for rep in range(args.repeat):
                order = SERVERS if rep % 2 == 0 else SERVERS[::-1]
                for kind in order:
                    sample = trial(children[kind], loadgen, n=n, events=row.events, args=args)
                    row.samples[kind].append(sample)
                    print(f"  N={n:<5} E={row.events:<6} rep {rep + 1} {kind}: "
                          f"{sample.rate:>9,.0f} msg/s", file=sys.stderr, flush=True)  # fmt: skip
            rows.append(row)
        return rows
    finally:
        for child in children.values():
            child.close()


def table(rows: Sequence[Row]) -> str:
    """The results as a Markdown table."""
    lines = [
        "| N | E | ours msg/s | peer msg/s | ours/peer "
        "| CPU us/msg ours | CPU us/msg peer | busy ours srv/gen | busy peer srv/gen |",
        "|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for row in rows:
        busy = {
            s: f"{row.median_busy(s, 'server_cpu'):.0%} / {row.median_busy(s, 'loadgen_cpu'):.0%}"
            for s in SERVERS
        }
        lines.append(
            f"| {row.n} | {row.events} | {row.median_rate('ours'):,.0f} "
            f"| {row.median_rate('peer'):,.0f} | {row.ratio:.2f} "
            f"| {row.median_cpu_us('ours'):.1f} | {row.median_cpu_us('peer'):.1f} "
            f"| {busy['ours']} | {busy['peer']} |"
        )
    return "\n".join(lines)


def report(
    rows: Sequence[Row], args: argparse.Namespace, elapsed: float, source: dict[str, Any]
) -> dict[str, Any]:
    """The results and the conditions they were measured in, for the JSON file."""
    return {
        "workload": "fanout",
        "unit": "delivered messages per second (median of repetitions)",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "elapsed_seconds": round(elapsed, 1),
        "source": source,
        "machine": {
            "cpus": multiprocessing.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "versions": {p: _version(p) for p in ("grpcio", "grpclib", "h2", "betterproto2")},
        },
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": [
            {
                "n": row.n,
                "events": row.events,
                "messages": row.n * row.events,
                "ours_msgs_per_s": round(row.median_rate("ours")),
                "peer_msgs_per_s": round(row.median_rate("peer")),
                "ratio": round(row.ratio, 3),
                "server_cpu_us_per_msg": {s: round(row.median_cpu_us(s), 2) for s in SERVERS},
                "loadgen_cpu_us_per_msg": {
                    s: round(row.median_cpu_us(s, "loadgen_cpu"), 2) for s in SERVERS
                },
                "server_busy": {s: round(row.median_busy(s, "server_cpu"), 3) for s in SERVERS},
                "loadgen_busy": {s: round(row.median_busy(s, "loadgen_cpu"), 3) for s in SERVERS},
                "samples": {
                    s: [asdict(x) | {"rate": x.rate} for x in row.samples[s]] for s in SERVERS
                },
            }
            for row in rows
        ],
    }


def _source() -> dict[str, Any]:
    """The commit measured, and files changed since (the tree may be edited while it runs)."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        try:
            done = subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return done.stdout.strip()

    changed = git("status", "--porcelain", "--", "longlived", "pyproject.toml").splitlines()
    return {"commit": git("rev-parse", "HEAD"), "changed": changed}


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _counts(text: str) -> list[int]:
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,10,100, got {text!r}")
    return values


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add(
        "--subscribers",
        "-n",
        type=_counts,
        default=[1, 10, 100, 1000],
        help="comma-separated subscriber counts N (default: 1,10,100,1000)",
    )
    add(
        "--events",
        "-e",
        type=_positive,
        default=None,
        help="events E per trial, for every N (default: about --messages / N)",
    )
    add(
        "--messages",
        type=_positive,
        default=400_000,
        help="delivered messages per trial without --events (default: 400000)",
    )
    add("--min-events", type=_positive, default=50, help="smallest E derived from --messages")
    add(
        "--repeat",
        "-r",
        type=_positive,
        default=3,
        help="repetitions per server and N (default: 3)",
    )
    add("--batch", type=_positive, default=10, help="events published between loop yields")
    add("--size", type=_positive, default=64, help="event payload, characters (default: 64)")
    add(
        "--client",
        choices=_loadgen.CLIENTS,
        default="grpclib",
        help="library of the load generator's subscribers (default: grpclib, one thread)",
    )
    add("--connections", type=_positive, default=4, help="load-generator connections (default: 4)")
    add("--timeout", type=float, default=120.0, help="bound on each step of a trial, seconds")
    add(
        "--quick",
        action="store_true",
        help="about a minute in all: --messages 100000 --min-events 20",
    )
    add("--out", type=Path, default=DEFAULT_OUT, help=f"JSON results (default: {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    if args.quick:
        args.messages, args.min_events = 100_000, 20
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    # grpcio's C-core logs each GOAWAY at INFO; children inherit this (unless it is set)
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    started = time.monotonic()
    source = _source()  # before the children import the package
    with tempfile.TemporaryDirectory(prefix="longlived-bench-") as tmp:
        generate_stubs(Path(tmp))
        rows = run(args, Path(tmp))
    elapsed = time.monotonic() - started
    print(table(rows))
    print(f"\nmedians of {args.repeat} runs each; {elapsed:.0f}s in all", file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report(rows, args, elapsed, source), indent=2) + "\n")
    print(f"results written to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
