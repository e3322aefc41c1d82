"""What every workload's trials share: the options, the child processes, the results.

A ``Cell`` is one setting of one workload (say fanout, one event per turn, N = 100); it
holds, per server, one sample per round. Summaries are medians with the min-max range
over rounds; a ratio between two servers is computed within each round (they ran minutes
apart at most, in rotated order) and then summarised the same way.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import _loadgen, _serve
from benchmarks._child import SLACK, Child, shared_counter

__all__ = [
    "SERVERS",
    "UVLOOP",
    "Bench",
    "Cell",
    "Stat",
    "extra_servers",
    "loop_of",
    "rotate",
    "spec",
    "stat",
]

SERVERS = ("longlived", "grpc.aio", "grpclib")
"""The servers every workload runs side by side (``floor`` joins fanout when asked)."""

UVLOOP = "longlived+uvloop"
"""longlived on uvloop: joins fanout, latency and idle when uvloop is installed."""


def loop_of(server: str) -> str:
    """The event loop the process of ``server`` runs."""
    return "uvloop" if server == UVLOOP else "asyncio"


def extra_servers(args: argparse.Namespace) -> list[str]:
    """Servers besides ``SERVERS`` that fanout and latency run: floor, longlived+uvloop."""
    extra = ["floor"] if args.floor else []
    return [UVLOOP, *extra] if args.uvloop else extra


@dataclass(frozen=True, slots=True)
class Stat:
    """Median and range of a value over rounds."""

    median: float
    lo: float
    hi: float
    n: int

    def show(self, digits: int = 1, *, unit: str = "") -> str:
        """``12.3 (11.0-14.1)``; no range for a single round."""
        mid = f"{self.median:,.{digits}f}{unit}"
        if self.n < 2:
            return mid
        return f"{mid} ({self.lo:,.{digits}f}-{self.hi:,.{digits}f})"


def stat(values: Sequence[float]) -> Stat | None:
    """The ``Stat`` of ``values``; None when there are none."""
    if not values:
        return None
    return Stat(statistics.median(values), min(values), max(values), len(values))


def rotate(items: Sequence[str], by: int) -> list[str]:
    """``items`` rotated left by ``by``: each round starts with another server."""
    k = by % len(items) if items else 0
    return [*items[k:], *items[:k]]


@dataclass
class Cell:
    """One setting of one workload, and its samples: per server, one per round."""

    workload: str
    label: str
    params: dict[str, Any]
    servers: list[str]
    samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def add(self, server: str, sample: dict[str, Any]) -> None:
        self.samples.setdefault(server, []).append(sample)

    def values(self, server: str, metric: str) -> list[float]:
        """``metric`` of ``server`` in every round it has a value in."""
        return [float(s[metric]) for s in self.samples.get(server, []) if s.get(metric) is not None]

    def stat(self, server: str, metric: str) -> Stat | None:
        return stat(self.values(server, metric))

    def ratio(self, metric: str, a: str, b: str) -> Stat | None:
        """``metric`` of ``a`` / ``metric`` of ``b``, within each round, summarised."""
        pairs = zip(self.samples.get(a, []), self.samples.get(b, []), strict=False)
        ratios = [
            float(x[metric]) / float(y[metric])
            for x, y in pairs
            if x.get(metric) is not None and y.get(metric) not in (None, 0)
        ]
        return stat(ratios)

    def to_json(self) -> dict[str, Any]:
        return {
            "workload": self.workload,
            "label": self.label,
            "params": self.params,
            "servers": self.servers,
            "samples": self.samples,
        }


class Bench:
    """The run's options and processes: one load generator, server processes on demand."""

    def __init__(self, args: argparse.Namespace, stubs_dir: Path) -> None:
        self.args = args
        self.stubs_dir = stubs_dir
        self.wait = args.timeout + SLACK
        self.loadgen = Child(
            "loadgen",
            _loadgen.main,
            args.loadgen_cpu,
            str(stubs_dir),
            args.timeout,
            args.loadgen_loop,
        )
        self.redis_url: str | None = None

    def server_process(self, server: str = "longlived") -> Child:
        """A fresh process for ``server``, pinned to the server CPU (the caller closes it)."""
        counter = shared_counter()
        child = Child(
            "server",
            _serve.main,
            self.args.server_cpu,
            str(self.stubs_dir),
            self.args.timeout,
            counter,
            loop_of(server),
        )
        child.counter = counter  # read after a kill -9
        return child

    def spec(self, server: str, **extra: Any) -> dict[str, Any]:
        """What the server process needs to start ``server``."""
        return spec(server, redis_url=self.redis_url, **extra)

    def close(self) -> None:
        self.loadgen.close()


def spec(server: str, *, redis_url: str | None = None, **extra: Any) -> dict[str, Any]:
    """The ``start`` command's spec for the server labelled ``server``."""
    if server == UVLOOP:
        return {"kind": "longlived", "name": server, **extra}
    if server == "longlived+redis":
        if redis_url is None:
            raise RuntimeError("longlived+redis needs a redis-server")
        return {"kind": "longlived", "name": server, "redis_url": redis_url, **extra}
    return {"kind": server, "name": server, **extra}
