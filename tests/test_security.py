"""TLS, mutual TLS, bearer-token auth, authorization hooks and request limits, end to end.

Every server here is real (a port-0 loopback listener); certificates come from a throwaway
trustme CA written to ``tmp_path`` at test time.
"""

from __future__ import annotations

import asyncio
import collections
import re
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from grpclib.client import Channel
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError

from longlived import (
    AuthSettings,
    BackoffSettings,
    Caller,
    ConfigError,
    LimitSettings,
    Request,
    ResilientClient,
    Response,
    RetriesExhausted,
    Settings,
    SubscriptionClosed,
    SubscriptionManager,
    TlsError,
    TlsSettings,
    load_settings,
)
from longlived._transport import PassThroughCodec
from tests.helpers import Subscription, channel_for, receive, running, subscription

TIMEOUT = 5
TOKENS = {"tok-a": "alice", "tok-b": "bob"}
ALLOW_LIST = {"alice": frozenset({1}), "bob": frozenset({2})}


# ------------------------------------------------------------------------- helpers


@dataclass(frozen=True, slots=True)
class Pki:
    """PEM files of a test CA, a server and a client certificate, and an unrelated CA."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca, other = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("client.example")
    pki = Pki(
        ca=tmp_path / "ca.pem",
        server_cert=tmp_path / "server.pem",
        server_key=tmp_path / "server.key",
        client_cert=tmp_path / "client.pem",
        client_key=tmp_path / "client.key",
        other_ca=tmp_path / "other-ca.pem",
    )
    ca.cert_pem.write_to_path(str(pki.ca))
    other.cert_pem.write_to_path(str(pki.other_ca))
    for cert, cert_path, key_path in (
        (server, pki.server_cert, pki.server_key),
        (client, pki.client_cert, pki.client_key),
    ):
        for blob in cert.cert_chain_pems:
            blob.write_to_path(str(cert_path), append=True)
        cert.private_key_pem.write_to_path(str(key_path))
    return pki


def with_token(settings: Settings, token: str | None) -> Settings:
    return settings.model_copy(update={"auth": AuthSettings(token=token)})


async def data_until(messages: AsyncIterator[Response], data: str) -> None:
    """Read ``messages`` until one carries ``data`` (the mock generator interleaves its own)."""
    async with asyncio.timeout(TIMEOUT):
        async for response in messages:
            if response.data == data:
                return
    pytest.fail(f"the subscription ended before {data!r} arrived")


def raw_channel(settings: Settings) -> Channel:
    """A channel that sends ``bytes`` messages as they are (to send corrupt requests)."""
    return Channel(settings.host, settings.port, codec=PassThroughCodec())


async def refusal(channel: Channel, request: Request | bytes) -> GRPCError:
    """Send ``request`` (or raw bytes) as a Subscribe; the status the server refuses it with.

    ``channel`` must come from ``raw_channel``.
    """
    payload = request if isinstance(request, bytes) else bytes(request)
    with pytest.raises(GRPCError) as info:
        async with (
            asyncio.timeout(TIMEOUT),
            channel.request(
                "/longlived.Longlived/Subscribe", Cardinality.UNARY_STREAM, bytes, Response
            ) as stream,
        ):
            await stream.send_message(payload, end=True)
            await stream.recv_initial_metadata()  # a refusal is a trailers-only response
            pytest.fail(f"the server accepted {payload!r} as a subscription")
    return info.value


async def still_receives(server: SubscriptionManager, stream: Subscription, id: int) -> None:
    """An event sent to ``id`` now reaches ``stream``: the subscription was not disturbed."""
    server.send(id, "still here")
    assert await receive(stream, 1) == ["still here"]


# ----------------------------------------------------------------------------- TLS


async def test_tls_client_trusting_the_ca_receives(
    listener: socket.socket, settings: Settings, pki: Pki
) -> None:
    server_settings = settings.model_copy(
        update={"tls": TlsSettings(cert=pki.server_cert, key=pki.server_key)}
    )
    client_settings = settings.model_copy(update={"tls": TlsSettings(ca=pki.ca)})
    async with (
        running(server_settings, listener) as server,
        ResilientClient(3, settings=client_settings) as client,
    ):
        async with asyncio.timeout(TIMEOUT):
            assert (await anext(aiter(client))).data == "data mock for: 3"
        assert server.subscribers == [3]
        assert client.failures == 0


async def test_plaintext_client_cannot_talk_to_a_tls_server(
    listener: socket.socket, settings: Settings, pki: Pki
) -> None:
    server_settings = settings.model_copy(
        update={"tls": TlsSettings(cert=pki.server_cert, key=pki.server_key)}
    )
    plain = settings.model_copy(update={"backoff": BackoffSettings(initial=0.01, max_attempts=2)})
    async with (
        running(server_settings, listener) as server,
        ResilientClient(3, settings=plain) as client,
    ):
        with pytest.raises(RetriesExhausted):
            async with asyncio.timeout(TIMEOUT):
                await anext(aiter(client))
        assert client.connections == 0
        assert server.subscribers == []


@pytest.mark.parametrize(
    ("tls", "reason"),
    [
        pytest.param({"ca": "other_ca"}, "unable to get local issuer certificate", id="wrong-ca"),
        pytest.param(
            {"ca": "ca", "server_name": "wrong.example"},
            "Hostname mismatch, certificate is not valid for 'wrong.example'.",
            id="wrong-name",
        ),
    ],
)
async def test_unverifiable_server_raises_tls_error_without_retrying(
    listener: socket.socket, settings: Settings, pki: Pki, tls: dict[str, str], reason: str
) -> None:
    server_settings = settings.model_copy(
        update={"tls": TlsSettings(cert=pki.server_cert, key=pki.server_key)}
    )
    client_tls = TlsSettings(ca=getattr(pki, tls["ca"]), server_name=tls.get("server_name"))
    client_settings = settings.model_copy(update={"tls": client_tls})
    async with (
        running(server_settings, listener) as server,
        ResilientClient(3, settings=client_settings) as client,
    ):
        with pytest.raises(TlsError) as info:
            async with asyncio.timeout(TIMEOUT):
                await anext(aiter(client))
        assert str(info.value) == f"{settings.address}: {reason}"
        assert (client.failures, client.connections) == (0, 0)  # no retry
        assert server.subscribers == []


async def test_mutual_tls_admits_certified_clients_only(
    listener: socket.socket, settings: Settings, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    server_settings = settings.model_copy(
        update={"tls": TlsSettings(cert=pki.server_cert, key=pki.server_key, ca=pki.ca)}
    )
    certified = settings.model_copy(
        update={"tls": TlsSettings(ca=pki.ca, cert=pki.client_cert, key=pki.client_key)}
    )
    # Without a certificate the server drops the connection during or right after the
    # handshake; the client sees only "Connection lost" (retryable), so bound its retries.
    anonymous = settings.model_copy(
        update={
            "tls": TlsSettings(ca=pki.ca),
            "backoff": BackoffSettings(initial=0.01, max=0.01, max_attempts=2),
        }
    )
    async with (
        running(server_settings, listener) as server,
        ResilientClient(1, settings=certified) as member,
        ResilientClient(2, settings=anonymous) as stranger,
    ):
        messages = aiter(member)
        await data_until(messages, "data mock for: 1")
        with pytest.raises(RetriesExhausted) as info:
            async with asyncio.timeout(TIMEOUT):
                await anext(aiter(stranger))
        assert info.value.attempts == 2
        assert stranger.connections == 0
        assert server.subscribers == [1]
        # the server says who failed the handshake, and why (asyncio alone says nothing)
        failed = [r for r in caplog.records if r.getMessage().startswith("TLS handshake with")]
        assert len(failed) == 2
        for record in failed:
            assert record.levelname == "WARNING"
            message = record.getMessage()
            assert re.match(r"TLS handshake with 127\.0\.0\.1:\d+ failed: ", message), message
            assert "peer did not return a certificate" in message
        # the certified subscriber is unaffected
        server.send(1, "after the stranger")
        await data_until(messages, "after the stranger")
        assert member.failures == 0


# ------------------------------------------------------------------------ settings


@pytest.mark.parametrize("given", ["cert", "key"])
def test_tls_cert_and_key_must_be_set_together(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, given: str
) -> None:
    monkeypatch.chdir(tmp_path)  # no stray .env
    pem = tmp_path / "only.pem"
    pem.write_text("not checked")
    with pytest.raises(ConfigError) as info:
        load_settings(tls={given: str(pem)})
    message = str(info.value)
    assert message.startswith("invalid LONGLIVED_TLS (flag --tls) = ")
    assert message.endswith("cert and key must be set together")


@pytest.mark.parametrize("missing", ["cert", "key", "ca"])
def test_tls_file_that_does_not_exist_is_named(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, missing: str
) -> None:
    monkeypatch.chdir(tmp_path)
    files = {"cert": pki.server_cert, "key": pki.server_key, "ca": pki.ca}
    files[missing] = tmp_path / "nowhere" / f"{missing}.pem"
    with pytest.raises(ConfigError) as info:
        load_settings(tls={name: str(path) for name, path in files.items()})
    assert str(info.value).endswith(f"no such file: {files[missing]}")


def test_complete_tls_settings_load(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings(
        tls={"cert": str(pki.server_cert), "key": str(pki.server_key), "ca": str(pki.ca)}
    )
    assert (settings.tls.cert, settings.tls.key, settings.tls.ca) == (
        pki.server_cert,
        pki.server_key,
        pki.ca,
    )


# ---------------------------------------------------------------------------- auth


@pytest.fixture
def auth_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"auth": AuthSettings(tokens=TOKENS)})


@pytest.mark.parametrize("token", [None, "tok-c"], ids=["no-token", "wrong-token"])
async def test_unauthenticated_subscribe_is_refused_without_retry(
    listener: socket.socket, auth_settings: Settings, token: str | None
) -> None:
    async with (
        running(auth_settings, listener) as server,
        ResilientClient(1, settings=with_token(auth_settings, token)) as client,
    ):
        with pytest.raises(SubscriptionClosed) as info:
            async with asyncio.timeout(TIMEOUT):
                await anext(aiter(client))
        assert info.value.status == "UNAUTHENTICATED"
        assert info.value.detail == "missing or invalid bearer token"
        assert (client.failures, client.connections) == (0, 0)
        assert server.subscribers == []
        with pytest.raises(SubscriptionClosed) as info:
            await client.unsubscribe()
        assert info.value.status == "UNAUTHENTICATED"
        assert server.rejected == collections.Counter({"UNAUTHENTICATED": 2})


async def test_only_the_owner_may_unsubscribe(
    listener: socket.socket, auth_settings: Settings
) -> None:
    async with (
        running(auth_settings, listener) as server,
        ResilientClient(1, settings=with_token(auth_settings, "tok-a")) as alice,
        ResilientClient(1, settings=with_token(auth_settings, "tok-b")) as bob,
    ):
        messages = aiter(alice)
        await data_until(messages, "data mock for: 1")
        assert server.subscribers == [1]
        with pytest.raises(SubscriptionClosed) as info:
            await bob.unsubscribe()
        assert info.value.status == "PERMISSION_DENIED"
        assert info.value.detail == "bob may not unsubscribe 1"
        assert server.rejected == collections.Counter({"PERMISSION_DENIED": 1})
        # nothing was touched: Alice's stream carries on
        server.send(1, "after bob")
        await data_until(messages, "after bob")
        assert alice.connections == 1
        # the owner may end it: her iteration ends normally (status OK)
        assert await alice.unsubscribe() == Response()
        async with asyncio.timeout(TIMEOUT):
            async for _ in messages:
                pass
        assert server.subscribers == []
        assert server.rejected == collections.Counter({"PERMISSION_DENIED": 1})


async def test_another_caller_cannot_take_over_a_subscription(
    listener: socket.socket, auth_settings: Settings
) -> None:
    """Subscribing with a taken id would end the owner's stream: the Unsubscribe rule applies."""
    async with (
        running(auth_settings, listener) as server,
        ResilientClient(1, settings=with_token(auth_settings, "tok-a")) as alice,
        ResilientClient(1, settings=with_token(auth_settings, "tok-b")) as bob,
    ):
        messages = aiter(alice)
        await data_until(messages, "data mock for: 1")
        with pytest.raises(SubscriptionClosed) as info:
            async with asyncio.timeout(TIMEOUT):
                await anext(aiter(bob))
        assert (info.value.status, info.value.detail) == (
            "PERMISSION_DENIED",
            "bob may not take over the subscription 1",
        )
        assert bob.failures == 0
        assert server.rejected == collections.Counter({"PERMISSION_DENIED": 1})
        server.send(1, "after bob")
        await data_until(messages, "after bob")
        assert alice.connections == 1
        # the owner herself may replace her subscription
        async with ResilientClient(1, settings=with_token(auth_settings, "tok-a")) as again:
            await data_until(aiter(again), "data mock for: 1")
        assert server.rejected == collections.Counter({"PERMISSION_DENIED": 1})


async def test_a_finished_stream_does_not_hand_its_events_to_another_caller(
    listener: socket.socket, auth_settings: Settings
) -> None:
    """Bob resuming Alice's id from seq 0 after her stream ended used to get her secret."""
    async with running(auth_settings, listener) as server:
        async with ResilientClient(7, settings=with_token(auth_settings, "tok-a")) as alice:
            messages = aiter(alice)
            await data_until(messages, "data mock for: 7")
            secret = server.send(7, "alice's secret")
            await data_until(messages, "alice's secret")
        async with asyncio.timeout(TIMEOUT):
            await server.wait_for(lambda: not server.subscribers)
        bob = ResilientClient(
            7, settings=with_token(auth_settings, "tok-b"), resume_token=f"{secret.epoch}:0"
        )
        async with bob:
            with pytest.raises(SubscriptionClosed) as info:
                async with asyncio.timeout(TIMEOUT):
                    async for response in bob:
                        assert response.data != "alice's secret"
        assert (info.value.status, info.value.detail) == (
            "PERMISSION_DENIED",
            "bob may not take over the subscription 7",
        )
        assert bob.delivered == 0


class AllowListManager(SubscriptionManager):
    """Callers may subscribe only as the ids on their allow-list."""

    def authorize_subscribe(self, caller: Caller, request: Request) -> bool:
        return request.id in ALLOW_LIST.get(caller.name, frozenset())


async def test_authorize_subscribe_override_refuses_other_ids(
    listener: socket.socket, auth_settings: Settings
) -> None:
    async with (
        running(auth_settings, listener, AllowListManager) as server,
        ResilientClient(1, settings=with_token(auth_settings, "tok-a")) as alice,
        ResilientClient(1, settings=with_token(auth_settings, "tok-b")) as bob_as_1,
        ResilientClient(2, settings=with_token(auth_settings, "tok-b")) as bob,
    ):
        alice_messages = aiter(alice)
        await data_until(alice_messages, "data mock for: 1")
        with pytest.raises(SubscriptionClosed) as info:
            async with asyncio.timeout(TIMEOUT):
                await anext(aiter(bob_as_1))
        assert (info.value.status, info.value.detail) == (
            "PERMISSION_DENIED",
            "bob may not subscribe as 1",
        )
        assert bob_as_1.failures == 0
        await data_until(aiter(bob), "data mock for: 2")
        assert sorted(server.subscribers) == [1, 2]
        server.send(1, "after bob")
        await data_until(alice_messages, "after bob")
        assert server.rejected == collections.Counter({"PERMISSION_DENIED": 1})


# -------------------------------------------------------------------------- limits


async def test_max_subscribers_refuses_new_ids_but_not_resubscribes(
    listener: socket.socket, quiet: Settings
) -> None:
    limited = quiet.model_copy(update={"limits": LimitSettings(max_subscribers=2)})
    channel, other = channel_for(limited), raw_channel(limited)
    try:
        async with (
            running(limited, listener) as server,
            subscription(channel, 1) as one,
            subscription(channel, 2) as two,
        ):
            error = await refusal(other, Request(id=3))
            assert (error.status, error.message) == (
                Status.RESOURCE_EXHAUSTED,
                "too many subscribers (limit 2)",
            )
            assert server.rejected == collections.Counter({"RESOURCE_EXHAUSTED": 1})
            # an existing id may subscribe again: it replaces the old stream (status OK)
            async with subscription(other, 2) as new_two:
                async with asyncio.timeout(TIMEOUT):
                    while await two.recv_message() is not None:
                        pass
                    await two.recv_trailing_metadata()  # raises unless the status is OK
                assert sorted(server.subscribers) == [1, 2]
                await still_receives(server, new_two, 2)
                await still_receives(server, one, 1)
            assert server.rejected == collections.Counter({"RESOURCE_EXHAUSTED": 1})
    finally:
        channel.close()
        other.close()


async def test_oversized_request_is_resource_exhausted(
    listener: socket.socket, quiet: Settings
) -> None:
    limited = quiet.model_copy(update={"limits": LimitSettings(max_message_size=1024)})
    request = Request(id=5, topics=[f"{n:03}" + "t" * 197 for n in range(10)])
    size = len(bytes(request))
    assert size > 1024
    channel, other = channel_for(limited), raw_channel(limited)
    try:
        async with running(limited, listener) as server, subscription(channel, 1) as one:
            error = await refusal(other, request)
            assert error.status is Status.RESOURCE_EXHAUSTED
            assert error.message == f"request of {size} bytes exceeds the limit of 1024"
            assert server.rejected == collections.Counter({"RESOURCE_EXHAUSTED": 1})
            assert server.subscribers == [1]
            await still_receives(server, one, 1)
            # just under the limit is fine
            async with subscription(other, Request(id=5, topics=request.topics[:4])) as five:
                await still_receives(server, five, 5)
    finally:
        channel.close()
        other.close()


async def test_client_whose_request_is_too_large_gives_up_at_once(
    listener: socket.socket, quiet: Settings
) -> None:
    limited = quiet.model_copy(
        update={
            "limits": LimitSettings(max_message_size=1024),
            "backoff": BackoffSettings(initial=0.01, max=0.01, max_attempts=3),
        }
    )
    topics = [f"{n:03}" + "t" * 197 for n in range(10)]
    async with (
        running(limited, listener),
        ResilientClient(5, settings=limited, topics=topics) as client,
    ):
        with pytest.raises(SubscriptionClosed) as info:
            async with asyncio.timeout(TIMEOUT):
                await anext(aiter(client))
        assert info.value.status == "RESOURCE_EXHAUSTED"
        assert client.failures == 0


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        pytest.param(Request(id=-1), "id must be >= 0, got -1", id="negative-id"),
        pytest.param(
            Request(id=7, topics=["news", ""]),
            "topic '' must be 1-256 characters long",
            id="empty-topic",
        ),
        pytest.param(
            Request(id=7, topics=["x" * 257]),
            f"topic {'x' * 40!r} must be 1-256 characters long",
            id="long-topic",
        ),
        pytest.param(
            Request(id=7, topics=[f"t{n}" for n in range(257)]),
            "too many topics: 257 (at most 256)",
            id="too-many-topics",
        ),
        pytest.param(
            Request(id=7, resume_token="r" * 257),
            "resume_token is 257 characters (at most 256)",
            id="long-resume-token",
        ),
    ],
)
async def test_invalid_request_is_invalid_argument(
    server: SubscriptionManager, quiet: Settings, request_: Request, message: str
) -> None:
    channel, other = channel_for(quiet), raw_channel(quiet)
    try:
        async with subscription(channel, 1) as one:
            error = await refusal(other, request_)
            assert (error.status, error.message) == (Status.INVALID_ARGUMENT, message)
            assert server.rejected == collections.Counter({"INVALID_ARGUMENT": 1})
            assert server.subscribers == [1]
            await still_receives(server, one, 1)
    finally:
        channel.close()
        other.close()


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"\xff" * 11, id="overlong-varint"),
        pytest.param(b"\x08", id="truncated-varint"),
        pytest.param(b"\x1a\x02\xff\xfe", id="topic-not-utf8"),
        # the decoder turns a field with the wrong wire type into None: caught after it
        pytest.param(b"\x0f", id="id-with-wire-type-7"),
        pytest.param(b"\x1b", id="topic-with-wire-type-3"),
        # betterproto2 alone would read these as a Request: protobuf's strict parser does not
        pytest.param(b"garbage bytes!", id="ascii-garbage"),
        pytest.param(b"\x12\x10ab", id="truncated-resume-token"),
    ],
)
async def test_undecodable_request_is_invalid_argument(
    server: SubscriptionManager, quiet: Settings, payload: bytes
) -> None:
    channel, other = channel_for(quiet), raw_channel(quiet)
    try:
        async with subscription(channel, 1) as one:
            error = await refusal(other, payload)
            assert error.status is Status.INVALID_ARGUMENT
            # the rest of the message is the decoder's own explanation
            assert error.message is not None
            assert error.message.startswith("malformed Request message: ")
            assert server.rejected == collections.Counter({"INVALID_ARGUMENT": 1})
            assert server.subscribers == [1]
            await still_receives(server, one, 1)
    finally:
        channel.close()
        other.close()
