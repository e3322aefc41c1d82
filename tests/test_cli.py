"""The ``longlived`` command as a user runs it: real processes, signals, restarts."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable

import pytest

from longlived import (
    AuthSettings,
    BackoffSettings,
    LimitSettings,
    Request,
    ResilientClient,
    Settings,
    SubscriptionClosed,
    SubscriptionManager,
)
from longlived._logfields import fields
from longlived.cli import JsonFormatter, _parser, main
from tests.helpers import Subscription, channel_for, receive, running, subscription

TIMEOUT = 20
STOPPED = re.compile(r"Client ID (\d+) stopped: gave up after 1 failed attempts")
GOT = re.compile(r'Client ID (\d+) got response: "data mock for: (\d+)"')


class Process:
    """A ``python -m longlived`` child whose log lines are collected as they arrive."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._changed = asyncio.Event()
        self._reader = asyncio.ensure_future(self._read())

    @classmethod
    async def start(cls, *args: str) -> Process:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "longlived", *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        return cls(proc)

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            self.lines.append(raw.decode().rstrip("\n"))
            self._changed.set()
        self._changed.set()

    async def wait_for(self, predicate: Callable[[list[str]], bool]) -> None:
        """Wait until ``predicate(lines)`` holds (bounded by the caller)."""
        while not predicate(self.lines):
            if self._reader.done():
                raise AssertionError("process ended:\n" + "\n".join(self.lines))
            self._changed.clear()
            await self._changed.wait()

    async def stop(self, signum: int = signal.SIGINT) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(signum)
        async with asyncio.timeout(TIMEOUT):
            code = await self.proc.wait()
            await self._reader
        return code

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
        await self.proc.wait()
        await self._reader


def got_from(lines: list[str], start: int = 0) -> set[int]:
    """Client ids that logged their own mock data in ``lines[start:]``."""
    ids = set()
    for line in lines[start:]:
        if (match := GOT.search(line)) is not None:
            assert match.group(1) == match.group(2), line  # each client gets its own data
            ids.add(int(match.group(1)))
    return ids


@pytest.fixture
async def processes() -> AsyncIterator[list[Process]]:
    started: list[Process] = []
    yield started
    for process in started:
        await process.kill()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_demo_runs_ten_clients_and_stops_cleanly_on_sigint(
    processes: list[Process],
) -> None:
    demo = await Process.start(
        "demo", "--address", "127.0.0.1:0", "--interval", "0.2", "--stagger", "0.05"
    )
    processes.append(demo)
    async with asyncio.timeout(TIMEOUT):
        await demo.wait_for(lambda lines: got_from(lines) == set(range(1, 11)))
    assert await demo.stop(signal.SIGINT) == 0
    output = "\n".join(demo.lines)
    assert "Traceback" not in output
    assert "SIGINT received: shutting down" in output
    assert "Server closed" in output


async def test_demo_stops_after_duration(processes: list[Process]) -> None:
    demo = await Process.start(
        "demo", "--address", "127.0.0.1:0", "--count", "2", "--stagger", "0",
        "--interval", "0.1", "--duration", "1",
    )  # fmt: skip
    processes.append(demo)
    async with asyncio.timeout(TIMEOUT):
        assert await demo.proc.wait() == 0
        await demo._reader
    assert got_from(demo.lines) == {1, 2}


async def test_clients_survive_a_server_restart(processes: list[Process]) -> None:
    address = f"127.0.0.1:{free_port()}"
    fast = ["--address", address, "--interval", "0.2"]
    server = await Process.start("serve", *fast)
    processes.append(server)
    async with asyncio.timeout(TIMEOUT):
        await server.wait_for(lambda lines: any("Listening on" in line for line in lines))
    clients = await Process.start(
        "clients", *fast, "--count", "3", "--stagger", "0",
        "--backoff.initial", "0.2", "--backoff.max", "0.5",
    )  # fmt: skip
    processes.append(clients)
    async with asyncio.timeout(TIMEOUT):
        await clients.wait_for(lambda lines: got_from(lines) == {1, 2, 3})
        assert await server.stop(signal.SIGTERM) == 0
        # every client logs the failure and retries with a backoff delay
        await clients.wait_for(
            lambda lines: (
                {
                    int(m.group(1))
                    for line in lines
                    if (m := re.search(r"Client ID (\d+): .*resubscribing in", line))
                }
                == {1, 2, 3}
            )
        )
        mark = len(clients.lines)
        server = await Process.start("serve", *fast)
        processes.append(server)
        await clients.wait_for(lambda lines: got_from(lines, mark) == {1, 2, 3})
    assert await clients.stop(signal.SIGINT) == 0
    assert "Traceback" not in "\n".join(clients.lines + server.lines)


def help_flags(command: str, capsys: pytest.CaptureFixture[str]) -> set[str]:
    """The flags ``longlived COMMAND --help`` lists."""
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    return set(re.findall(r"^  (--[a-z.-]+)", capsys.readouterr().out, re.MULTILINE))


@pytest.mark.parametrize(
    ("command", "listed", "left_out"),
    [
        ("serve", {"--interval", "--queue.size", "--auth.tokens", "--tls.cert"},
         {"--count", "--topics", "--auth.token", "--heartbeat.interval", "--publish.via"}),
        ("clients", {"--count", "--topics", "--auth.token", "--backoff.max", "--tls.cert"},
         {"--interval", "--queue.size", "--auth.tokens", "--limits.reset-burst", "--redis.url"}),
        ("demo", {"--interval", "--queue.size", "--count", "--topics"}, {"--publish.via"}),
        ("publish", {"--publish.via", "--auth.token", "--limits.max-event-size", "--redis.url"},
         {"--interval", "--count", "--queue.size", "--auth.tokens", "--metrics.port"}),
    ],
)  # fmt: skip
def test_each_command_lists_the_settings_it_reads(
    capsys: pytest.CaptureFixture[str], command: str, listed: set[str], left_out: set[str]
) -> None:
    flags = help_flags(command, capsys)
    assert listed <= flags
    assert not left_out & flags


def test_a_setting_left_out_of_help_is_still_accepted() -> None:
    parser, sources = _parser()
    namespace = parser.parse_args(["serve", "--count", "3"])
    assert Settings(_cli_settings_source=sources["serve"](parsed_args=namespace)).count == 3


async def test_clients_exit_non_zero_once_every_client_has_stopped(
    processes: list[Process],
) -> None:
    clients = await Process.start(
        "clients", "--address", f"127.0.0.1:{free_port()}", "--count", "2", "--stagger", "0",
        "--backoff.max-attempts", "1",
    )  # fmt: skip
    processes.append(clients)
    async with asyncio.timeout(TIMEOUT):
        assert await clients.proc.wait() == 1
        await clients._reader
    stopped = {int(m.group(1)) for line in clients.lines if (m := STOPPED.search(line))}
    assert stopped == {1, 2}
    assert "Traceback" not in "\n".join(clients.lines)


@pytest.mark.parametrize("listener", ["gRPC", "metrics"])
def test_a_port_in_use_is_named_in_one_line(listener: str) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        where = ["--address", f"127.0.0.1:{port}"]
        if listener == "metrics":
            where = ["--address", "127.0.0.1:0", "--metrics.port", str(port)]
        result = subprocess.run(
            [sys.executable, "-m", "longlived", "serve", *where],
            capture_output=True, text=True, timeout=TIMEOUT, check=False,
        )  # fmt: skip
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"longlived: cannot listen on 127.0.0.1:{port} ({listener}): address already in use"
    )


# ----------------------------------------------------------------------- logs

PEER = re.compile(r"127\.0\.0\.1:\d+")


def test_json_lines_have_utc_milliseconds_and_the_fields_passed() -> None:
    record = logging.getLogger("longlived.test").makeRecord(
        "longlived.test", logging.WARNING, __file__, 1, "Client ID %d: retry in %.2fs",
        (0, 0.25), None, extra=fields(subscriber=0, delay=0.25, token=""),
    )  # fmt: skip
    record.created = 1_700_000_000.5  # 2023-11-14T22:13:20.5 UTC, whatever the local zone
    assert json.loads(JsonFormatter().format(record)) == {
        "time": "2023-11-14T22:13:20.500Z",
        "level": "WARNING",
        "logger": "longlived.test",
        "message": "Client ID 0: retry in 0.25s",
        "subscriber": 0,
        "delay": 0.25,
    }


async def test_json_logs_name_the_subscriber_the_peer_and_the_status(
    processes: list[Process],
) -> None:
    server = await Process.start(
        "serve", "--address", "127.0.0.1:0", "--interval", "0.1", "--log-format", "json",
        "--auth.tokens", '{"t-alice": "alice"}',
    )  # fmt: skip
    processes.append(server)
    async with asyncio.timeout(TIMEOUT):
        await server.wait_for(lambda lines: any("Listening on" in line for line in lines))
    listening = next(line for line in server.lines if "Listening on" in line)
    address = json.loads(listening)["message"].removeprefix("Listening on ")
    stranger = Settings(address=address, backoff=BackoffSettings(max_attempts=1))
    alice = stranger.model_copy(update={"auth": AuthSettings(token="t-alice")})
    async with (
        ResilientClient(5, settings=alice) as member,
        ResilientClient(6, settings=stranger) as other,
    ):
        async with asyncio.timeout(TIMEOUT):
            assert (await anext(aiter(member))).data == "data mock for: 5"
            with pytest.raises(SubscriptionClosed):
                await anext(aiter(other))
            await server.wait_for(lambda lines: any("Refused" in line for line in lines))
    assert await server.stop() == 0
    entries = [json.loads(line) for line in server.lines]
    (received,) = [e for e in entries if e["message"].startswith("Received subscribe")]
    assert received["subscriber"] == 5
    assert PEER.fullmatch(received["peer"])
    (refused,) = [e for e in entries if e["message"].startswith("Refused")]
    assert (refused["level"], refused["status"]) == ("WARNING", "UNAUTHENTICATED")
    assert PEER.fullmatch(refused["peer"])
    assert refused["peer"] != received["peer"]  # each names its own connection


# -------------------------------------------------------------------- publish


async def publish(*args: str, stdin: bytes | None = None) -> tuple[int, list[str], list[str]]:
    """Run ``longlived publish *args``: its exit code, stdout lines and stderr lines."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "longlived", "publish", *args,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with asyncio.timeout(TIMEOUT):
            out, err = await proc.communicate(stdin)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode().splitlines(), err.decode().splitlines()


async def events(stream: Subscription, count: int) -> list[tuple[str, str]]:
    """``(data, token)`` of the next ``count`` messages on ``stream``."""
    received: list[tuple[str, str]] = []
    async with asyncio.timeout(TIMEOUT):
        while len(received) < count:
            message = await stream.recv_message()
            assert message is not None
            received.append((message.data, message.token))
    return received


async def test_publish_text_on_a_topic(server: SubscriptionManager, quiet: Settings) -> None:
    channel = channel_for(quiet)
    try:
        async with subscription(channel, Request(id=1, topics=["news"])) as stream:
            code, out, err = await publish(
                "hello, world", "--topic", "news", "--address", quiet.address
            )
            assert (code, len(out)) == (0, 1), err
            assert await events(stream, 1) == [("hello, world", out[0])]
    finally:
        channel.close()
    assert "Traceback" not in "\n".join(err)


async def test_publish_text_to_one_id(server: SubscriptionManager, quiet: Settings) -> None:
    channel = channel_for(quiet)
    try:
        async with subscription(channel, 7) as seven, subscription(channel, 8) as eight:
            code, out, err = await publish("for 7", "--to", "7", "--address", quiet.address)
            assert (code, len(out)) == (0, 1), err
            assert await events(seven, 1) == [("for 7", out[0])]
            server.send(8, "for 8")
            assert await receive(eight, 1) == ["for 8"]  # 8's next message is its own
    finally:
        channel.close()


@pytest.mark.parametrize("text", [[], ["-"]], ids=["no-text", "dash"])
async def test_publish_one_event_per_line_of_stdin(
    server: SubscriptionManager, quiet: Settings, text: list[str]
) -> None:
    channel = channel_for(quiet)
    try:
        async with subscription(channel, 3) as stream:
            code, out, err = await publish(
                *text, "--to", "3", "--address", quiet.address, stdin=b"one\ntwo\r\nthree\n"
            )
            assert (code, len(out)) == (0, 3), err
            assert await events(stream, 3) == list(zip(["one", "two", "three"], out, strict=True))
    finally:
        channel.close()


async def test_publish_again_with_the_same_key_prints_duplicate(
    server: SubscriptionManager, quiet: Settings
) -> None:
    args = ("paid", "--topic", "orders", "--key", "order-42-paid", "--address", quiet.address)
    first = await publish(*args)
    again = await publish(*args)
    assert (first[0], again[0]) == (0, 0)
    assert again[1] == [f"{first[1][0]} duplicate"]
    assert server.hub.head.seq == 1  # emitted once


async def test_a_refused_publish_exits_non_zero_with_the_reason(
    listener: socket.socket, quiet: Settings
) -> None:
    secured = quiet.model_copy(
        update={
            "auth": AuthSettings(tokens={"t-alice": "alice", "t-bob": "bob"}, publishers=["alice"])
        }
    )
    async with running(secured, listener) as server:
        code, out, err = await publish("hi", "--address", quiet.address, "--auth.token", "t-bob")
        assert server.rejected == {"PERMISSION_DENIED": 1}  # refused once, not retried
    assert (code, out) == (1, [])
    assert err[-1] == "longlived: publish refused: PERMISSION_DENIED: bob may not publish"
    assert "Traceback" not in "\n".join(err)


async def test_publishing_stdin_stops_at_the_first_refused_line(
    listener: socket.socket, quiet: Settings
) -> None:
    small = quiet.model_copy(update={"limits": LimitSettings(max_event_size=64)})
    lines = b"fits\n" + b"x" * 100 + b"\nnever sent\n"
    async with running(small, listener) as server:
        code, out, err = await publish("--address", quiet.address, stdin=lines)
        assert server.hub.head.seq == 1  # only the first line was emitted
    assert (code, len(out)) == (1, 1)
    assert re.fullmatch(
        r"longlived: line 2: publish refused: RESOURCE_EXHAUSTED: "
        r"request of \d+ bytes exceeds the limit of 64",
        err[-1],
    )


async def test_publish_gives_up_when_retries_run_out() -> None:
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    code, out, err = await publish(
        "hi", "--address", address, "--backoff.max-attempts", "2", "--backoff.initial", "0.05"
    )
    assert (code, out) == (1, [])
    assert err[-1].startswith("longlived: publish failed: gave up after 2 failed attempts")
    assert any("retrying in" in line for line in err)  # the retry was logged


async def test_publish_help_names_its_arguments_beside_the_settings() -> None:
    code, out, _ = await publish("--help")
    assert code == 0
    help = "\n".join(out)
    for flag in ("TEXT", "--topic TOPIC", "--to ID", "--key KEY", "--topics", "--publish.timeout"):
        assert flag in help, flag


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["hi", "--topic", "t", "--to", "3"], "not allowed with argument"),
        (["hi", "--to", "-3"], "expected a subscriber id from 0 to 2147483647"),
        (["--key", "k"], "--key needs TEXT"),
    ],
)
async def test_publish_usage_errors_exit_2(args: list[str], message: str) -> None:
    code, out, err = await publish(*args, stdin=b"")
    assert (code, out) == (2, [])
    assert message in err[-1]


async def test_demo_runs_on_uvloop(processes: list[Process]) -> None:
    """``--event-loop uvloop``: the server listens where it says and the clients get events
    (on uvloop, ``manager.address`` once said port 0: its Server is no asyncio.Server)."""
    demo = await Process.start(
        "demo", "--event-loop", "uvloop", "--address", "127.0.0.1:0", "--count", "2",
        "--stagger", "0", "--interval", "0.1",
    )  # fmt: skip
    processes.append(demo)
    async with asyncio.timeout(TIMEOUT):
        await demo.wait_for(lambda lines: got_from(lines) == {1, 2})
    assert await demo.stop(signal.SIGINT) == 0
    [listening] = [line for line in demo.lines if "Listening on" in line]
    assert not listening.endswith(":0")
    assert any("Event loop: uvloop.Loop" in line for line in demo.lines)


def test_uvloop_asked_for_but_not_installed_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "uvloop" else real(name, *a)
    )
    assert main(["serve", "--event-loop", "uvloop", "--duration", "1"]) == 2
    err = capsys.readouterr().err
    assert "uvloop is not installed" in err
    assert "longlived[uvloop]" in err
