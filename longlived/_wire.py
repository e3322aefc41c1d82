"""The wire format: encoding responses, decoding and checking requests.

Nothing here knows grpclib: problems are raised as ``CallError`` with the status to send.
"""

from __future__ import annotations

import functools
from typing import Any, TypeVar

import betterproto2
from google.protobuf import message_factory

from longlived._proto.google.protobuf import Any as ProtoAny
from longlived._proto.longlived import PublishRequest, Request
from longlived._status import CallError, Code
from longlived.events import Kind, Position

__all__ = [
    "HEARTBEAT_HEADER",
    "MAX_ID",
    "MAX_TOKEN_LENGTH",
    "MAX_TOPICS",
    "MAX_TOPIC_LENGTH",
    "NO_RETRY_HEADER",
    "PACKAGES",
    "check_keyed",
    "check_publish",
    "check_request",
    "check_topics",
    "decode_request",
    "encode_message",
    "too_large",
]

PACKAGES = ("longlived", "protos")
"""Proto packages whose ``Longlived`` paths the server answers on (``protos``: the original's)."""

HEARTBEAT_HEADER = "longlived-heartbeat-ms"
"""Initial-metadata key: the heartbeat period the server granted, in milliseconds."""

NO_RETRY_HEADER = "longlived-no-retry"
"""Trailing-metadata key on a refusal that resending the same request cannot overcome."""

MAX_ID = 2**31 - 1
"""The largest subscriber id (``int32`` on the wire)."""
MAX_TOPICS = 256
MAX_TOPIC_LENGTH = 256
MAX_TOKEN_LENGTH = 256
MAX_KEY_LENGTH = 256
MAX_TYPE_URL_LENGTH = 2048

M = TypeVar("M", bound=betterproto2.Message)


_SMALL = [bytes([i]) for i in range(0x80)]  # one-byte varints


def _varint(value: int) -> bytes:
    if value < 0x80:
        return _SMALL[value]
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _text(tag: bytes, value: str) -> bytes:
    """A length-delimited field (``tag``) holding ``value`` encoded as UTF-8."""
    raw = value.encode()
    return tag + _varint(len(raw)) + raw


def encode_message(
    kind: Kind,
    position: Position,
    data: str,
    topic: str,
    payload: bytes = b"",
    *,
    key: str = "",
    deleted: bool = False,
) -> bytes:
    """One wire ``Response`` of ``kind`` at ``position``.

    Written field by field as protobuf's own encoder does (fields in number order, proto3
    defaults left out): this fixed message is on every event's path, and a generic encoder
    costs ten times more. ``payload`` is an encoded ``google.protobuf.Any``, written as
    field 6 as it is, never decoded and encoded again. A SNAPSHOT message carries no token:
    a stream cut within a snapshot must not resume from the middle of it.
    """
    parts: list[bytes] = []
    if data:
        parts.append(_text(b"\x0a", data))  # 1: data
    seq = position.seq
    if seq:
        parts.append(b"\x10" + _varint(seq))  # 2: seq
    if kind is not Kind.SNAPSHOT:
        parts.append(_text(b"\x1a", position.token))  # 3: token (never empty)
    if kind:
        parts.append(b"\x20" + _SMALL[kind])  # 4: kind
    if topic:
        parts.append(_text(b"\x2a", topic))  # 5: topic
    if payload:
        parts.append(b"\x32" + _varint(len(payload)) + payload)  # 6: payload
    if key:
        parts.append(_text(b"\x3a", key))  # 7: key
    if deleted:
        parts.append(b"\x40\x01")  # 8: deleted
    return b"".join(parts)


def too_large(size: int, max_size: int) -> CallError:
    """The refusal of a request of ``size`` bytes over the limit (resending cannot help)."""
    return CallError(
        Code.RESOURCE_EXHAUSTED,
        f"request of {size} bytes exceeds the limit of {max_size}",
        final=True,
    )


def decode_request(data: bytes, message_type: type[M], *, max_size: int) -> M:
    """Decode one request body, or raise the ``CallError`` that names what is wrong with it."""
    if len(data) > max_size:
        raise too_large(len(data), max_size)
    try:
        # betterproto2 skips what it cannot read; protobuf's parser is strict about the wire
        _strict_class(message_type).FromString(data)
        return message_type.FromString(data)
    except Exception as exc:
        raise CallError(
            Code.INVALID_ARGUMENT, f"malformed {message_type.__name__} message: {exc}"
        ) from None


@functools.cache
def _strict_class(message_type: Any) -> Any:
    """protobuf's own message class for a generated betterproto2 message type."""
    return message_factory.GetMessageClass(message_type.DESCRIPTOR)


def check_topics(topics: list[str]) -> str | None:
    """What is wrong with ``topics``, or None."""
    if len(topics) > MAX_TOPICS:
        return f"too many topics: {len(topics)} (at most {MAX_TOPICS})"
    for topic in topics:
        if not 0 < len(topic) <= MAX_TOPIC_LENGTH:
            return f"topic {topic[:40]!r} must be 1-{MAX_TOPIC_LENGTH} characters long"
    return None


_FIELD_TYPES: dict[str, type] = {
    "id": int,
    "resume_token": str,
    "heartbeat_ms": int,
    "accept_control": bool,
    "snapshot": bool,
}


def _check_types(request: Request) -> None:
    # The decoder is lenient: bytes with the wrong wire type for a field can decode to a
    # value of the wrong Python type (a list for ``id``, None, ...).
    for name, kind in _FIELD_TYPES.items():
        value = getattr(request, name)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise CallError(
                Code.INVALID_ARGUMENT, f"malformed Request message: {name} is {value!r}"
            )
    topics = request.topics
    if not isinstance(topics, list) or not all(isinstance(t, str) for t in topics):
        raise CallError(Code.INVALID_ARGUMENT, "malformed Request message: topics")


def check_keyed(key: str, delete: bool, to: int | None, payload: bool) -> str | None:
    """What is wrong with a keyed event (a put or a delete of ``key``), or None."""
    if not key:
        return "delete needs the key to remove" if delete else None
    if len(key) > MAX_KEY_LENGTH:
        return f"key is {len(key)} characters (at most {MAX_KEY_LENGTH})"
    if to is not None:
        return "a keyed event goes to a topic, not to one id (to)"
    if not delete and not payload:
        return f"a put of key {key[:40]!r} needs a payload (the key's new value)"
    return None


def check_publish(request: PublishRequest) -> None:
    """Raise INVALID_ARGUMENT, naming the problem, for an event nobody may publish."""
    if not isinstance(request.key, str) or not isinstance(request.delete, bool):
        raise CallError(Code.INVALID_ARGUMENT, "malformed PublishRequest message: key")
    if request.payload is not None and not isinstance(request.payload, ProtoAny):
        # a field 5 of another wire type decodes to whatever it holds (found by hypothesis)
        raise CallError(Code.INVALID_ARGUMENT, "malformed PublishRequest message: payload")
    for name in ("data", "topic", "idempotency_key"):
        if not isinstance(getattr(request, name), str):
            raise CallError(Code.INVALID_ARGUMENT, f"malformed PublishRequest message: {name}")
    to = request.to
    if to is not None and (not isinstance(to, int) or isinstance(to, bool)):
        raise CallError(Code.INVALID_ARGUMENT, f"malformed PublishRequest message: to is {to!r}")
    if to is not None and to < 0:
        raise CallError(Code.INVALID_ARGUMENT, f"to must be >= 0, got {to}")
    if to is not None and request.topic:
        raise CallError(
            Code.INVALID_ARGUMENT, "an event goes to a topic or to one id (to), not both"
        )
    if request.topic and (problem := check_topics([request.topic])):
        raise CallError(Code.INVALID_ARGUMENT, problem)
    if len(request.idempotency_key) > MAX_KEY_LENGTH:
        raise CallError(
            Code.INVALID_ARGUMENT,
            f"idempotency_key is {len(request.idempotency_key)} characters "
            f"(at most {MAX_KEY_LENGTH})",
        )
    if problem := check_keyed(request.key, request.delete, to, request.payload is not None):
        raise CallError(Code.INVALID_ARGUMENT, problem)
    payload = request.payload
    if payload is not None and not 0 < len(payload.type_url) <= MAX_TYPE_URL_LENGTH:
        raise CallError(
            Code.INVALID_ARGUMENT,
            f"payload.type_url must be 1-{MAX_TYPE_URL_LENGTH} characters long",
        )


def check_request(request: Request) -> None:
    """Raise INVALID_ARGUMENT, naming the problem, for a request no subscriber may make."""
    _check_types(request)
    if request.id < 0:
        raise CallError(Code.INVALID_ARGUMENT, f"id must be >= 0, got {request.id}")
    problem = check_topics(request.topics)
    if problem:
        raise CallError(Code.INVALID_ARGUMENT, problem)
    if request.heartbeat_ms < 0:
        raise CallError(
            Code.INVALID_ARGUMENT, f"heartbeat_ms must be >= 0, got {request.heartbeat_ms}"
        )
    if len(request.resume_token) > MAX_TOKEN_LENGTH:
        raise CallError(
            Code.INVALID_ARGUMENT,
            f"resume_token is {len(request.resume_token)} characters (at most {MAX_TOKEN_LENGTH})",
        )
