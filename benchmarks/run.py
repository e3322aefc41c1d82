"""The benchmark suite: longlived beside a grpc.aio peer and a plain grpclib peer.

Run from the repository root: ``python -m benchmarks.run --quick`` (under 3 minutes) or
``python -m benchmarks.run --full``; ``--only fanout,latency`` picks workloads; ``--help``
lists every knob. Workloads: ``fanout``, ``latency``, ``idle``, ``reconnect`` (see each
module and ``benchmarks/README.md``).

Arrangement: this process orchestrates and idles while anything is measured; the server
under test runs in its own process pinned to ``--server-cpu`` (1); ONE grpcio load
generator process, pinned to ``--loadgen-cpu`` (0), holds every subscriber. Each round runs
every server once per setting, in an order rotated by the round; the report gives medians
with min-max ranges over rounds, and ratios computed within each round. Results: JSON (every
sample, commit, versions, machine, options), a Markdown report (also printed) and PNG
charts, in ``--out`` (``benchmarks/results``; ``benchmarks/results/quick`` for --quick).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator, Sequence
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

from benchmarks import _report, fanout, idle, latency, reconnect
from benchmarks._bench import Bench, Cell, rotate
from benchmarks._child import Child, children
from benchmarks._common import generate_stubs

WORKLOADS: dict[str, ModuleType] = {
    "fanout": fanout,
    "latency": latency,
    "idle": idle,
    "reconnect": reconnect,
}
PERSISTENT = {"fanout", "latency"}
"""Workloads whose trials reuse one server process per server (the others need fresh ones)."""

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PRESETS: dict[str, dict[str, Any]] = {
    "quick": {
        "rounds": 1,
        "fanout_n": [1, 10, 100, 1000],
        "burst_n": [1000],
        "fanout_messages": 10_000,
        "fanout_min_events": 20,
        "latency_seconds": 1.5,
        "idle_n": [1000],
        "idle_per_connection": [1, 100],
        "idle_skip": [],
        "hold": 2.0,
        "reconnect_n": 200,
        "reconnect_timeout": 30.0,
        "out": HERE / "results" / "quick",
    },
    "full": {
        "rounds": 3,
        "fanout_n": [1, 10, 100, 1000],
        "burst_n": [1, 10, 100, 1000],
        "fanout_messages": 100_000,
        "fanout_min_events": 100,
        "latency_seconds": 10.0,
        "idle_n": [1000, 10_000],
        "idle_per_connection": [1, 100],
        "idle_skip": [],
        "hold": 60.0,
        "reconnect_n": 1000,
        "reconnect_timeout": 60.0,
        "out": HERE / "results",
    },
}


def _ints(text: str) -> list[int]:
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,10,100, got {text!r}")
    return values


def _names(choices: Sequence[str]) -> Any:
    def parse(text: str) -> list[str]:
        names = [part.strip() for part in text.split(",") if part.strip()]
        unknown = [n for n in names if n not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"expected some of {','.join(choices)}, got {text!r}")
        return names

    return parse


def _settings(text: str) -> list[tuple[int, float]]:
    """``100@200,1000@20``: (subscribers, events per second) pairs."""
    try:
        pairs = [part.split("@") for part in text.split(",") if part.strip()]
        return [(int(n), float(rate)) for n, rate in pairs]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected N@RATE pairs like 100@200, got {text!r}"
        ) from None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=doc.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the short run (under 3 minutes)")
    mode.add_argument("--full", action="store_true", help="the full run (the default)")
    add("--only", type=_names(list(WORKLOADS)), default=list(WORKLOADS), help="workloads to run")
    add(
        "--servers",
        type=_names(
            ["longlived", "longlived+uvloop", "longlived+redis", "grpc.aio", "grpclib", "floor"]
        ),
        default=None,
        help="only these servers (default: all of each workload's)",
    )
    add("--rounds", type=int, default=None, help="rounds (quick 1, full 3)")
    add("--server-cpu", type=int, default=1, help="CPU the server under test is pinned to")
    add("--loadgen-cpu", type=int, default=0, help="CPU the load generator is pinned to")
    add(
        "--loadgen",
        choices=["raw", "grpcio"],
        default="raw",
        help="subscribers of fanout, latency and idle: raw HTTP/2 readers (cheap, so the "
        "server sets the pace) or grpc.aio calls (reconnect always uses grpc.aio clients)",
    )
    add(
        "--loadgen-loop",
        choices=["uvloop", "asyncio"],
        default="uvloop",
        help="the load generator's event loop (asyncio when uvloop is not installed)",
    )
    add("--no-pin", action="store_true", help="do not pin processes to CPUs")
    add("--size", type=int, default=64, help="characters of event data (>= 30)")
    add("--timeout", type=float, default=120.0, help="bound on every step of a trial, seconds")
    add("--out", type=Path, default=None, help="directory for results (quick: results/quick)")
    add(
        "--floor",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="add the raw pre-framed-write floor server to fanout and latency",
    )
    add(
        "--uvloop",
        action=argparse.BooleanOptionalAction,
        default=importlib.util.find_spec("uvloop") is not None,
        help="add longlived on uvloop to fanout, latency and idle (default: if installed)",
    )
    group = parser.add_argument_group("fanout")
    group.add_argument("--fanout-n", type=_ints, help="subscriber counts N, one variant")
    group.add_argument("--burst-n", type=_ints, help="subscriber counts N, burst variant")
    group.add_argument(
        "--fanout-variants",
        type=_names(list(fanout.VARIANTS)),
        default=list(fanout.VARIANTS),
        help="one (1 event per loop turn), burst (10)",
    )
    group.add_argument("--fanout-messages", type=int, help="delivered messages per trial")
    group.add_argument("--fanout-min-events", type=int, help="smallest E per trial")
    group = parser.add_argument_group("latency")
    group.add_argument(
        "--latency-settings",
        type=_settings,
        default=[(100, 200.0), (1000, 20.0)],
        help="N@events-per-second pairs",
    )
    group.add_argument("--latency-seconds", type=float, help="publishing time per trial")
    group = parser.add_argument_group("idle")
    group.add_argument("--idle-n", type=_ints, help="open streams N")
    group.add_argument("--idle-per-connection", type=_ints, help="streams per connection")
    group.add_argument("--idle-skip", type=lambda t: t.split(","), help="N/per-connection to skip")
    group.add_argument(
        "--hold", type=float, help="seconds the largest N's streams are held before the event"
    )
    group.add_argument(
        "--hold-small", type=float, default=2.0, help="seconds smaller N's streams are held"
    )
    group = parser.add_argument_group("reconnect")
    group.add_argument("--reconnect-n", type=int, help="clients")
    group.add_argument("--reconnect-rate", type=float, default=10.0, help="events per second")
    group.add_argument(
        "--reconnect-timeout",
        type=float,
        help="seconds the clients get to be back before the trial counts who is (quick 30, "
        "full 60)",
    )
    group.add_argument(
        "--no-redis", dest="redis", action="store_false", help="leave out longlived on a Redis log"
    )
    args = parser.parse_args(argv)
    args.mode = "quick" if args.quick else "full"
    for key, value in PRESETS[args.mode].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.size < 30:
        parser.error("--size must be at least 30 (the latency stamp needs 29 characters)")
    if args.uvloop and importlib.util.find_spec("uvloop") is None:
        parser.error("--uvloop needs uvloop installed (pip install uvloop)")
    if args.no_pin:
        args.server_cpu = args.loadgen_cpu = None
    return args


# ------------------------------------------------------------------------------ running


def plan(args: argparse.Namespace) -> dict[str, list[Cell]]:
    """The cells of every selected workload, without samples yet."""
    by_workload = {name: WORKLOADS[name].cells(args) for name in args.only}
    if args.servers:
        for cell in (c for cells in by_workload.values() for c in cells):
            cell.servers = [s for s in cell.servers if s in args.servers]
    if "idle" in by_workload:
        skip = set(args.idle_skip)
        by_workload["idle"] = [
            c
            for c in by_workload["idle"]
            if f"{c.params['n']}/{c.params['per_connection']}" not in skip
        ]
    return by_workload


def run(args: argparse.Namespace, bench: Bench, by_workload: dict[str, list[Cell]]) -> None:
    """Every round of every selected workload, adding the samples to the cells."""
    started = time.monotonic()
    for round_ in range(args.rounds):
        for name, cells in by_workload.items():
            module = WORKLOADS[name]
            with _processes(bench, name) as process_for:
                for index, cell in enumerate(cells):
                    for server in rotate(cell.servers, round_ + index):
                        sample = module.trial(bench, cell, server, process_for(server))
                        sample["round"] = round_
                        cell.add(server, sample)
                        _progress(started, round_, args.rounds, cell, server, sample)


@contextlib.contextmanager
def _processes(bench: Bench, workload: str) -> Iterator[Any]:
    """``process_for(server)``: a server process kept for the workload, or None."""
    kept: dict[str, Child] = {}

    def process_for(server: str) -> Child | None:
        if workload not in PERSISTENT:
            return None
        if server not in kept:
            kept[server] = bench.server_process(server)
            fanout.warm_up(bench, server, kept[server])
        return kept[server]

    try:
        yield process_for
    finally:
        for child in kept.values():
            child.close()


def _progress(
    started: float, round_: int, rounds: int, cell: Cell, server: str, sample: dict[str, Any]
) -> None:
    keys = {
        "fanout": ("server_us_per_msg", "us/msg", 1),
        "latency": ("p99_ms", "ms p99", 2),
        "idle": ("kib_per_stream", "KiB/stream", 1),
        "reconnect": ("again_seconds", "s until all again", 2),
    }
    key, unit, digits = keys[cell.workload]
    value = sample.get(key)
    if "skipped" in sample:
        shown = "skipped"
    elif value is None:
        shown = f"not all back in the time allowed ({sample.get('again_clients')} were)"
    else:
        shown = f"{value:,.{digits}f} {unit}"
    when = f"[{time.monotonic() - started:6.1f}s] round {round_ + 1}/{rounds}"
    print(f"{when} {cell.workload} {cell.label} {server}: {shown}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _redis(args: argparse.Namespace) -> Iterator[str | None]:
    """A private redis-server on a free loopback port (persistence off), if needed."""
    binary = shutil.which("redis-server")
    if "reconnect" not in args.only or not args.redis:
        yield None
        return
    if binary is None:
        print(
            "redis-server is not installed: reconnect runs without longlived+redis", file=sys.stderr
        )
        args.redis = False
        yield None
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        if args.server_cpu is not None:  # Redis is part of the server side
            with contextlib.suppress(OSError):
                os.sched_setaffinity(process.pid, {args.server_cpu})
        _until_redis(port, timeout=10.0)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.kill()
        process.wait(10)


def _until_redis(port: int, *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0) as conn:
                conn.sendall(b"PING\r\n")
                if conn.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"redis-server did not answer on port {port} in {timeout:.0f}s")
        time.sleep(0.05)


# ------------------------------------------------------------------------------ reporting


def _git(*args: str) -> str:
    try:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip()


def source() -> dict[str, Any]:
    """The commit measured, and files changed since (the tree may be edited while it runs)."""
    changed = _git("status", "--porcelain", "--", "longlived", "pyproject.toml").splitlines()
    subject = _git("log", "-1", "--format=%s")
    subject = subject if len(subject) <= 60 else subject[:57] + "..."
    short = _git("rev-parse", "--short", "HEAD")
    return {
        "commit": _git("rev-parse", "HEAD"),
        "short": short,
        "describe": f"{short} {subject}",
        "changed": changed,
    }


def machine(bench: Bench) -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    packages = (
        "grpcio", "grpclib", "h2", "betterproto2", "protobuf", "redis", "uvloop", "matplotlib",
    )  # fmt: skip
    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {p: _version(p) for p in packages},
        "loadavg_at_start": _loadavg(),
        "loadgen": bench.loadgen.setup,
    }


def _loadavg() -> list[float] | None:
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def header(args: argparse.Namespace, info: dict[str, Any], elapsed: float) -> list[str]:
    m, src = info.get("machine", {}), info["source"]
    if not m:  # the run failed before the load generator started
        return [
            f"## Benchmark results ({args.mode} run, {info['date']}): FAILED",
            "",
            f"- {info.get('failed', 'failed')}",
        ]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    pin = f"server on CPU {args.server_cpu}, load generator on CPU {args.loadgen_cpu}"
    if args.server_cpu is None:
        pin = "not pinned"
    load = m["loadavg_at_start"]
    dirty = f" (uncommitted changes: {len(src['changed'])} files)" if src["changed"] else ""
    failed = []
    if "failed" in info:
        failed = [
            f"- **INCOMPLETE: the run stopped: {info['failed']}** (the tables hold what "
            "was measured before)"
        ]
    return [
        f"## Benchmark results ({args.mode} run, {info['date']})",
        "",
        f"- commit: {src['describe']}{dirty}",
        f"- machine: {m['cpus']} CPUs ({m['cpu']}), {m['platform']}, Python {m['python']}; "
        f"load average at start {', '.join(f'{x:.2f}' for x in load) if load else 'unknown'}",
        f"- versions: {versions}",
        f"- load generator: {_loadgen_line(args, m)}",
        f"- {pin}; {args.rounds} round{'s' * (args.rounds != 1)}, rotated order; "
        "medians (min-max over rounds); "
        f"{elapsed:.0f} s in all",
        *failed,
    ]


def _loadgen_line(args: argparse.Namespace, machine: dict[str, Any]) -> str:
    loop = (machine.get("loadgen") or {}).get("loop", "asyncio")
    if args.loadgen == "raw":
        kind = "raw HTTP/2 readers (benchmarks/_rawgen.py)"
    else:
        kind = "grpc.aio calls"
    return (
        f"{kind} for fanout, latency and idle; grpc.aio clients and ResilientClient for "
        f"reconnect; all on {loop}"
    )


def write(
    args: argparse.Namespace,
    by_workload: dict[str, list[Cell]],
    info: dict[str, Any],
    elapsed: float,
) -> str:
    """Write latest.json, latest.md and the charts into ``args.out``; the Markdown."""
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    record = {
        **info,
        "elapsed_seconds": round(elapsed, 1),
        "options": options,
        "cells": [c.to_json() for cells in by_workload.values() for c in cells],
    }
    (out / "latest.json").write_text(json.dumps(record, indent=1) + "\n")
    text = _report.markdown(by_workload, header(args, info, elapsed))
    try:
        from benchmarks._charts import charts

        title = f"longlived benchmarks: {args.mode} run, {info['date']}, {info['source']['short']}"
        pngs = charts(by_workload, out, title)
        text += "\n" + " ".join(f"![{p.stem}]({p.name})" for p in pngs) + "\n"
    except ImportError:
        print("matplotlib is not installed: no charts (pip install -e '.[dev]')", file=sys.stderr)
    (out / "latest.md").write_text(text)
    return text


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    for key in [k for k in os.environ if k.startswith("LONGLIVED_")]:
        del os.environ[key]  # the servers and clients run on their defaults
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # children inherit it
    if args.loadgen_cpu is not None:  # the orchestrator idles on the load generator's CPU
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, {args.loadgen_cpu})
    started = time.monotonic()
    info: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M %z"), "source": source()}
    by_workload = plan(args)
    code = 0
    try:
        with tempfile.TemporaryDirectory(prefix="longlived-bench-") as tmp, children():
            generate_stubs(Path(tmp))
            with _redis(args) as redis_url:
                bench = Bench(args, Path(tmp))
                bench.redis_url = redis_url
                info["machine"] = machine(bench)
                try:
                    run(args, bench, by_workload)
                finally:
                    bench.close()
    except (Exception, KeyboardInterrupt) as exc:
        # what was measured is kept; the report says the run is incomplete and why
        code = 130 if isinstance(exc, KeyboardInterrupt) else 1
        reason = "interrupted" if code == 130 else f"{type(exc).__name__}: {exc}"
        lines = [line.strip() for line in reason.strip().splitlines() if line.strip()]
        # a child's failure carries its traceback: its first and last lines say it
        info["failed"] = (lines[0] if len(lines) < 2 else f"{lines[0]} {lines[-1]}")[:300]
        traceback.print_exc()
    elapsed = time.monotonic() - started
    print(write(args, by_workload, info, elapsed))
    print(
        f"results in {args.out}/ (latest.json, latest.md, *.png); {elapsed:.0f} s", file=sys.stderr
    )
    if code:
        print(f"benchmark run FAILED: {info['failed']}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
