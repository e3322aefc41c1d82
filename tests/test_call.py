"""The call layer on its own: a ``SubscribeCall`` or ``UnsubscribeCall`` over a fake transport.

No sockets and no grpclib: what the peer would see is what the fake records.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence
from typing import TypeVar

import betterproto2
import pytest

from longlived import (
    AuthSettings,
    LimitSettings,
    QueueSettings,
    ReplaySettings,
    Request,
    Response,
    ResponseKind,
    Settings,
    SubscriptionClosed,
    SubscriptionManager,
)
from longlived._call import PublishCall, SubscribeCall, UnsubscribeCall
from longlived._proto.longlived import PublishRequest
from longlived._status import CallError, Code
from longlived.hub import EndReason

M = TypeVar("M", bound=betterproto2.Message)

TIMEOUT = 10
TOKENS = {"tok-a": "alice", "tok-b": "bob"}


class FakeTransport:
    """Records what a call sends; the request arrives when the test says so."""

    def __init__(
        self, request: betterproto2.Message | None = None, *, token: str | None = None
    ) -> None:
        self.peer = "fake:1"
        self.metadata: Mapping[str, str | bytes] = (
            {"authorization": f"Bearer {token}"} if token else {}
        )
        self.request = request
        self.arrived = asyncio.Event()
        if request is not None:
            self.arrived.set()
        self.reads = 0
        self.admissions = 0
        self.headers: Mapping[str, str] | None = None
        self.messages: list[Response] = []
        self.replies: list[Response] = []
        self.status: tuple[Code, str | None, bool] | None = None
        self.wrote = asyncio.Event()
        self.finished = asyncio.Event()
        self.direct = False  # whether try_write takes messages
        self.direct_writes = 0

    async def read_request(self, message_type: type[M], *, max_size: int) -> M:
        self.reads += 1
        await self.arrived.wait()
        assert isinstance(self.request, message_type)
        return self.request

    def admitted(self) -> None:
        self.admissions += 1

    async def start(self, metadata: Mapping[str, str] | None, abort: asyncio.Event) -> bool:
        self.headers = metadata or {}
        return True

    async def write(self, messages: Sequence[bytes], abort: asyncio.Event) -> int:
        self.messages += [Response.FromString(m) for m in messages]
        self.wrote.set()
        return len(messages)

    def try_write(self, message: bytes) -> bool:
        if not self.direct:
            return False
        self.messages.append(Response.FromString(message))
        self.direct_writes += 1
        self.wrote.set()
        return True

    async def reply(self, message: bytes, *, timeout: float) -> None:
        self.replies.append(Response.FromString(message))

    async def finish(
        self, code: Code, message: str | None, *, final: bool = False, timeout: float
    ) -> None:
        self.status = (code, message, final)
        self.finished.set()

    def data(self) -> list[str]:
        return [m.data for m in self.messages if m.kind == ResponseKind.DATA]

    async def until_data(self, count: int) -> None:
        async with asyncio.timeout(TIMEOUT):
            while len(self.data()) < count:
                self.wrote.clear()
                await self.wrote.wait()


def host(**updates: object) -> SubscriptionManager:
    """A server that is never started: the calls need only its rules and its hub."""
    settings = Settings(interval=3600.0, drain_timeout=1.0).model_copy(update=updates)
    return SubscriptionManager(settings)


@contextlib.asynccontextmanager
async def running_call(server: SubscriptionManager, transport: FakeTransport):  # type: ignore[no-untyped-def]  # an async generator context
    task = asyncio.create_task(SubscribeCall(server, transport).run())
    try:
        yield task
    finally:
        if not task.done():
            task.cancel()
        await asyncio.wait([task])


async def test_a_call_that_never_sends_its_request_is_refused_at_the_deadline() -> None:
    server = host(limits=LimitSettings(admission_timeout=0.05))
    transport = FakeTransport()  # headers only: the body never comes
    async with asyncio.timeout(TIMEOUT):
        await SubscribeCall(server, transport).run()
    assert transport.status == (
        Code.DEADLINE_EXCEEDED,
        "no complete request within 0.05s of the call",
        False,
    )
    assert transport.admissions == 0
    assert server.subscribers == []
    assert server.rejected == {"DEADLINE_EXCEEDED": 1}


async def test_strangers_are_refused_before_their_body_is_read() -> None:
    server = host(auth=AuthSettings(tokens=TOKENS))
    transport = FakeTransport(token="wrong")
    async with asyncio.timeout(TIMEOUT):
        await SubscribeCall(server, transport).run()
    assert transport.status == (Code.UNAUTHENTICATED, "missing or invalid bearer token", False)
    assert transport.reads == 0


async def test_an_admitted_call_streams_its_events_then_its_final_status() -> None:
    server = host()
    transport = FakeTransport(Request(id=4, heartbeat_ms=10_000))
    async with running_call(server, transport) as task, asyncio.timeout(TIMEOUT):
        await server.wait_for(lambda: 4 in server.subscribers)
        assert transport.admissions == 1
        assert transport.headers == {"longlived-heartbeat-ms": "10000"}
        server.send(4, "one")
        server.publish("two")
        await transport.until_data(2)
        assert await server.unsubscribe(Request(id=4)) == Response()
        await task
    assert transport.data() == ["one", "two"]
    assert transport.messages[0].kind == ResponseKind.HEARTBEAT  # the position comes first
    assert transport.status == (Code.OK, "unsubscribed", False)
    assert server.subscribers == []


async def test_events_for_an_idle_writer_go_out_at_once_and_declined_ones_queue_in_order() -> None:
    server = host()
    transport = FakeTransport(Request(id=4))
    async with running_call(server, transport) as task, asyncio.timeout(TIMEOUT):
        # woken once the call, registered, waits for its first message (the fake's start()
        # does not suspend)
        await server.wait_for(lambda: 4 in server.subscribers)
        transport.direct = True
        server.publish("one")  # written by the publish itself
        assert (transport.data(), transport.direct_writes) == (["one"], 1)
        transport.direct = False
        server.publish("two")  # declined: queued for the writer
        transport.direct = True
        server.publish("three")  # behind "two", though the transport would take it now
        await transport.until_data(3)
        assert await server.unsubscribe(Request(id=4)) == Response()
        await task
    assert transport.data() == ["one", "two", "three"]
    assert transport.direct_writes == 1
    assert server.messages_sent == 3


class GatedTransport(FakeTransport):
    """``write()`` waits for ``gate``: a peer whose window is closed."""

    def __init__(self, request: Request) -> None:
        super().__init__(request)
        self.gate = asyncio.Event()
        self.blocked = asyncio.Event()

    async def write(self, messages: Sequence[bytes], abort: asyncio.Event) -> int:
        self.blocked.set()
        await self.gate.wait()
        return await super().write(messages, abort)


async def test_messages_written_at_once_count_while_another_writer_waits() -> None:
    """``messages_sent += await write()`` read the counter before the wait and lost every
    direct write made meanwhile: the Prometheus counter went backwards."""
    server = host()
    slow, fast = GatedTransport(Request(id=1)), FakeTransport(Request(id=2))
    fast.direct = True
    async with running_call(server, slow), running_call(server, fast):
        async with asyncio.timeout(TIMEOUT):
            await server.wait_for(lambda: {1, 2} <= set(server.subscribers))
            server.send(1, "for the slow one")  # declined: queued, its writer then waits
            await slow.blocked.wait()
            for n in range(10):
                server.send(2, f"direct {n}")
            assert fast.direct_writes == 10
            slow.gate.set()
            await slow.until_data(1)
    assert server.messages_sent == 11


async def test_ownership_outlives_the_owners_stream_while_her_events_can_be_replayed() -> None:
    server = host(auth=AuthSettings(tokens=TOKENS))
    alice = FakeTransport(Request(id=7), token="tok-a")
    async with running_call(server, alice), asyncio.timeout(TIMEOUT):
        await server.wait_for(lambda: 7 in server.subscribers)
        secret = server.send(7, "alice's secret")
        await alice.until_data(1)
    # her stream is gone, her event is still in the history
    assert server.subscribers == []
    bob = FakeTransport(Request(id=7, resume_token=f"{secret.epoch}:0"), token="tok-b")
    async with asyncio.timeout(TIMEOUT):
        await SubscribeCall(server, bob).run()
    assert bob.status == (
        Code.PERMISSION_DENIED,
        "bob may not take over the subscription 7",
        False,
    )
    assert bob.messages == []
    # she may come back for it
    again = FakeTransport(Request(id=7, resume_token=f"{secret.epoch}:0"), token="tok-a")
    async with running_call(server, again), asyncio.timeout(TIMEOUT):
        await again.until_data(1)
    assert again.data() == ["alice's secret"]


async def test_a_claim_ends_once_nothing_of_the_id_is_left() -> None:
    server = host(auth=AuthSettings(tokens=TOKENS), replay=ReplaySettings(size=2))
    alice = FakeTransport(Request(id=7), token="tok-a")
    async with running_call(server, alice), asyncio.timeout(TIMEOUT):
        await server.wait_for(lambda: 7 in server.subscribers)
        server.send(7, "alice's secret")
        await alice.until_data(1)
    server.publish("a")
    server.publish("b")  # her event has left the history: nothing of id 7 to protect
    bob = FakeTransport(Request(id=7), token="tok-b")
    async with running_call(server, bob), asyncio.timeout(TIMEOUT):
        await server.wait_for(lambda: 7 in server.subscribers)
        sub = server.hub.get(7)
        assert sub is not None
        assert sub.owner == "bob"
    assert bob.status is None


async def test_a_claim_survives_its_last_event_leaving_as_a_new_one_arrives() -> None:
    """The event that pushes the id's last one out of the history is the id's own."""
    server = host(auth=AuthSettings(tokens=TOKENS), replay=ReplaySettings(size=3))
    alice = FakeTransport(Request(id=7), token="tok-a")
    async with running_call(server, alice), asyncio.timeout(TIMEOUT):
        await server.wait_for(lambda: 7 in server.subscribers)
        first = server.send(7, "secret-1")
        await alice.until_data(1)
    server.publish("a")
    server.publish("b")
    server.send(7, "secret-2")  # evicts secret-1
    assert server.hub.owner(7) == "alice"
    bob = FakeTransport(Request(id=7, resume_token=f"{first.epoch}:0"), token="tok-b")
    async with asyncio.timeout(TIMEOUT):
        await SubscribeCall(server, bob).run()
    assert bob.status is not None
    assert bob.status[0] is Code.PERMISSION_DENIED
    assert bob.messages == []


async def test_unsubscribe_of_another_callers_id_is_denied_and_changes_nothing() -> None:
    server = host(auth=AuthSettings(tokens=TOKENS))
    alice = FakeTransport(Request(id=3), token="tok-a")
    async with running_call(server, alice), asyncio.timeout(TIMEOUT):
        await server.wait_for(lambda: 3 in server.subscribers)
        bob = FakeTransport(Request(id=3), token="tok-b")
        await UnsubscribeCall(server, bob).run()
        assert bob.status == (Code.PERMISSION_DENIED, "bob may not unsubscribe 3", False)
        assert server.subscribers == [3]
        owner = FakeTransport(Request(id=3), token="tok-a")
        await UnsubscribeCall(server, owner).run()
        assert (owner.replies, owner.status) == ([Response()], (Code.OK, None, False))
        await alice.finished.wait()
    assert alice.status == (Code.OK, "unsubscribed", False)


@pytest.mark.asyncio(loop_factories=["asyncio"])  # reads asyncio's own timer heap
async def test_unsubscribe_leaves_no_timer_behind() -> None:
    """Each Unsubscribe used to leave a ``call_later`` holding the subscriber."""
    server = host(drain_timeout=3600.0)
    transport = FakeTransport(Request(id=2))
    async with running_call(server, transport) as task, asyncio.timeout(TIMEOUT):
        await server.wait_for(lambda: 2 in server.subscribers)
        sub = server.hub.get(2)
        assert sub is not None
        await UnsubscribeCall(server, FakeTransport(Request(id=2))).run()
        await task
    loop = asyncio.get_running_loop()
    pending = [h for h in loop._scheduled if not h.cancelled()]  # type: ignore[attr-defined]  # asyncio's timer heap
    assert all(getattr(h._callback, "__self__", None) is not sub for h in pending)


async def test_requests_no_subscriber_may_make_are_refused_by_the_call() -> None:
    server = host()
    transport = FakeTransport(Request(id=-1))
    async with asyncio.timeout(TIMEOUT):
        await SubscribeCall(server, transport).run()
    assert transport.status == (Code.INVALID_ARGUMENT, "id must be >= 0, got -1", False)


async def test_in_process_subscribe_follows_the_wire_rules() -> None:
    server = host(auth=AuthSettings(tokens=TOKENS))
    stream = server.subscribe(Request(id=5))
    with pytest.raises(SubscriptionClosed) as info:
        async with contextlib.aclosing(stream), asyncio.timeout(TIMEOUT):
            await anext(stream)
    assert (info.value.status, info.value.detail) == (
        "UNAUTHENTICATED",
        "missing or invalid bearer token",
    )
    allowed = server.subscribe(
        Request(id=5, accept_control=True), metadata={"authorization": "Bearer tok-a"}
    )
    async with contextlib.aclosing(allowed), asyncio.timeout(TIMEOUT):
        first = await anext(allowed)
        assert first.kind == ResponseKind.HEARTBEAT
        server.send(5, "hello")
        assert (await anext(allowed)).data == "hello"
    assert server.subscribers == []


async def test_in_process_subscriber_that_stops_reading_meets_the_queue_policy() -> None:
    server = host(queue=QueueSettings(size=4))
    stream = server.subscribe(Request(id=9))
    with pytest.raises(SubscriptionClosed) as info:
        async with contextlib.aclosing(stream), asyncio.timeout(TIMEOUT):
            reader = asyncio.ensure_future(anext(stream))
            await server.wait_for(lambda: 9 in server.subscribers)
            server.send(9, "read")
            assert (await reader).data == "read"
            for n in range(20):  # nobody reads now: the queue overflows
                server.send(9, str(n))
            while True:
                await anext(stream)
    assert (info.value.status, info.value.detail) == ("RESOURCE_EXHAUSTED", "subscriber too slow")


def test_call_error_names_its_code() -> None:
    error = CallError(Code.NOT_FOUND, "no subscriber with id 3")
    assert str(error) == "NOT_FOUND: no subscriber with id 3"
    assert not error.final


class Broken(SubscriptionManager):
    async def authenticate(self, metadata: Mapping[str, str | bytes]) -> None:
        raise ValueError("the token service is down")


async def test_in_process_subscribe_raises_what_the_call_raised() -> None:
    """A hook that raised used to leave the in-process subscriber waiting for ever."""
    server = Broken(Settings(interval=3600.0))
    stream = server.subscribe(Request(id=1))
    with pytest.raises(ValueError, match="the token service is down"):
        async with contextlib.aclosing(stream), asyncio.timeout(TIMEOUT):
            await anext(stream)


class StalledTransport(FakeTransport):
    """A peer that takes nothing: every write waits until the call aborts it."""

    async def write(self, messages: Sequence[bytes], abort: asyncio.Event) -> int:
        self.wrote.set()
        await abort.wait()
        return 0


async def test_a_stalled_peer_is_ended_as_too_slow_and_told_so() -> None:
    server = host(queue=QueueSettings(size=4))
    transport = StalledTransport(Request(id=3))
    async with running_call(server, transport) as task, asyncio.timeout(TIMEOUT):
        await server.wait_for(lambda: 3 in server.subscribers)
        server.send(3, "taken, never written")
        await transport.wrote.wait()
        for n in range(5):  # the queue overflows while the write is stuck
            server.send(3, str(n))
        await task
    assert transport.status == (Code.RESOURCE_EXHAUSTED, "subscriber too slow", False)
    assert server.subscribers == []


async def test_a_publish_while_draining_is_refused_so_the_publisher_retries_elsewhere() -> None:
    """Emitted into a server that is closing, an event dies with its in-memory log while
    the publisher believes it delivered; refused, it is retried on the next server."""
    server = host()
    closing = asyncio.ensure_future(server.close())
    await asyncio.sleep(0)  # close() has begun: the server no longer accepts
    assert not server.accepting
    transport = FakeTransport(PublishRequest(data="late", topic="t", idempotency_key="k"))
    async with asyncio.timeout(TIMEOUT):
        await PublishCall(server, transport).run()
        await closing
    assert transport.status == (Code.UNAVAILABLE, "server shutting down", False)
    assert server.hub.stats.events == 0


async def test_a_drain_writes_what_is_queued_before_it_ends_the_stream() -> None:
    """An in-memory log dies with the process: events queued when the drain began must go
    out before UNAVAILABLE, or the client resumes elsewhere to a RESET for them."""
    server = host()
    transport = FakeTransport(Request(id=4, accept_control=True))
    async with running_call(server, transport) as task, asyncio.timeout(TIMEOUT):
        await server.wait_for(lambda: 4 in server.subscribers)
        await transport.wrote.wait()  # the first position
        server.publish("a")
        server.publish("b")
        server.hub.end_all(EndReason.SHUTDOWN, flush_timeout=1.0)  # as close() does
        await task
    assert transport.data() == ["a", "b"]
    assert transport.status == (Code.UNAVAILABLE, "server shutting down", False)
