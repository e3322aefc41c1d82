"""The ``longlived`` command: ``serve``, ``clients`` and ``demo``.

Every command takes every setting as a flag (``--interval 0.5``, ``--backoff.max 30``);
flags override ``LONGLIVED_*`` env vars, which override ``.env``. This is the only module
that configures logging.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence

from pydantic import ValidationError
from pydantic_settings import CliSettingsSource, SettingsError

from longlived.client import ResilientClient
from longlived.errors import LonglivedError, ResumeExpired
from longlived.metrics import client_samples, on_loop, serve_metrics
from longlived.server import SubscriptionManager
from longlived.settings import Settings, format_validation_error

__all__ = ["main", "run_clients"]

log = logging.getLogger("longlived")

_COMMANDS = {
    "serve": "run the server: the Longlived service plus the mock generator",
    "clients": "run `count` resilient clients (ids 1..count), printing what they receive",
    "demo": "run the server and the clients in one process (Ctrl-C or --duration to stop)",
}


def _parser() -> tuple[argparse.ArgumentParser, dict[str, CliSettingsSource[Settings]]]:
    parser = argparse.ArgumentParser(
        prog="longlived",
        description="Long-lived gRPC server-streaming subscriptions. Every flag can also be "
        "set as an env var (shown in each command's --help) or in a .env file.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sources: dict[str, CliSettingsSource[Settings]] = {}
    for name, text in _COMMANDS.items():
        sub = commands.add_parser(name, help=text, description=text)
        sources[name] = CliSettingsSource(
            Settings,
            root_parser=sub,
            cli_kebab_case=True,
            cli_show_env_vars=True,
            cli_exit_on_error=False,
        )
    return parser, sources


class JsonFormatter(logging.Formatter):
    """One JSON object per log line: time, level, logger, message (and the exception)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _configure_logging(level: str, fmt: str = "plain") -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)-7s %(message)s",
        datefmt="%Y/%m/%d %H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    if fmt == "json":
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonFormatter())
    # grpclib logs every cancelled request at INFO; a client leaving is ours to report.
    logging.getLogger("grpclib").setLevel(max(logging.WARNING, logging.getLevelName(level)))


async def run_clients(
    settings: Settings, stop: asyncio.Event, *, serve_client_metrics: bool = False
) -> None:
    """Start ``settings.count`` clients with ids 1..count, ``stagger`` seconds apart.

    Each logs ``Client ID <n> got response: "<data>"`` for every message, until ``stop``.
    With ``serve_client_metrics`` and ``settings.metrics.port``, their summed counters are
    served on ``/metrics``.
    """
    clients: list[ResilientClient] = []

    async def one(id: int) -> None:
        try:
            client = ResilientClient(id, settings=settings)
            clients.append(client)
            async with client:
                while True:
                    try:
                        async for response in client:
                            log.info('Client ID %d got response: "%s"', id, response.data)
                        return
                    except ResumeExpired as exc:
                        # the demo keeps no state to resync: carry on with live events
                        log.warning("Client ID %d: events lost (%s); continuing", id, exc.reason)
        except LonglivedError as exc:
            log.error("Client ID %d stopped: %s", id, exc)

    metrics = None
    if serve_client_metrics and settings.metrics.port is not None:
        metrics = serve_metrics(
            on_loop(lambda: client_samples(clients), asyncio.get_running_loop()),
            host=settings.metrics.host,
            port=settings.metrics.port,
        )
        log.info("Metrics on http://%s:%d/metrics", settings.metrics.host, metrics.port)
    try:
        async with asyncio.TaskGroup() as tg:
            tasks = []
            for id in range(1, settings.count + 1):
                tasks.append(tg.create_task(one(id), name=f"client-{id}"))
                if id < settings.count and await _wait(stop, settings.stagger):
                    break
            await stop.wait()
            for task in tasks:
                task.cancel()
    finally:
        if metrics is not None:
            await asyncio.to_thread(metrics.close)


async def _clients(settings: Settings, stop: asyncio.Event) -> None:
    await run_clients(settings, stop, serve_client_metrics=True)


async def _wait(event: asyncio.Event, seconds: float) -> bool:
    """Wait up to ``seconds`` for ``event``; True if it was set."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()
    return event.is_set()


async def _serve(settings: Settings, stop: asyncio.Event) -> None:
    async with SubscriptionManager(settings):
        await stop.wait()


async def _demo(settings: Settings, stop: asyncio.Event) -> None:
    async with SubscriptionManager(settings) as manager:
        # with port 0 the server picked a free port: point the clients at it
        await run_clients(settings.model_copy(update={"address": manager.address}), stop)


def _run(command: Callable[[Settings, asyncio.Event], Awaitable[None]], settings: Settings) -> None:
    """Run ``command`` until SIGINT/SIGTERM or ``settings.duration``; a second signal aborts."""

    async def runner() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        main_task = asyncio.current_task()
        assert main_task is not None

        def on_signal(signum: int) -> None:
            if stop.is_set():
                log.warning("Second %s: exiting now", signal.Signals(signum).name)
                main_task.cancel()
                return
            log.info("%s received: shutting down", signal.Signals(signum).name)
            stop.set()

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, on_signal, signum)
        if settings.duration is not None:
            loop.call_later(settings.duration, stop.set)
        await command(settings, stop)

    with contextlib.suppress(asyncio.CancelledError):
        asyncio.run(runner())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``longlived`` console script; returns the exit code."""
    parser, sources = _parser()
    try:
        namespace = parser.parse_args(argv)
        settings = Settings(_cli_settings_source=sources[namespace.command](parsed_args=namespace))
    except ValidationError as exc:
        for line in format_validation_error(exc).splitlines():
            print(f"longlived: {line}", file=sys.stderr)
        return 2
    except SettingsError as exc:
        print(f"longlived: {exc}", file=sys.stderr)
        return 2
    _configure_logging(settings.log_level, settings.log_format)
    commands = {"serve": _serve, "clients": _clients, "demo": _demo}
    try:
        _run(commands[namespace.command], settings)
    except OSError as exc:
        log.error("%s", exc)
        return 1
    return 0
