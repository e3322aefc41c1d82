"""The ``longlived`` command: ``serve``, ``clients``, ``demo`` and ``publish``.

Every command takes every setting as a flag (``--interval 0.5``, ``--backoff.max 30``), and
its ``--help`` lists those it reads; flags override ``LONGLIVED_*`` env vars, which override
``.env``. This is the only module
that configures logging.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import importlib.util
import json
import logging
import queue
import signal
import sys
import threading
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TextIO, TypeVar

from pydantic import ValidationError
from pydantic_settings import CliSettingsSource, SettingsError

from longlived._aio import wait_first
from longlived._wire import MAX_ID
from longlived.client import ResilientClient
from longlived.errors import ListenError, LonglivedError, PublishRefused, ResumeExpired
from longlived.metrics import client_samples, on_loop, serve_metrics
from longlived.publisher import Publisher
from longlived.server import SubscriptionManager
from longlived.settings import Settings, format_settings_error, format_validation_error

__all__ = ["main", "run_clients"]

log = logging.getLogger("longlived")

T = TypeVar("T")

_COMMANDS = {
    "serve": "run the server: the Longlived service plus the mock generator",
    "clients": "run `count` resilient clients (ids 1..count), printing what they receive",
    "demo": "run the server and the clients in one process (Ctrl-C or --duration to stop)",
    "publish": "publish TEXT as one event, or each line of stdin as one, and print the "
    "position (token) of each; exits non-zero if a publish is refused or retries run out",
}

_SUBSCRIBING = {"count", "stagger", "package", "connect_timeout", "topics", "heartbeat.interval",
                "heartbeat.misses"}  # fmt: skip
"""Settings only the clients that subscribe read."""
_SERVING = {"interval", "source", "max_streams_per_connection", "drain_timeout", "health", "state",
            "max_connection_age", "reflection", "queue", "replay", "heartbeat.min_interval",
            "auth.tokens", "auth.publishers", "auth.public_methods", "publish.dedup_max_keys",
            "limits.max_subscribers", "limits.max_message_size", "limits.admission_timeout",
            "limits.max_pending_streams", "limits.max_metadata_size", "limits.resets_per_second",
            "limits.reset_burst", "redis.claim_ttl"}  # fmt: skip
"""Settings only the server reads."""
_CALLING = {"auth.token", "tls.enabled", "tls.server_name"}
"""Settings only the side that calls the server reads (clients and publishers)."""
_PUBLISHING = {"publish.timeout", "publish.via"}
"""Settings only the publisher reads."""
_HIDDEN = {
    "serve": _SUBSCRIBING | _CALLING | _PUBLISHING,
    "clients": _SERVING | {"publish", "redis", "limits"} | _PUBLISHING,
    "demo": _PUBLISHING,
    "publish": _SERVING | _SUBSCRIBING | {"heartbeat", "metrics"},
}
"""Per command, the settings (or whole groups) its ``--help`` leaves out: it never reads
them (they are still accepted, as their env vars are)."""

_EVENT_ARGS = ("event_text", "event_topic", "event_to", "event_key")
"""Namespace entries of ``publish``'s own arguments (no setting has these names)."""


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
        if name == "publish":
            _add_event_arguments(sub)
        sources[name] = CliSettingsSource(
            Settings,
            root_parser=sub,
            cli_kebab_case=True,
            cli_show_env_vars=True,
            cli_exit_on_error=False,
        )
        for action in sub._actions:
            if action.dest in _HIDDEN[name] or action.dest.split(".")[0] in _HIDDEN[name]:
                action.help = argparse.SUPPRESS
    return parser, sources


def _add_event_arguments(parser: argparse.ArgumentParser) -> None:
    """``publish``'s TEXT, ``--topic`` and ``--to``: what to publish, not settings."""
    parser.add_argument(
        "event_text", nargs="?", metavar="TEXT",
        help="the event's data; `-` or none: one event per line of stdin",
    )  # fmt: skip
    target = parser.add_mutually_exclusive_group()
    target.add_argument(
        "--topic", dest="event_topic", default="", metavar="TOPIC",
        help="publish on this topic: its subscribers and those with no topics get it "
        "(`--topics` is the clients' filter, not this)",
    )  # fmt: skip
    target.add_argument(
        "--to", dest="event_to", type=_subscriber_id, metavar="ID",
        help="send to this one subscriber id only",
    )  # fmt: skip
    parser.add_argument(
        "--key", dest="event_key", metavar="KEY",
        help="idempotency key of TEXT (default: a fresh random one, as for each stdin line): "
        "run again with the same key within the server's dedup window, nothing is published "
        "and the first token is printed with `duplicate`",
    )  # fmt: skip


def _subscriber_id(text: str) -> int:
    if not (text.isascii() and text.isdecimal()) or int(text) > MAX_ID:
        raise argparse.ArgumentTypeError(
            f"expected a subscriber id from 0 to {MAX_ID}, got {text!r}"
        )
    return int(text)


_RECORD_ATTRIBUTES = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}
"""What every ``LogRecord`` has; the rest came in a call's ``extra=`` (``_logfields``)."""


class JsonFormatter(logging.Formatter):
    """One JSON object per log line: time (UTC, milliseconds), level, logger, message, the
    fields the call passed in ``extra=`` (subscriber, peer, status, token, delay), and the
    exception."""

    def format(self, record: logging.LogRecord) -> str:
        time = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        entry: dict[str, object] = {
            "time": time.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, value in vars(record).items():
            if name not in _RECORD_ATTRIBUTES and name not in entry:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


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
) -> int:
    """Start ``settings.count`` clients with ids 1..count, ``stagger`` seconds apart.

    Each logs ``Client ID <n> got response: "<data>"`` for every message, until ``stop``,
    or until every client has stopped on an error it does not retry (a refusal, retries
    exhausted): then nobody is left to wait for. With ``serve_client_metrics`` and
    ``settings.metrics.port``, their summed counters are served on ``/metrics``.

    Returns:
        1 if every client stopped on an error, else 0 (the exit code).
    """
    clients: list[ResilientClient] = []
    stopped: list[int] = []
    all_stopped = asyncio.Event()

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
            stopped.append(id)
            if len(stopped) == settings.count:
                log.error("Every client stopped: exiting")
                all_stopped.set()

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
            await wait_first(stop, all_stopped)
            for task in tasks:
                task.cancel()
    finally:
        if metrics is not None:
            await asyncio.to_thread(metrics.close)
    return 1 if all_stopped.is_set() else 0


async def _clients(settings: Settings, stop: asyncio.Event) -> int:
    return await run_clients(settings, stop, serve_client_metrics=True)


async def _wait(event: asyncio.Event, seconds: float) -> bool:
    """Wait up to ``seconds`` for ``event``; True if it was set."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()
    return event.is_set()


async def _serve(settings: Settings, stop: asyncio.Event) -> None:
    async with SubscriptionManager(settings):
        await stop.wait()


async def _demo(settings: Settings, stop: asyncio.Event) -> int:
    async with SubscriptionManager(settings) as manager:
        # with port 0 the server picked a free port: point the clients at it
        return await run_clients(settings.model_copy(update={"address": manager.address}), stop)


class _Lines:
    """The lines of a text stream, read one at a time, on demand, by a daemon thread.

    asyncio cannot watch a regular file (``longlived publish < events.txt``), and a worker
    of the default executor blocked in ``readline`` on a terminal would hold up the exit.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._wanted: queue.SimpleQueue[asyncio.Future[str]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def next(self) -> asyncio.Future[str]:
        """The next line, with its line break ("" at the end); cancel it to stop waiting."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._read, name="longlived-stdin", daemon=True)
            self._thread.start()
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._wanted.put(future)
        return future

    def _read(self) -> None:
        while True:
            future = self._wanted.get()
            try:
                result: str | BaseException = self._stream.readline()
            except Exception as exc:  # handed to the reader, raised there
                result = exc
            try:
                future.get_loop().call_soon_threadsafe(_settle, future, result)
            except RuntimeError:  # the loop is closed: nobody waits for lines any more
                return


def _settle(future: asyncio.Future[str], result: str | BaseException) -> None:
    if future.done():  # the reader stopped waiting
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


async def _unless_stopped(future: asyncio.Future[T], stop: asyncio.Event) -> T | None:
    """The result of ``future``, or None (and ``future`` cancelled) once ``stop`` is set."""
    stopper: asyncio.Future[object] = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait((future, stopper), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        future.cancel()  # a no-op once it is done
    return None if future.cancelled() else future.result()


@dataclass
class _Publish:
    """The ``publish`` command: what to publish, and how it went."""

    text: str | None
    topic: str
    to: int | None
    key: str | None = None
    failure: str | None = None
    """Why it stopped early (a refusal, retries exhausted), for the last line of stderr."""
    done: bool = False
    """It ran to its end (False: a second signal cut a publish short)."""
    line: int = 0
    """The stdin line being published."""

    async def __call__(self, settings: Settings, stop: asyncio.Event) -> None:
        async with Publisher(settings=settings) as publisher:
            if self.text is not None and self.text != "-":
                await self._one(publisher, self.text, self.key)
            else:
                await self._lines(publisher, _Lines(sys.stdin), stop)
        self.done = True

    async def _lines(self, publisher: Publisher, lines: _Lines, stop: asyncio.Event) -> None:
        """Publish each line until the end, a failure or ``stop`` (which stops the reading;
        the event being published still goes out)."""
        while self.failure is None:
            try:
                line = await _unless_stopped(lines.next(), stop)
            except (OSError, ValueError) as exc:  # unreadable, or not text
                self.failure = f"cannot read stdin: {exc}"
                return
            if not line:
                return
            self.line += 1
            await self._one(publisher, line.rstrip("\r\n"))

    async def _one(self, publisher: Publisher, data: str, key: str | None = None) -> None:
        try:
            published = await publisher.publish(
                data, topic=self.topic, to=self.to, idempotency_key=key
            )
        except PublishRefused as exc:
            self.failure = f"publish refused: {exc}"
        except LonglivedError as exc:
            self.failure = f"publish failed: {exc}"
        else:
            print(published.position.token + (" duplicate" if published.duplicate else ""),
                  flush=True)  # fmt: skip

    def outcome(self) -> int:
        """Report a failure on stderr; the exit code."""
        where = f"line {self.line}: " if self.line else ""
        if not self.done:
            print(f"longlived: {where}interrupted: that event may or may not have been "
                  "published", file=sys.stderr)  # fmt: skip
            return 1
        if self.failure is not None:
            print(f"longlived: {where}{self.failure}", file=sys.stderr)
            return 1
        return 0


Command = Callable[[Settings, asyncio.Event], Awaitable[int | None]]
"""A command: runs until the event is set (or it is done); its exit code, if it has one."""


def _run(command: Command, settings: Settings) -> int | None:
    """Run ``command`` until SIGINT/SIGTERM or ``settings.duration``; a second signal aborts.

    Returns what ``command`` returned (None if a second signal cut it short)."""

    async def runner() -> int | None:
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
        if settings.event_loop != "asyncio":
            log.info("Event loop: %s.%s", type(loop).__module__, type(loop).__qualname__)
        if settings.duration is not None:
            loop.call_later(settings.duration, stop.set)
        return await command(settings, stop)

    with contextlib.suppress(asyncio.CancelledError):
        return _event_loop(settings.event_loop)(runner())
    return None


def _event_loop(name: str) -> Callable[[Coroutine[Any, Any, T]], T]:
    """``asyncio.run``, or ``uvloop.run`` for ``event_loop = uvloop`` (``main`` has checked
    that uvloop is there)."""
    if name != "uvloop":
        return asyncio.run
    import uvloop

    run: Callable[[Coroutine[Any, Any, T]], T] = uvloop.run
    return run


def _missing_loop(name: str) -> str | None:
    """Why ``event_loop = name`` cannot run here, or None."""
    if name == "uvloop" and importlib.util.find_spec("uvloop") is None:
        return (
            "event_loop is uvloop, but uvloop is not installed "
            "(pip install 'longlived[uvloop]', or --event-loop asyncio)"
        )
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``longlived`` console script; returns the exit code."""
    parser, sources = _parser()
    try:
        namespace = parser.parse_args(argv)
        event = {name: vars(namespace).pop(name, None) for name in _EVENT_ARGS}
        if event["event_key"] is not None and event["event_text"] in (None, "-"):
            parser.error("publish: --key needs TEXT (each stdin line gets a key of its own)")
        if event["event_key"] == "":
            parser.error("publish: --key must not be empty")
        settings = Settings(_cli_settings_source=sources[namespace.command](parsed_args=namespace))
    except ValidationError as exc:
        for line in format_validation_error(exc).splitlines():
            print(f"longlived: {line}", file=sys.stderr)
        return 2
    except SettingsError as exc:
        print(f"longlived: {format_settings_error(exc)}", file=sys.stderr)
        return 2
    missing = _missing_loop(settings.event_loop)
    if missing is not None:
        print(f"longlived: {missing}", file=sys.stderr)
        return 2
    _configure_logging(settings.log_level, settings.log_format)
    publish = _Publish(
        event["event_text"], event["event_topic"] or "", event["event_to"], event["event_key"]
    )
    commands: dict[str, Command] = {
        "serve": _serve, "clients": _clients, "demo": _demo, "publish": publish,
    }  # fmt: skip
    try:
        code = _run(commands[namespace.command], settings)
    except ListenError as exc:
        print(f"longlived: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        log.error("%s", exc)
        return 1
    return publish.outcome() if namespace.command == "publish" else code or 0
