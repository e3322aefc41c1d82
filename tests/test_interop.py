"""Interop with the official ``grpcio`` library, both ways, from both protos.

Stubs are generated at test time with ``grpc_tools.protoc`` from our proto and from the
original example's (``tests/protos/original_longlived.proto``, package ``protos``), so the
tests check the wire contract a third-party client really sees, not our own generated code.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.resources
import sys
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest
from grpc_tools import protoc

from longlived import (
    BackoffSettings,
    ResilientClient,
    Response,
    Settings,
    SubscriptionManager,
)

TIMEOUT = 5
ROOT = Path(__file__).resolve().parent.parent
PROTOS = {
    "longlived": ROOT / "proto" / "longlived.proto",
    "protos": ROOT / "tests" / "protos" / "original_longlived.proto",
}
"""The proto each package's grpcio stubs are generated from."""

# Don't let an http(s)_proxy in the environment route loopback calls elsewhere.
CHANNEL_OPTIONS = [("grpc.enable_http_proxy", 0)]

WELL_KNOWN = importlib.resources.files("grpc_tools") / "_proto"
"""protoc's own include directory, with the well-known types."""


@dataclass(frozen=True, slots=True)
class Stubs:
    """The modules ``protoc`` generated from one proto."""

    messages: ModuleType
    services: ModuleType


def generate(proto: Path, out: Path) -> Stubs:
    """Run ``grpc_tools.protoc`` on ``proto`` into ``out`` and import the result."""
    args = [
        "protoc",
        f"--proto_path={proto.parent}",
        f"--proto_path={WELL_KNOWN}",  # google/protobuf/any.proto
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        str(proto),
    ]
    assert protoc.main(args) == 0, f"protoc failed on {proto}"
    names = [f"{proto.stem}_pb2", f"{proto.stem}_pb2_grpc"]
    # The *_pb2_grpc module imports its *_pb2 sibling by top-level name.
    sys.path.insert(0, str(out))
    try:
        messages, services = (importlib.import_module(name) for name in names)
    finally:
        sys.path.remove(str(out))
        for name in names:
            sys.modules.pop(name, None)
    return Stubs(messages=messages, services=services)


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Stubs]:
    """grpcio stubs for each package, generated once for this module."""
    return {
        package: generate(proto, tmp_path_factory.mktemp(f"grpcio_{package}"))
        for package, proto in PROTOS.items()
    }


@pytest.fixture(params=list(PROTOS))
def stubs(request: pytest.FixtureRequest, generated: dict[str, Stubs]) -> Stubs:
    """grpcio stubs of one proto: ours (``longlived``) or the original's (``protos``)."""
    package: str = request.param
    return generated[package]


@pytest.fixture
async def channel(settings: Settings) -> AsyncIterator[Any]:
    """A ``grpc.aio`` channel to the server ``settings`` points at."""
    channel = grpc.aio.insecure_channel(settings.address, options=CHANNEL_OPTIONS)
    try:
        yield channel
    finally:
        await channel.close()


async def failure_of(call: Awaitable[object]) -> tuple[Any, str]:
    """The status code and details of a grpcio call that must fail.

    Only these are kept: an ``AioRpcError`` held in the test's frame (as ``pytest.raises``
    does) makes a frame/traceback cycle that keeps the call, and so grpcio's TCP connection,
    alive after ``channel.close()`` until the cyclic GC runs.
    """
    try:
        async with asyncio.timeout(TIMEOUT):
            await call
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details()
    pytest.fail("the call succeeded")


# ------------------------------------------------------------ grpcio client -> our server


async def test_grpcio_client_subscribes_receives_and_unsubscribes(
    manager: SubscriptionManager, settings: Settings, stubs: Stubs, channel: Any
) -> None:
    call = stubs.services.LonglivedStub(channel).Subscribe(stubs.messages.Request(id=7))
    try:
        messages = aiter(call)
        async with asyncio.timeout(TIMEOUT):
            first = [(await anext(messages)).data for _ in range(2)]
        assert first == ["data mock for: 7"] * 2

        # Unsubscribe from another client (its own channel), as the original example does.
        other = grpc.aio.insecure_channel(settings.address, options=CHANNEL_OPTIONS)
        try:
            async with asyncio.timeout(TIMEOUT):
                reply = await stubs.services.LonglivedStub(other).Unsubscribe(
                    stubs.messages.Request(id=7)
                )
        finally:
            await other.close()
        assert isinstance(reply, stubs.messages.Response)
        assert reply.data == ""

        # The stream ends cleanly: iteration stops without an error, status OK.
        async with asyncio.timeout(TIMEOUT):
            rest = [message.data async for message in messages]
            code = await call.code()
        assert set(rest) <= {"data mock for: 7"}
        assert code == grpc.StatusCode.OK
        async with asyncio.timeout(TIMEOUT):
            await manager.wait_for(lambda: not manager.subscribers)
    finally:
        call.cancel()


async def test_grpcio_unsubscribe_of_unknown_id_is_not_found(
    manager: SubscriptionManager, stubs: Stubs, channel: Any
) -> None:
    unsubscribe = stubs.services.LonglivedStub(channel).Unsubscribe
    code, details = await failure_of(unsubscribe(stubs.messages.Request(id=4242)))
    assert code == grpc.StatusCode.NOT_FOUND
    assert details == "no subscriber with id 4242"


# ------------------------------------------------ our client -> grpcio (original) server


@dataclass
class OriginalServicer:
    """The original example's service on grpcio: a few mock messages, then until Unsubscribe."""

    messages: ModuleType
    count: int = 3
    calls: list[tuple[str, int]] = field(default_factory=list, init=False)
    _unsubscribed: dict[int, asyncio.Event] = field(default_factory=dict, init=False)

    async def Subscribe(self, request: Any, context: Any) -> AsyncIterator[Any]:
        self.calls.append(("Subscribe", request.id))
        done = self._unsubscribed.setdefault(request.id, asyncio.Event())
        for _ in range(self.count):
            yield self.messages.Response(data=f"data mock for: {request.id}")
        await done.wait()  # returning ends the stream with OK

    async def Unsubscribe(self, request: Any, context: Any) -> Any:
        self.calls.append(("Unsubscribe", request.id))
        done = self._unsubscribed.pop(request.id, None)
        if done is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no subscriber with id {request.id}")
        else:
            done.set()
        return self.messages.Response()


@pytest.fixture
def original(generated: dict[str, Stubs]) -> Stubs:
    """grpcio stubs of the original proto (package ``protos``)."""
    return generated["protos"]


@pytest.fixture
async def original_server(original: Stubs) -> AsyncIterator[tuple[OriginalServicer, int]]:
    """A ``grpc.aio`` server answering only ``/protos.Longlived/*``, and its port."""
    servicer = OriginalServicer(original.messages)
    server = grpc.aio.server()
    try:
        original.services.add_LonglivedServicer_to_server(servicer, server)
        port: int = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        yield servicer, port
    finally:
        await server.stop(None)


async def test_resilient_client_works_against_a_grpcio_server_of_the_original_proto(
    original_server: tuple[OriginalServicer, int],
) -> None:
    servicer, port = original_server
    settings = Settings(
        address=f"127.0.0.1:{port}",
        package="protos",
        connect_timeout=2.0,
        # Fail at once rather than retry if the server does not answer our paths.
        backoff=BackoffSettings(initial=0.05, max=0.2, max_attempts=1),
    )
    received: list[str] = []
    async with ResilientClient(7, settings=settings) as client:
        async with asyncio.timeout(TIMEOUT):
            async for response in client:
                received.append(response.data)
                if len(received) == servicer.count:
                    assert await client.unsubscribe() == Response()
        assert (client.connections, client.failures) == (1, 0)
    assert received == ["data mock for: 7"] * servicer.count
    assert servicer.calls == [("Subscribe", 7), ("Unsubscribe", 7)]
