"""Property tests: hostile or random input never breaks the rules (hypothesis).

Tokens, request bodies and settings come from outside; whatever they are, the answer is a
value or the one error that names the problem. The hub's keyed state is checked against a
plain dict: a subscriber joining at any point, from a snapshot, ends with exactly the
state, whatever the sequence of puts and deletes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from hypothesis import given, settings
from hypothesis import strategies as st

from examples.inventory._proto.inventory import Item
from longlived import ConfigError, Hub, Position, Response, ResponseKind, load_settings, pack
from longlived._proto.google.protobuf import Any as ProtoAny
from longlived._proto.longlived import PublishRequest, Request
from longlived._status import CallError
from longlived._wire import (
    _strict_class,
    check_publish,
    check_request,
    decode_request,
    encode_message,
)
from longlived.events import Kind

quick = settings(max_examples=200, deadline=None)


def refusal(check: Callable[[], object]) -> CallError | None:
    """The refusal ``check()`` raised, or None."""
    try:
        check()
    except CallError as exc:
        return exc
    return None


# ------------------------------------------------------------------------ tokens


@quick
@given(
    epoch=st.text(min_size=1, max_size=40).filter(lambda e: ":" not in e),
    seq=st.integers(min_value=0, max_value=2**64 - 1),
)
def test_every_position_survives_its_token(epoch: str, seq: int) -> None:
    position = Position(epoch, seq)
    assert Position.parse(position.token) == position


@quick
@given(st.text(max_size=60))
def test_any_text_parses_to_a_position_or_none(text: str) -> None:
    position = Position.parse(text)
    if position is not None:
        assert position.epoch
        assert position.seq >= 0
        assert Position.parse(position.token) == position


# ------------------------------------------------------------------------ responses


@quick
@given(
    kind=st.sampled_from(Kind),
    epoch=st.text(min_size=1, max_size=20).filter(lambda e: ":" not in e),
    seq=st.integers(min_value=0, max_value=2**64 - 1),
    data=st.text(max_size=300),
    topic=st.text(max_size=40),
    payload=st.none() | st.tuples(st.text(min_size=1, max_size=40), st.binary(max_size=300)),
    key=st.text(max_size=40),
    deleted=st.booleans(),
)
def test_responses_are_the_bytes_protobuf_writes(
    kind: Kind,
    epoch: str,
    seq: int,
    data: str,
    topic: str,
    payload: tuple[str, bytes] | None,
    key: str,
    deleted: bool,
) -> None:
    any_ = ProtoAny(type_url=payload[0], value=payload[1]) if payload else None
    message = encode_message(
        kind,
        Position(epoch, seq),
        data,
        topic,
        bytes(any_) if any_ else b"",
        key=key,
        deleted=deleted,
    )
    token = "" if kind is Kind.SNAPSHOT else f"{epoch}:{seq}"
    # protobuf's own encoder (upb), from the descriptor: the same bytes, field for field
    expected = _strict_class(Response)(
        data=data, seq=seq, token=token, kind=kind.value, topic=topic, key=key, deleted=deleted
    )
    if any_ is not None:
        expected.payload.type_url, expected.payload.value = any_.type_url, any_.value
    assert message == expected.SerializeToString(deterministic=True)
    decoded = Response.FromString(message)
    assert (decoded.data, decoded.seq, decoded.token, decoded.kind) == (
        data,
        seq,
        token,
        ResponseKind(kind.value),
    )
    assert (decoded.topic, decoded.key, decoded.deleted) == (topic, key, deleted)
    assert decoded.payload == any_


# -------------------------------------------------------------------- request bodies


@quick
@given(st.binary(max_size=200))
def test_any_bytes_decode_to_a_checked_request_or_a_named_refusal(data: bytes) -> None:
    refused = refusal(lambda: check_request(decode_request(data, Request, max_size=100)))
    if refused is not None:
        assert refused.message  # names the problem
        if len(data) > 100:
            assert refused.code.name == "RESOURCE_EXHAUSTED"


@quick
@given(st.binary(max_size=200))
def test_any_bytes_decode_to_a_checked_publish_or_a_named_refusal(data: bytes) -> None:
    refused = refusal(lambda: check_publish(decode_request(data, PublishRequest, max_size=1000)))
    assert refused is None or refused.message


@quick
@given(
    id=st.integers(min_value=-(2**31), max_value=2**31 - 1),
    token=st.text(max_size=300),
    topics=st.lists(st.text(max_size=300), max_size=5),
    heartbeat=st.integers(min_value=0, max_value=2**32 - 1),
    snapshot=st.booleans(),
)
def test_a_well_formed_request_is_refused_only_with_a_reason(
    id: int, token: str, topics: list[str], heartbeat: int, snapshot: bool
) -> None:
    request = Request(
        id=id, resume_token=token, topics=topics, heartbeat_ms=heartbeat, snapshot=snapshot
    )
    refused = refusal(
        lambda: check_request(decode_request(bytes(request), Request, max_size=10_000))
    )
    if refused is not None:
        assert refused.code.name == "INVALID_ARGUMENT"
        assert id < 0 or len(token) > 256 or any(not 0 < len(t) <= 256 for t in topics)
    else:
        assert id >= 0


# ------------------------------------------------------------------------- settings


@contextmanager
def env(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


@quick
@given(
    name=st.sampled_from(
        [
            "LONGLIVED_INTERVAL",
            "LONGLIVED_QUEUE__SIZE",
            "LONGLIVED_QUEUE__POLICY",
            "LONGLIVED_BACKOFF__MAX",
            "LONGLIVED_ADDRESS",
            "LONGLIVED_STATE__MAX_KEYS",
            "LONGLIVED_TOPICS",
        ]
    ),
    value=st.text(
        alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"),
        max_size=30,
    ),
)
def test_any_env_value_gives_settings_or_an_error_naming_the_variable(
    name: str, value: str
) -> None:
    with env(name, value):
        problem = None
        try:
            load_settings()
        except ConfigError as exc:
            problem = str(exc)
    assert problem is None or name in problem


# ----------------------------------------------------------------------- keyed state

KEYS = st.sampled_from(["a", "b", "c", "d"])
CHANGES = st.lists(
    st.tuples(KEYS, st.one_of(st.none(), st.integers(min_value=0, max_value=9))), max_size=40
)


@quick
@given(before=CHANGES, after=CHANGES, queue=st.integers(min_value=1, max_value=8))
async def test_a_snapshot_at_any_point_plus_the_changes_after_it_is_the_state(
    before: list[tuple[str, int | None]], after: list[tuple[str, int | None]], queue: int
) -> None:
    hub = Hub(encode=encode_message, queue_size=queue, history_size=5, policy="drop")
    model: dict[str, int] = {}

    def change(key: str, count: int | None) -> None:
        if count is None:
            hub.emit(topic="t", key=key, deleted=True)
            model.pop(key, None)
        else:
            hub.emit(topic="t", key=key, payload=bytes(pack(Item(sku=key, count=count))))
            model[key] = count

    for key, count in before:
        change(key, count)
    sub = hub.register(1, topics=["t"], snapshot=True)
    for key, count in after:  # may overflow the queue: the drop policy resnapshots
        change(key, count)
    seen: dict[str, int] = {}
    pending: dict[str, int] | None = None
    for message in await sub.take() or []:
        response = Response.FromString(message)
        count = Item.FromString(response.payload.value).count if response.payload else 0
        if response.kind == ResponseKind.SNAPSHOT:
            pending = (pending or {}) | {response.key: count}
        elif response.kind == ResponseKind.SYNCED:
            seen, pending = pending or {}, None
        elif response.deleted:
            seen.pop(response.key, None)
        else:
            seen[response.key] = count
    assert seen == model
