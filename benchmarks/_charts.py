"""PNG charts of the results (matplotlib, headless): one per workload."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks._bench import Cell

__all__ = ["charts"]

COLORS = {
    "longlived": "#1f77b4",
    "longlived+uvloop": "#9467bd",
    "longlived+redis": "#17becf",
    "grpc.aio": "#ff7f0e",
    "grpclib": "#2ca02c",
    "floor": "#7f7f7f",
}


def charts(by_workload: dict[str, list[Cell]], out: Path, title: str) -> list[Path]:
    """Write ``<workload>.png`` into ``out`` for each workload that ran; the paths."""
    import matplotlib

    matplotlib.use("Agg")
    written = []
    for name, draw in (
        ("fanout", _fanout),
        ("latency", _latency),
        ("idle", _idle),
        ("reconnect", _reconnect),
    ):
        cells = by_workload.get(name)
        if not cells:
            continue
        path = out / f"{name}.png"
        draw(cells, path, title)
        written.append(path)
    return written


def _bars(ax: Any, cells: Sequence[Cell], metric: str, servers: Sequence[str]) -> None:
    """Grouped bars of ``metric``'s median per cell and server, min-max as error bars."""
    width = 0.8 / max(len(servers), 1)
    for k, server in enumerate(servers):
        xs: list[float] = []
        mids: list[float] = []
        errs: list[list[float]] = [[], []]
        for i, cell in enumerate(cells):
            value = cell.stat(server, metric)
            if value is None:
                continue
            xs.append(i + (k - (len(servers) - 1) / 2) * width)
            mids.append(value.median)
            errs[0].append(value.median - value.lo)
            errs[1].append(value.hi - value.median)
        ax.bar(xs, mids, width, yerr=errs, capsize=2, label=server, color=COLORS.get(server))
    ax.set_xticks(range(len(cells)), [c.label for c in cells], fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def _save(fig: Any, path: Path, title: str) -> None:
    """Title ``fig`` with the run's header, write it to ``path`` and free it."""
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _servers(cells: Sequence[Cell]) -> list[str]:
    seen: list[str] = []
    for cell in cells:
        seen += [s for s in cell.servers if s not in seen]
    return seen


def _fanout(cells: Sequence[Cell], path: Path, title: str) -> None:
    import matplotlib.pyplot as plt

    variants = sorted({c.params["variant"] for c in cells}, key=["one", "burst"].index)
    fig, axes = plt.subplots(1, len(variants), figsize=(6 * len(variants), 4), squeeze=False)
    for ax, variant in zip(axes[0], variants, strict=True):
        group = [c for c in cells if c.params["variant"] == variant]
        _bars(ax, group, "server_us_per_msg", _servers(group))
        per_turn = group[0].params["per_turn"]
        ax.set_title(f"fanout, {variant} ({per_turn} event{'s' * (per_turn > 1)} per loop turn)")
        ax.set_ylabel("server CPU us per delivered message")
        ax.legend(fontsize=8)
    _save(fig, path, title)


def _latency(cells: Sequence[Cell], path: Path, title: str) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(cells), figsize=(6 * len(cells), 4), squeeze=False)
    for ax, cell in zip(axes[0], cells, strict=True):
        for server in cell.servers:
            samples = sorted(cell.samples.get(server, []), key=lambda s: float(s["p99_ms"]))
            if not samples:
                continue
            cdf = samples[len(samples) // 2]["cdf_ms"]  # the round with the median p99
            ax.plot(
                cdf,
                [i / (len(cdf) - 1) for i in range(len(cdf))],
                label=server,
                color=COLORS.get(server),
            )
        ax.set_xscale("log")
        ax.set_xlabel("publish to receive, ms (log)")
        ax.set_ylabel("share of deliveries")
        ax.set_title(f"latency, {cell.label}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, path, title)


def _idle(cells: Sequence[Cell], path: Path, title: str) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(cells)), 4))
    _bars(ax, cells, "kib_per_stream", _servers(cells))
    ax.set_title("idle: server memory per open stream")
    ax.set_ylabel("KiB per stream (VmRSS delta / N)")
    ax.legend(fontsize=8)
    _save(fig, path, title)


def _reconnect(cells: Sequence[Cell], path: Path, title: str) -> None:
    import matplotlib.pyplot as plt

    cell = cells[0]
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, server in enumerate(cell.servers):
        value = cell.stat(server, "again_seconds")
        bound = cell.stat(server, "bound_seconds")
        if value is None:
            continue
        err = [[value.median - value.lo], [value.hi - value.median]]
        ax.bar([i], [value.median], 0.6, yerr=err, capsize=3, color=COLORS.get(server))
        if bound is not None:
            ax.hlines(bound.median, i - 0.35, i + 0.35, colors="red", linestyles="dashed")
    ax.set_xticks(range(len(cell.servers)), cell.servers, fontsize=8)
    ax.set_ylabel("seconds from server ready until all receive")
    ax.set_title(f"reconnect, {cell.label} (dashed: max(5 s, one backoff delay))")
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path, title)
