"""Operating a server: gRPC health and reflection, Prometheus metrics, JSON logs.

Health and reflection are checked with grpcio's own stubs (``grpcio-health-checking``,
``grpcio-reflection``), as a load balancer, Kubernetes probe or ``grpcurl`` would use them.
Those stubs register ``grpc.health.v1`` and ``grpc.reflection.v1alpha`` in protobuf's default
descriptor pool, where grpclib's copies (imported by longlived) already are, so they run in
a child process: see ``test_grpcio_stubs_import_beside_longlived``.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
from grpclib.client import Channel
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError
from prometheus_client.parser import text_string_to_metric_families

from longlived import (
    AuthSettings,
    MetricsSettings,
    QueueSettings,
    Request,
    ResilientClient,
    Response,
    ResponseKind,
    ResumeExpired,
    Settings,
    SubscriptionManager,
)
from longlived.metrics import Sample, serve_metrics
from tests.helpers import Subscription, channel_for, receive, running, subscription

TIMEOUT = 10

STOCK_CLIENT = r"""
import json, sys

import grpc
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
# grpcio-reflection has no v1 stubs: call v1 through grpcio with grpclib's v1 messages
from grpclib.reflection.v1 import reflection_pb2 as reflection_v1_pb2

mode, address = sys.argv[1:]
channel = grpc.insecure_channel(address, options=[("grpc.enable_http_proxy", 0)])
health = health_pb2_grpc.HealthStub(channel)
serving_status = health_pb2.HealthCheckResponse.ServingStatus


def emit(value):
    print(json.dumps(value), flush=True)


def check(service):
    try:
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    except grpc.RpcError as exc:
        return exc.code().name
    return serving_status.Name(reply.status)


def describe(raw):
    file = descriptor_pb2.FileDescriptorProto.FromString(raw)
    return {
        "package": file.package,
        "messages": [message.name for message in file.message_type],
        "services": {
            service.name: [
                [m.name, m.input_type, m.output_type, m.server_streaming] for m in service.method
            ]
            for service in file.service
        },
    }


def reflect(info, messages, **query):
    try:
        [reply] = info(iter([messages.ServerReflectionRequest(**query)]), timeout=5)
    except grpc.RpcError as exc:
        return exc.code().name
    kind = reply.WhichOneof("message_response")
    if kind == "list_services_response":
        return sorted(service.name for service in reply.list_services_response.service)
    if kind == "error_response":
        return {"error": reply.error_response.error_code}
    return [describe(raw) for raw in reply.file_descriptor_response.file_descriptor_proto]


def reflection(info, messages):
    return {
        "services": reflect(info, messages, list_services=""),
        "longlived": reflect(info, messages, file_containing_symbol="longlived.Longlived"),
        "protos": reflect(info, messages, file_containing_symbol="protos.Longlived"),
        "health": reflect(info, messages, file_containing_symbol="grpc.health.v1.Health"),
        "unknown": reflect(info, messages, file_containing_symbol="no.such.Service"),
    }


if mode == "probe":
    v1 = channel.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_v1_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_v1_pb2.ServerReflectionResponse.FromString,
    )
    v1alpha = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo
    services = ["", "longlived.Longlived", "protos.Longlived", "no.such.Service"]
    emit({
        "health": {service: check(service) for service in services},
        "v1alpha": reflection(v1alpha, reflection_pb2),
        "v1": reflection(v1, reflection_v1_pb2),
    })
elif mode == "watch":
    call = health.Watch(health_pb2.HealthCheckRequest(service=""))
    try:
        for reply in call:
            emit({"status": serving_status.Name(reply.status)})
    except grpc.RpcError as exc:
        emit({"code": exc.code().name, "details": exc.details()})
    else:
        emit({"code": call.code().name, "details": call.details()})
channel.close()
"""
"""A grpcio health and reflection client: ``python -c STOCK_CLIENT probe|watch host:port``.

``probe`` prints one JSON object: health ``Check`` results by service, and reflection
answers (v1alpha and v1) for list_services and three file_containing_symbol queries, each a
value or the status code name. ``watch`` prints each ``Watch("")`` status, then the final code.
"""


# ------------------------------------------------------------------------------ helpers


@asynccontextmanager
async def child(*args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """``python *args`` with stdout and stderr piped; killed on the way out if still running."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def output_of(proc: asyncio.subprocess.Process) -> list[str]:
    """The rest of ``proc``'s stdout, as lines, once it exited with 0 (bounded by the caller)."""
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return out.decode().splitlines()


async def probe(address: str) -> Any:
    """What grpcio's health and reflection stubs see on the server at ``address``."""
    async with child("-c", STOCK_CLIENT, "probe", address) as proc, asyncio.timeout(TIMEOUT):
        [line] = await output_of(proc)
    return json.loads(line)


@dataclass(frozen=True, slots=True)
class Scrape:
    """One ``/metrics`` page: sample values by name (with labels), family types and help."""

    values: dict[str, float]
    types: dict[str, str]
    helps: dict[str, str]


# An http(s)_proxy in the environment must not route loopback scrapes elsewhere.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(url: str) -> str:
    with _DIRECT.open(url, timeout=TIMEOUT) as reply:
        text: str = reply.read().decode()
    return text


async def scrape(port: int | None) -> Scrape:
    """Fetch and parse ``http://127.0.0.1:<port>/metrics``."""
    assert port is not None, "the metrics endpoint is off"
    async with asyncio.timeout(TIMEOUT):
        text = await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/metrics")
    values, types, helps = {}, {}, {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        helps[family.name] = family.documentation
        for sample in family.samples:
            labels = ",".join(f'{key}="{value}"' for key, value in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return Scrape(values, types, helps)


V = TypeVar("V")


def pick(values: Mapping[str, V], *names: str) -> dict[str, V]:
    """``values`` of ``names`` only (missing ones are absent, so a comparison shows them)."""
    return {name: values[name] for name in names if name in values}


SERVER_METRICS = (
    "longlived_subscribers",
    "longlived_events_published_total",
    "longlived_messages_sent_total",
    "longlived_slow_subscriber_disconnects_total",
    "longlived_resumes_total",
    "longlived_resets_total",
)


@pytest.fixture
def metered(settings: Settings) -> Settings:
    """Quiet settings (the mock generator never fires) with ``/metrics`` on a free port."""
    return settings.model_copy(update={"interval": 3600.0, "metrics": MetricsSettings(port=0)})


async def next_message(stream: Subscription) -> Response:
    """The next message on a grpclib subscription (bounded)."""
    async with asyncio.timeout(TIMEOUT):
        message = await stream.recv_message()
    assert message is not None, "the stream ended"
    return message


# ---------------------------------------------------------------- health and reflection

LONGLIVED_FILE = {
    "package": "longlived",
    "messages": ["Request", "Response", "PublishRequest", "PublishReply"],
    "services": {
        "Longlived": [
            ["Subscribe", ".longlived.Request", ".longlived.Response", True],
            ["Unsubscribe", ".longlived.Request", ".longlived.Response", False],
            ["Publish", ".longlived.PublishRequest", ".longlived.PublishReply", False],
        ]
    },
}


PROTOS_FILE = {
    "package": "protos",
    "messages": [],
    "services": {
        "Longlived": [
            ["Subscribe", ".longlived.Request", ".longlived.Response", True],
            ["Unsubscribe", ".longlived.Request", ".longlived.Response", False],
        ]
    },
}


async def test_grpcio_health_and_reflection_clients_see_the_service(
    settings: Settings, listener: socket.socket
) -> None:
    async with running(settings, listener) as manager:
        assert manager.metrics_port is None  # metrics are off unless asked for
        seen = await probe(manager.address)
    assert pick(seen["health"], "", "longlived.Longlived", "no.such.Service") == {
        "": "SERVING",
        "longlived.Longlived": "SERVING",
        "no.such.Service": "NOT_FOUND",
    }
    for version in ("v1alpha", "v1"):
        reflection = seen[version]
        assert {"longlived.Longlived", "protos.Longlived", "grpc.health.v1.Health"} <= set(
            reflection["services"]
        )
        assert reflection["longlived"] == [LONGLIVED_FILE], version
        # the original proto's name, which the server answers too (no Publish there)
        assert reflection["protos"] == [PROTOS_FILE], version
        # grpcurl can describe the health service too
        [health] = reflection["health"]
        assert health["package"] == "grpc.health.v1"
        assert [m[0] for m in health["services"]["Health"]] == ["Check", "Watch"]
        assert reflection["unknown"] == {"error": Status.NOT_FOUND.value}


@pytest.mark.parametrize("off", ["health", "reflection"])
async def test_health_or_reflection_switched_off_is_unimplemented(
    settings: Settings, listener: socket.socket, off: str
) -> None:
    async with running(settings.model_copy(update={off: False}), listener) as manager:
        seen = await probe(manager.address)
    if off == "health":
        assert set(seen["health"].values()) == {"UNIMPLEMENTED"}
        for version in ("v1alpha", "v1"):
            # reflection lists only what is served
            assert seen[version]["services"] == ["longlived.Longlived", "protos.Longlived"]
    else:
        assert seen["health"][""] == "SERVING"
        for version in ("v1alpha", "v1"):
            assert set(seen[version].values()) == {"UNIMPLEMENTED"}


async def test_health_watch_sees_not_serving_when_the_server_drains(
    settings: Settings, listener: socket.socket
) -> None:
    async with (
        running(settings, listener) as manager,
        child("-c", STOCK_CLIENT, "watch", manager.address) as proc,
        asyncio.timeout(TIMEOUT),
    ):
        assert proc.stdout is not None
        assert json.loads(await proc.stdout.readline()) == {"status": "SERVING"}
        async with asyncio.TaskGroup() as tg:
            tg.create_task(manager.close())
            rest = [json.loads(line) for line in await output_of(proc)]
    # NOT_SERVING reaches the watcher on its open stream, then the server goes away
    assert rest[0] == {"status": "NOT_SERVING"}
    assert [entry.get("code") for entry in rest[1:]] == ["UNAVAILABLE"], rest


async def test_grpcio_stubs_import_beside_longlived() -> None:
    """An app may use grpcio's health and reflection clients beside longlived (grpclib's
    copies of those messages load only when a server with health/reflection starts)."""
    code = "import longlived, grpc_health.v1.health_pb2, grpc_reflection.v1alpha.reflection_pb2"
    async with child("-c", code) as proc, asyncio.timeout(TIMEOUT):
        await output_of(proc)


# ------------------------------------------------------------------------------ metrics


async def test_metrics_count_events_messages_and_subscribers(
    metered: Settings, listener: socket.socket
) -> None:
    events, ids = 4, [1, 2, 3]
    channel = channel_for(metered)
    try:
        async with running(metered, listener) as manager:
            port = manager.metrics_port
            assert port  # a real port, not 0 or None
            async with (
                subscription(channel, ids[0]) as one,
                subscription(channel, ids[1]) as two,
                subscription(channel, ids[2]) as three,
            ):
                for n in range(events):
                    manager.publish(f"event {n}")
                streams = (one, two, three)
                got = await asyncio.gather(*(receive(s, events) for s in streams))
                assert got == [[f"event {n}" for n in range(events)]] * len(ids)
                page = await scrape(port)
            assert pick(page.values, *SERVER_METRICS) == {
                "longlived_subscribers": len(ids),
                "longlived_events_published_total": events,
                "longlived_messages_sent_total": events * len(ids),
                "longlived_slow_subscriber_disconnects_total": 0,
                "longlived_resumes_total": 0,
                "longlived_resets_total": 0,
            }
            assert page.types["longlived_subscribers"] == "gauge"
            assert page.types["longlived_events_published"] == "counter"
            async with asyncio.timeout(TIMEOUT):
                await manager.wait_for(lambda: not manager.subscribers)
            assert (await scrape(port)).values["longlived_subscribers"] == 0
            await manager.close()
            # the endpoint goes away with the server
            with pytest.raises(urllib.error.URLError):
                await scrape(port)
    finally:
        channel.close()


async def test_metrics_count_resumes_and_resets(metered: Settings, listener: socket.socket) -> None:
    channel = channel_for(metered)
    try:
        async with running(metered, listener) as manager, subscription(channel, 1) as live:
            for n in range(3):
                manager.publish(f"event {n}")
            tokens = [(await next_message(live)).token for _ in range(3)]

            resume = Request(id=2, resume_token=tokens[0])
            async with subscription(channel, resume) as resumed:
                assert [(await next_message(resumed)).data for _ in range(2)] == [
                    "event 1",
                    "event 2",
                ]
                page = await scrape(manager.metrics_port)
            assert pick(page.values, "longlived_resumes_total", "longlived_resets_total") == {
                "longlived_resumes_total": 1,
                "longlived_resets_total": 0,
            }

            async with subscription(channel, Request(id=3, resume_token="garbage")) as reset:
                message = await next_message(reset)
                assert (message.kind, message.data) == (
                    ResponseKind.RESET,
                    "malformed resume token",
                )
                page = await scrape(manager.metrics_port)
            assert pick(page.values, "longlived_resumes_total", "longlived_resets_total") == {
                "longlived_resumes_total": 1,
                "longlived_resets_total": 1,
            }
            # 3 events: 3 live messages, 2 replayed, 1 RESET; the help text says so
            assert page.values["longlived_events_published_total"] == 3
            assert page.values["longlived_messages_sent_total"] == 6
            for counted in ("replayed", "heartbeats", "RESET"):
                assert counted in page.helps["longlived_messages_sent"]
    finally:
        channel.close()


class ThreadNoting(SubscriptionManager):
    """Notes which thread reads the counters."""

    readers: list[int]

    def stats(self) -> list[Sample]:
        self.readers.append(threading.get_ident())
        return super().stats()


async def test_counters_are_read_on_the_event_loop(
    metered: Settings, listener: socket.socket
) -> None:
    """The scrape thread used to read the loop's dicts while the loop changed them."""
    async with running(metered, listener, ThreadNoting) as manager:
        assert isinstance(manager, ThreadNoting)
        manager.readers = []
        page = await scrape(manager.metrics_port)
    assert page.values["longlived_subscribers"] == 0
    assert manager.readers == [threading.get_ident()]


LARGER_THAN_A_WINDOW = "x" * 70_000
"""An event the peer's 64 KiB window cannot take at once, so it is queued, not written
straight away as an event for a subscriber that is keeping up would be."""


async def test_metrics_count_a_slow_subscriber_cut_off(
    metered: Settings, listener: socket.socket
) -> None:
    small = metered.model_copy(update={"queue": QueueSettings(size=1, policy="disconnect")})
    channel = channel_for(small)
    try:
        async with running(small, listener) as manager:
            with pytest.raises(GRPCError) as info:
                async with subscription(channel, 1) as stream:
                    # no await in between: the writer cannot take the first before the second
                    manager.publish(LARGER_THAN_A_WINDOW)
                    manager.publish("overflows the queue of one")
                    async with asyncio.timeout(TIMEOUT):
                        while await stream.recv_message() is not None:
                            pass
            assert (info.value.status, info.value.message) == (
                Status.RESOURCE_EXHAUSTED,
                "subscriber too slow",
            )
            async with asyncio.timeout(TIMEOUT):
                await manager.wait_for(lambda: not manager.subscribers)
            page = await scrape(manager.metrics_port)
        assert pick(
            page.values,
            "longlived_subscribers",
            "longlived_slow_subscriber_disconnects_total",
            "longlived_resets_total",
        ) == {
            "longlived_subscribers": 0,
            "longlived_slow_subscriber_disconnects_total": 1,
            "longlived_resets_total": 0,
        }
    finally:
        channel.close()


async def test_metrics_count_a_slow_subscriber_reset_under_the_drop_policy(
    metered: Settings, listener: socket.socket
) -> None:
    small = metered.model_copy(update={"queue": QueueSettings(size=1, policy="drop")})
    channel = channel_for(small)
    try:
        async with (
            running(small, listener) as manager,
            subscription(channel, Request(id=1, accept_control=True)) as stream,
        ):
            # the opening heartbeat has been taken off the queue once it arrives
            assert (await next_message(stream)).kind == ResponseKind.HEARTBEAT
            manager.publish(LARGER_THAN_A_WINDOW)  # dropped
            manager.publish("overflows the queue of one")
            message = await next_message(stream)
            assert (message.kind, message.data) == (
                ResponseKind.RESET,
                "subscriber too slow: events dropped",
            )
            page = await scrape(manager.metrics_port)
        assert pick(
            page.values,
            "longlived_subscribers",
            "longlived_slow_subscriber_disconnects_total",
            "longlived_resets_total",
        ) == {
            "longlived_subscribers": 1,  # still subscribed: only the backlog went
            "longlived_slow_subscriber_disconnects_total": 1,
            "longlived_resets_total": 1,
        }
    finally:
        channel.close()


async def unsubscribe(channel: Channel, id: int, token: str) -> None:
    """``Unsubscribe(id)`` with ``authorization: Bearer <token>`` (bounded)."""
    async with (
        asyncio.timeout(TIMEOUT),
        channel.request(
            "/longlived.Longlived/Unsubscribe", Cardinality.UNARY_UNARY, Request, Response,
            metadata={"authorization": f"Bearer {token}"},
        ) as stream,
    ):  # fmt: skip
        await stream.send_message(Request(id=id), end=True)
        await stream.recv_message()


async def test_metrics_count_rejected_calls_by_status(
    metered: Settings, listener: socket.socket
) -> None:
    secured = metered.model_copy(update={"auth": AuthSettings(tokens={"s3cret": "alice"})})
    channel = channel_for(secured)

    async def refused(call: Callable[[], Awaitable[object]]) -> Status:
        with pytest.raises(GRPCError) as info:
            await call()
        return info.value.status

    async def subscribe_without_token(id: int) -> None:
        async with subscription(channel, id):
            pass

    try:
        async with running(secured, listener) as manager:
            assert await refused(lambda: subscribe_without_token(1)) is Status.UNAUTHENTICATED
            assert await refused(lambda: unsubscribe(channel, 1, "wrong")) is Status.UNAUTHENTICATED
            # the caller is checked before the request: strangers learn nothing of the rules
            assert await refused(lambda: subscribe_without_token(-1)) is Status.UNAUTHENTICATED
            assert (
                await refused(lambda: unsubscribe(channel, -1, "s3cret")) is Status.INVALID_ARGUMENT
            )
            # a caller with a valid token is not refused
            assert await refused(lambda: unsubscribe(channel, 1, "s3cret")) is Status.NOT_FOUND
            page = await scrape(manager.metrics_port)
        rejected = {
            name: value
            for name, value in page.values.items()
            if name.startswith("longlived_rejected_calls_total")
        }
        assert rejected == {
            'longlived_rejected_calls_total{status="INVALID_ARGUMENT"}': 1,
            'longlived_rejected_calls_total{status="UNAUTHENTICATED"}': 3,
        }
    finally:
        channel.close()


CLIENT_METRICS = (
    "longlived_client_reconnects_total",
    "longlived_client_messages_total",
    "longlived_client_duplicates_total",
    "longlived_client_resets_total",
    "longlived_client_connected",
)


def client_counters(client: ResilientClient) -> dict[str, float]:
    """``client.stats()`` as the names a scrape shows."""
    return {
        sample.name + ("_total" if sample.kind == "counter" else ""): sample.value
        for sample in client.stats()
        if isinstance(sample.value, int | float)
    }


async def test_client_counters_across_a_server_restart(
    settings: Settings, listener: socket.socket
) -> None:
    quiet = settings.model_copy(update={"interval": 3600.0})
    port = listener.getsockname()[1]
    backing_off, restarted = asyncio.Event(), asyncio.Event()

    async def sleep(delay: float) -> None:
        # the client waits here between attempts until the test has restarted the server
        backing_off.set()
        await restarted.wait()

    received: list[str] = []
    changed = asyncio.Event()
    client = ResilientClient(1, settings=quiet, sleep=sleep)

    async def consume() -> None:
        while True:
            try:
                async for response in client:
                    received.append(response.data)
                    changed.set()
                return
            except ResumeExpired:
                continue  # the new server is a new epoch: nothing to resync here

    async def until(predicate: Callable[[], bool]) -> None:
        while not predicate():
            changed.clear()
            await changed.wait()

    first = SubscriptionManager(quiet)
    await first.start(sock=listener)
    second = SubscriptionManager(quiet)
    try:
        async with asyncio.timeout(TIMEOUT), asyncio.TaskGroup() as tg:
            tg.create_task(consume())
            await client.connected.wait()
            first.publish("before")
            await until(lambda: received == ["before"])

            await first.close()
            await backing_off.wait()
            assert client.disconnected.is_set()
            assert pick(client_counters(client), *CLIENT_METRICS) == {
                "longlived_client_reconnects_total": 1,
                "longlived_client_messages_total": 1,
                "longlived_client_duplicates_total": 0,
                "longlived_client_resets_total": 0,
                "longlived_client_connected": 0,
            }

            await second.start(sock=socket.create_server(("127.0.0.1", port)))
            restarted.set()
            await second.wait_for(lambda: 1 in second.subscribers)
            second.publish("after")
            await until(lambda: received == ["before", "after"])

            endpoint = serve_metrics(client.stats, host="127.0.0.1", port=0)
            try:
                page = await scrape(endpoint.port)
            finally:
                await asyncio.to_thread(endpoint.close)
            await client.aclose()
    finally:
        await client.aclose()
        await first.close()
        await second.close()
    expected = {
        "longlived_client_reconnects_total": 1,  # one failure: the first server went away
        "longlived_client_messages_total": 2,
        "longlived_client_duplicates_total": 0,
        "longlived_client_resets_total": 1,  # its token is from the old server's epoch
        "longlived_client_connected": 1,
    }
    assert pick(page.values, *CLIENT_METRICS) == expected
    assert page.types["longlived_client_reconnects"] == "counter"
    assert page.types["longlived_client_connected"] == "gauge"


# --------------------------------------------------------------------------------- logs


async def test_serve_logs_one_json_object_per_line() -> None:
    args = ["serve", "--log-format", "json", "--address", "127.0.0.1:0", "--duration", "1"]
    async with (
        child("-m", "longlived", *args, "--metrics.port", "0") as proc,
        asyncio.timeout(20),
    ):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    lines = (out + err).decode().splitlines()
    entries = [json.loads(line) for line in lines]
    for entry in entries:
        assert {"time", "level", "logger", "message"} <= entry.keys(), entry
        # UTC, to the millisecond
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["time"]), entry
    messages = [(entry["level"], entry["logger"], entry["message"]) for entry in entries]
    assert any(
        re.fullmatch(r"Listening on 127\.0\.0\.1:[1-9]\d*", message) for _, _, message in messages
    ), messages
    assert any(message.startswith("Metrics on http://127.0.0.1:") for _, _, message in messages)
    assert messages[-1] == ("INFO", "longlived.server", "Server closed")


async def test_health_answers_for_the_original_service_name(
    settings: Settings, listener: socket.socket
) -> None:
    from grpclib.health.v1.health_grpc import HealthStub
    from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse

    channel = channel_for(settings)
    try:
        async with running(settings, listener), asyncio.timeout(TIMEOUT):
            stub = HealthStub(channel)
            for service in ("", "longlived.Longlived", "protos.Longlived"):
                reply = await stub.Check(HealthCheckRequest(service=service))
                assert reply.status == HealthCheckResponse.SERVING, service
    finally:
        channel.close()
