"""Typed payloads: the application's own protobuf messages as events.

An event's typed payload travels as a ``google.protobuf.Any`` (``Response.payload``,
``PublishRequest.payload``): a type URL naming the message, and its bytes. ``pack`` makes
one from any betterproto2 message; ``unpack`` turns it back into the type the app expects,
checking that it is that type::

    published = await manager.emit(payload=pack(Order(id=42)), topic="orders")
    async for event in client.events(Order):  # TypedEvent[Order]: mypy sees Order
        print(event.payload.id)
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Generic, TypeVar

import betterproto2

from longlived._proto.google.protobuf import Any
from longlived.errors import LonglivedError

__all__ = ["PayloadTypeError", "TypedEvent", "encode_payload", "pack", "type_url", "unpack"]

M = TypeVar("M", bound=betterproto2.Message)

_PREFIX = "type.googleapis.com/"


class PayloadTypeError(LonglivedError, TypeError):
    """An event's payload is not of the message type the app asked for (or has none)."""


def type_url(message_type: type[betterproto2.Message]) -> str:
    """The ``Any`` type URL of a generated message class (its full protobuf name)."""
    descriptor = getattr(message_type, "DESCRIPTOR", None)
    full_name = getattr(descriptor, "full_name", None)
    if isinstance(full_name, str):
        return _PREFIX + full_name
    # without descriptors, the message pool of the class's generated package knows it
    module = sys.modules.get(message_type.__module__)
    pool = getattr(module, "default_message_pool", None)
    url = getattr(pool, "type_to_url", {}).get(message_type)
    if not isinstance(url, str):
        raise PayloadTypeError(f"{message_type.__name__} is not a generated protobuf message")
    return url


def pack(message: betterproto2.Message) -> Any:
    """``message`` as a ``google.protobuf.Any``, ready for ``emit(payload=...)`` or
    ``Publisher.publish(payload=...)``."""
    return Any(type_url=type_url(type(message)), value=bytes(message))


def encode_payload(message: betterproto2.Message) -> bytes:
    """The encoded ``Any`` for ``message``: itself if it is an ``Any`` already (longlived's
    class or the app's own generated one), else ``message`` packed."""
    if type_url(type(message)).endswith("/google.protobuf.Any"):
        return bytes(message)
    return bytes(pack(message))


def unpack(payload: Any | None, message_type: type[M]) -> M:
    """The ``message_type`` message a payload carries.

    Raises:
        PayloadTypeError: there is no payload, or it names another type.
    """
    if payload is None or not payload.type_url:
        raise PayloadTypeError(f"the event carries no payload (expected {message_type.__name__})")
    expected = type_url(message_type)
    # the part before the last "/" is a free-form prefix; the name after it is the type
    if payload.type_url.rpartition("/")[2] != expected.rpartition("/")[2]:
        raise PayloadTypeError(
            f"the payload is a {payload.type_url.rpartition('/')[2]}, "
            f"not a {expected.rpartition('/')[2]}"
        )
    return message_type.FromString(payload.value)


@dataclass(frozen=True, slots=True)
class TypedEvent(Generic[M]):
    """One DATA event with its payload decoded as the app's own message type."""

    payload: M
    """The event's payload, decoded."""
    token: str
    """The position to resume after this event."""
    topic: str
    """The topic the event was published on ("" for an event sent to one id)."""
    data: str
    """The text payload, if the publisher sent one too."""
    key: str = ""
    """For keyed state: the key this value was put under."""
