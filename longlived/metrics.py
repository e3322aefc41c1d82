"""Prometheus metrics, read at scrape time from the counters servers and clients keep.

The hot path only bumps plain integers; a ``StatsCollector`` turns them into Prometheus
metric families when ``/metrics`` is scraped. Each server or client registers its collector
in its own ``CollectorRegistry``, so several can live in one process.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = [
    "ClientCounters",
    "MetricsServer",
    "Sample",
    "StatsCollector",
    "client_samples",
    "on_loop",
    "serve_metrics",
]


@dataclass(frozen=True, slots=True)
class Sample:
    """One metric: name (without ``_total``), kind, help text, and value or labelled values."""

    name: str
    kind: Literal["counter", "gauge"]
    help: str
    value: float | Mapping[str, float]
    label: str = ""


class StatsCollector(Collector):
    """Collects the samples ``read()`` returns, each time the registry is scraped."""

    def __init__(self, read: Callable[[], list[Sample]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        for sample in self._read():
            labels = [sample.label] if sample.label else None
            family: CounterMetricFamily | GaugeMetricFamily
            if sample.kind == "counter":
                family = CounterMetricFamily(sample.name, sample.help, labels=labels)
            else:
                family = GaugeMetricFamily(sample.name, sample.help, labels=labels)
            if isinstance(sample.value, Mapping):
                for label, value in sorted(sample.value.items()):
                    family.add_metric([label], value)
            else:
                family.add_metric([], sample.value)
            yield family


class ClientCounters(Protocol):
    """What ``client_samples`` reads from a client."""

    failures: int
    delivered: int
    duplicates: int
    resets: int

    @property
    def connected(self) -> asyncio.Event: ...


def client_samples(clients: Iterable[ClientCounters]) -> list[Sample]:
    """Counters summed over ``clients`` (one process may run many)."""
    clients = list(clients)
    return [
        Sample(
            "longlived_client_reconnects",
            "counter",
            "Resubscriptions after a failure.",
            sum(c.failures for c in clients),
        ),
        Sample(
            "longlived_client_messages",
            "counter",
            "DATA messages handed to the app.",
            sum(c.delivered for c in clients),
        ),
        Sample(
            "longlived_client_duplicates",
            "counter",
            "Messages dropped as already delivered.",
            sum(c.duplicates for c in clients),
        ),
        Sample(
            "longlived_client_resets",
            "counter",
            "RESET messages received.",
            sum(c.resets for c in clients),
        ),
        Sample(
            "longlived_client_connected",
            "gauge",
            "Clients with an open stream.",
            sum(c.connected.is_set() for c in clients),
        ),
    ]


@dataclass
class MetricsServer:
    """A running ``/metrics`` endpoint."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        """The port it listens on."""
        return int(self.server.server_address[1])

    def close(self) -> None:
        """Stop serving."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def on_loop(
    read: Callable[[], list[Sample]], loop: asyncio.AbstractEventLoop, *, timeout: float = 5.0
) -> Callable[[], list[Sample]]:
    """``read``, but run on ``loop``'s thread: the counters it reads belong to that loop.

    The scrape thread hands the call over and waits up to ``timeout`` seconds for it.
    """

    def threadsafe() -> list[Sample]:
        future: concurrent.futures.Future[list[Sample]] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(read())
            except BaseException as exc:  # handed to the scrape thread, which reports it
                future.set_exception(exc)

        loop.call_soon_threadsafe(run)
        return future.result(timeout)

    return threadsafe


def serve_metrics(read: Callable[[], list[Sample]], *, host: str, port: int) -> MetricsServer:
    """Serve the samples ``read()`` returns on ``http://host:port/metrics`` (a thread).

    ``read`` runs in the server's thread: wrap it with ``on_loop`` when what it reads
    belongs to an event loop.
    """
    registry = CollectorRegistry()
    registry.register(StatsCollector(read))
    server, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsServer(server, thread)
