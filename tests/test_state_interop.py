"""Keyed state seen by a stock grpcio client that knows only the app's own proto.

The client compiles ``examples/inventory/inventory.proto`` (nothing of longlived's) and
learns the ``Longlived`` service, its ``Request`` and ``Response`` and ``inventory.Item``
from server reflection alone, as a client in another language with ``grpcurl``-style
tooling would. It runs in a child process: grpcio's reflection stubs go into protobuf's
default pool, where grpclib's copies (imported by longlived) already are (see
``tests/test_ops.py``).
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import betterproto2
import pytest

from examples.inventory._proto.inventory import Item
from longlived import Settings, SubscriptionManager

TIMEOUT = 20
PROTO = Path(__file__).resolve().parent.parent / "examples" / "inventory" / "inventory.proto"

WATCH_CLIENT = r"""
import json, subprocess, sys, tempfile
from pathlib import Path

import grpc
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

proto, address, subscriber = sys.argv[1], sys.argv[2], int(sys.argv[3])
out = tempfile.mkdtemp()
# only the app's proto: longlived's own messages come from reflection below
subprocess.run(
    [sys.executable, "-m", "grpc_tools.protoc", f"-I{Path(proto).parent}",
     f"--python_out={out}", proto],
    check=True,
)
sys.path.insert(0, out)
import inventory_pb2


def emit(value):
    print(json.dumps(value), flush=True)


channel = grpc.insecure_channel(address, options=[("grpc.enable_http_proxy", 0)])
pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
service = pool.FindServiceByName("longlived.Longlived")
method = service.methods_by_name["Subscribe"]
Request = message_factory.GetMessageClass(method.input_type)
Response = message_factory.GetMessageClass(method.output_type)
kinds = method.output_type.enum_types_by_name["Kind"].values_by_number
reflected_item = pool.FindMessageTypeByName("inventory.Item")


def change(response):
    item = None
    if response.HasField("payload"):
        value = inventory_pb2.Item()
        assert response.payload.Unpack(value), response.payload.type_url
        item = {"sku": value.sku, "name": value.name, "count": value.count}
    return {
        "kind": kinds[response.kind].name,
        "key": response.key,
        "topic": response.topic,
        "deleted": response.deleted,
        "type_url": response.payload.type_url,
        "item": item,
    }


subscribe = channel.unary_stream(
    f"/{service.full_name}/{method.name}",
    request_serializer=Request.SerializeToString,
    response_deserializer=Response.FromString,
)
stream = subscribe(Request(id=subscriber, snapshot=True), timeout=30)
snapshot = []
for response in stream:
    if kinds[response.kind].name != "SNAPSHOT":
        break
    snapshot.append(change(response))
emit({
    "service": [m.name for m in service.methods],
    "item_fields": [f.name for f in reflected_item.fields],
    "item_file": reflected_item.file.name,
    "snapshot": snapshot,
    "synced": kinds[response.kind].name,
    "token": response.token,
})
emit(change(next(stream)))
stream.cancel()
channel.close()
"""
"""A grpcio client: ``python -c WATCH_CLIENT inventory.proto host:port id``.

Prints one JSON object once SYNCED arrives (the reflected service's methods, the reflected
``inventory.Item``'s fields, each SNAPSHOT with its payload decoded as ``inventory_pb2.Item``,
the SYNCED kind and token), then one for the next live change, and exits.
"""


@dataclass(eq=False, repr=False)
class Bare(betterproto2.Message):
    """A message generated without protobuf descriptors (nothing for reflection to serve)."""

    sku: str = betterproto2.field(1, betterproto2.TYPE_STRING)


@asynccontextmanager
async def watcher(address: str, id: int) -> AsyncIterator[asyncio.subprocess.Process]:
    """The grpcio watch client subscribed as ``id``; killed on the way out if still running."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        WATCH_CLIENT,
        str(PROTO),
        address,
        str(id),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def next_line(proc: asyncio.subprocess.Process) -> Any:
    """The next JSON line of ``proc``'s stdout (with its stderr if it exited instead)."""
    assert proc.stdout is not None
    assert proc.stderr is not None
    line = await proc.stdout.readline()
    if not line:
        await proc.wait()
        raise AssertionError(
            f"client exited ({proc.returncode}): {(await proc.stderr.read()).decode()}"
        )
    return json.loads(line)


def item(sku: str, name: str, count: int) -> dict[str, object]:
    """One decoded ``inventory.Item`` as the client prints it."""
    return {"sku": sku, "name": name, "count": count}


def keyed(kind: str, key: str, value: dict[str, object] | None, **rest: object) -> dict[str, Any]:
    """One keyed message of the ``inventory`` topic as the client prints it."""
    return {
        "kind": kind,
        "key": key,
        "topic": "inventory",
        "deleted": False,
        "type_url": "" if value is None else "type.googleapis.com/inventory.Item",
        "item": value,
        **rest,
    }


@pytest.fixture
def state_settings(quiet: Settings) -> Settings:
    """``quiet`` with no event source: the state changes only by the test's own calls."""
    return quiet.model_copy(update={"source": "none"})


async def test_grpcio_client_from_app_proto_and_reflection_watches_state(
    state_settings: Settings, listener: socket.socket
) -> None:
    manager = SubscriptionManager(state_settings, payload_types=[Item])
    await manager.start(sock=listener)
    try:
        await manager.put("a-1", Item(sku="A-1", name="anvil", count=3), topic="inventory")
        await manager.put("b-2", Item(sku="B-2", name="bolt", count=40), topic="inventory")
        await manager.put("c-3", Item(sku="C-3", name="chain", count=0), topic="inventory")
        await manager.delete("b-2", topic="inventory")
        server_state = {
            key: item(value.sku, value.name, value.count)
            for key, value in manager.items(Item, topic="inventory").items()
        }
        assert server_state == {"a-1": item("A-1", "anvil", 3), "c-3": item("C-3", "chain", 0)}

        async with watcher(state_settings.address, 7) as proc, asyncio.timeout(TIMEOUT):
            synced = await next_line(proc)
            # the change is made only once the client holds the snapshot
            await manager.put("d-4", Item(sku="D-4", name="drill", count=5), topic="inventory")
            live = await next_line(proc)
            assert await proc.wait() == 0
    finally:
        await manager.close()

    assert synced["service"] == ["Subscribe", "Unsubscribe", "Publish"]
    assert synced["item_fields"] == ["sku", "name", "count", "price"]
    assert synced["item_file"] == "inventory.proto"
    assert {s["key"]: s["item"] for s in synced["snapshot"]} == server_state
    assert sorted(synced["snapshot"], key=lambda s: s["key"]) == [
        keyed("SNAPSHOT", key, value) for key, value in sorted(server_state.items())
    ]
    assert synced["synced"] == "SYNCED"
    assert synced["token"]
    assert live == keyed("DATA", "d-4", item("D-4", "drill", 5))


async def test_payload_type_without_descriptor_fails_start(
    state_settings: Settings, listener: socket.socket
) -> None:
    manager = SubscriptionManager(state_settings, payload_types=[Bare])
    try:
        with pytest.raises(TypeError, match=r"^Bare has no protobuf descriptor"):
            await manager.start(sock=listener)
    finally:
        await manager.close()
        listener.close()  # a start that failed never took it over
