"""What the benchmark's processes share: pipes, pinning, limits, grpcio stubs, payloads.

The orchestrator (``run.py``) talks to each child process over a ``multiprocessing`` pipe:
it sends a command tuple, the child answers with a tuple. Children wait for commands with
``receive``, which watches the pipe from the event loop (no helper thread), so a child that
waits costs no CPU and a trial's CPU accounting stays clean.

Only the standard library is imported here: children import what their side needs, so the
process that runs longlived's server never loads grpcio.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.resources
import logging
import os
import resource
import signal
import sys
from array import array
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = [
    "PROTO",
    "SUBSCRIBE",
    "Stubs",
    "child_setup",
    "cpu_busy",
    "generate_stubs",
    "listen_overflows",
    "load_stubs",
    "numbered",
    "others",
    "parse_numbered",
    "parse_stamped",
    "payload",
    "raise_nofile",
    "receive",
    "rss_kb",
    "runner",
    "stamp",
    "stamped",
    "summary",
]

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "proto" / "longlived.proto"
SUBSCRIBE = "/longlived.Longlived/Subscribe"

WELL_KNOWN = importlib.resources.files("grpc_tools") / "_proto"
"""protoc's own include directory, with the well-known types."""


@dataclass(frozen=True, slots=True)
class Stubs:
    """The modules ``grpc_tools.protoc`` generated from ``proto/longlived.proto``."""

    messages: ModuleType
    services: ModuleType


def generate_stubs(out: Path) -> None:
    """Run ``grpc_tools.protoc`` on the project's proto, writing grpcio stubs into ``out``."""
    from grpc_tools import protoc

    args = [
        "protoc",
        f"--proto_path={PROTO.parent}",
        f"--proto_path={WELL_KNOWN}",  # google/protobuf/any.proto
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        str(PROTO),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO}")


def load_stubs(out: Path) -> Stubs:
    """Import the stubs ``generate_stubs`` wrote into ``out``."""
    names = [f"{PROTO.stem}_pb2", f"{PROTO.stem}_pb2_grpc"]
    # the *_pb2_grpc module imports its *_pb2 sibling by top-level name
    sys.path.insert(0, str(out))
    try:
        messages, services = (importlib.import_module(name) for name in names)
    finally:
        sys.path.remove(str(out))
    return Stubs(messages=messages, services=services)


# ----------------------------------------------------------------------------- payloads
# Every server sends the same Response fields (data, seq, token), so the same bytes per
# message; ``data`` is one of these, padded to the run's ``--size`` characters.


def payload(index: int, size: int) -> str:
    """The data of fanout event ``index``: its number, padded to ``size`` characters."""
    return f"{index:08d}".ljust(size, "x")


def stamped(index: int, stamp_ns: int, size: int) -> str:
    """Latency event ``index``, published at ``stamp_ns`` (``time.monotonic_ns()``)."""
    return f"{index:08d}:{stamp_ns:020d}".ljust(size, "x")


def parse_stamped(data: str) -> int:
    """The publish stamp of a ``stamped`` payload."""
    return int(data[9:29])


def numbered(generation: int, index: int, size: int) -> str:
    """Reconnect event ``index`` of server ``generation`` (0 before the restart, 1 after)."""
    return f"{generation}:{index:08d}".ljust(size, "x")


def parse_numbered(data: str) -> tuple[int, int]:
    """(generation, index) of a ``numbered`` payload."""
    return int(data[0]), int(data[2:10])


# ------------------------------------------------------------------------ process setup


def child_setup(cpu: int | None) -> dict[str, Any]:
    """First thing in every child: pin it to ``cpu``, raise its file limit, quiet logs,
    leave Ctrl-C to the orchestrator.

    Returns what was achieved (recorded in the results): the CPUs the process may run on
    and its open-file limit. Pinning is done before grpcio or asyncio start threads, and
    every thread already running is pinned too, so all threads inherit it.
    """
    # Ctrl-C reaches the whole process group: the orchestrator alone handles it and ends
    # the children (a child whose orchestrator is gone sees its pipe close and exits)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pinned: list[int] | None = None
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, {cpu})
            for task in os.listdir("/proc/self/task"):
                os.sched_setaffinity(int(task), {cpu})
        except OSError as exc:
            print(f"benchmark child: could not pin to CPU {cpu}: {exc}", file=sys.stderr)
    if hasattr(os, "sched_getaffinity"):
        pinned = sorted(os.sched_getaffinity(0))
    # retries and disconnects are expected in these runs (restarts, closing 10,000 streams)
    logging.getLogger("longlived").setLevel(logging.ERROR)
    logging.getLogger("grpclib").setLevel(logging.CRITICAL)
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    return {"cpus": pinned, "nofile": raise_nofile()}


def raise_nofile() -> int:
    """Raise this process's open-file limit to its hard limit; returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return int(soft if soft != resource.RLIM_INFINITY else hard)


def listen_overflows() -> int | None:
    """The system's count of connections dropped by full accept queues (``ListenOverflows``).

    System-wide, so another program's connections count too; during a trial on an
    otherwise quiet machine it counts the SYNs the server under test did not accept in time
    (each costs the client a 1 s, then 3 s, ... SYN retransmission).
    """
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return None
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            if "ListenOverflows" in table:
                return int(table["ListenOverflows"])
    return None


def cpu_busy(cpu: int | None) -> float | None:
    """Seconds CPU ``cpu`` has been busy since boot, anyone's work (``/proc/stat``), steal
    time included; None without a CPU or without ``/proc``.

    Over a trial, that minus the pinned process's own CPU time is what other programs took
    of that CPU (a shared machine), in clock ticks (1/100 s).
    """
    if cpu is None:
        return None
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        name, *fields = line.split()
        if name == f"cpu{cpu}":
            ticks = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
            busy = sum(ticks) - ticks[3] - ticks[4]
            return busy / os.sysconf("SC_CLK_TCK")
    return None


def others(busy0: float | None, busy1: float | None, own: float, seconds: float) -> float | None:
    """Share of ``seconds`` that a CPU was busy with anything but ``own`` CPU seconds."""
    if busy0 is None or busy1 is None or seconds <= 0:
        return None
    return max(0.0, (busy1 - busy0) - own) / seconds


def rss_kb(pid: int | str = "self") -> int:
    """Resident memory of process ``pid`` (``VmRSS`` in ``/proc/<pid>/status``), KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


async def receive(conn: Connection, *, timeout: float) -> tuple[Any, ...]:
    """The next command or answer on ``conn``, waited for on the event loop.

    Raises:
        TimeoutError: nothing arrived within ``timeout`` seconds.
        EOFError: the other end closed the pipe.
    """
    loop = asyncio.get_running_loop()
    readable = asyncio.Event()
    loop.add_reader(conn.fileno(), readable.set)
    try:
        async with asyncio.timeout(timeout):
            while not conn.poll():
                readable.clear()
                await readable.wait()
    finally:
        loop.remove_reader(conn.fileno())
    message: tuple[Any, ...] = conn.recv()
    return message


def runner(loop: str) -> tuple[Callable[[Coroutine[Any, Any, None]], None], str]:
    """``uvloop.run`` for ``loop == "uvloop"`` when uvloop is installed, else
    ``asyncio.run``; and the name of the loop that is."""
    if loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run, "uvloop"
    return asyncio.run, "asyncio"


def stamp(message: bytes) -> int:
    """The publish stamp in a latency event, read from the encoded ``Response``."""
    # field 1 (data) comes first: tag 0x0A, a one-byte length, then "iiiiiiii:ssss...".
    if message[0] == 0x0A and message[1] < 0x80:
        return int(message[11:31])
    raise ValueError(f"unexpected message layout: {message[:16]!r}")


def summary(latencies: array[int]) -> dict[str, Any]:
    """p50/p90/p99/p99.9/max of ``latencies`` (ns) in ms, and a CDF for the charts."""
    values = sorted(latencies)
    if not values:
        return {"count": 0}

    def at(q: float) -> float:
        return values[min(len(values) - 1, int(q * len(values)))] / 1e6

    return {
        "count": len(values),
        "p50": at(0.50),
        "p90": at(0.90),
        "p99": at(0.99),
        "p999": at(0.999),
        "max": values[-1] / 1e6,
        "cdf": [round(at(i / 200), 3) for i in range(201)],
    }
