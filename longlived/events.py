"""Events and their positions: what the hub emits and how a subscriber names where it is.

Every event has a position ``(epoch, seq)``: ``seq`` grows by one per event, ``epoch`` is random
per hub lifetime, so positions from a previous server run are recognised as foreign. A position
travels as an opaque token.
"""

from __future__ import annotations

import enum
from collections.abc import Collection
from dataclasses import dataclass
from typing import Protocol

__all__ = ["Encoder", "Event", "Kind", "Position", "Published"]


class Kind(enum.IntEnum):
    """Message kinds; the values are the wire's ``Response.Kind``."""

    DATA = 0
    """An event."""
    HEARTBEAT = 1
    """Nothing new: the stream is alive, at the position it carries."""
    RESET = 2
    """Events were lost for this subscriber: resync, then carry on."""
    SNAPSHOT = 3
    """One current value of the keyed state."""
    SYNCED = 4
    """The snapshot is complete; live changes follow."""


@dataclass(frozen=True, slots=True)
class Position:
    """Where an event sits: an epoch (one per hub lifetime) and a sequence number."""

    epoch: str
    """The run of the log the position belongs to."""
    seq: int
    """The event's sequence number within the epoch."""

    @property
    def token(self) -> str:
        """The opaque resume token for this position."""
        return f"{self.epoch}:{self.seq}"

    @classmethod
    def parse(cls, token: str) -> Position | None:
        """The position a token names, or None if it is malformed."""
        epoch, sep, seq = token.partition(":")
        # isdigit() also accepts characters like "²" that int() rejects
        if not sep or not epoch or not (seq.isascii() and seq.isdecimal()) or len(seq) > 20:
            return None
        return cls(epoch, int(seq))


@dataclass(frozen=True, slots=True)
class Published:
    """What publishing an event returned: its position, and whether it was a duplicate."""

    position: Position
    """Where the event sits (``position.token`` resumes right after it)."""
    duplicate: bool = False
    """The idempotency key was seen within the window: nothing was emitted, and
    ``position`` is the first publish's."""


@dataclass(frozen=True, slots=True)
class Event:
    """One emitted event, as kept in the history."""

    seq: int
    """Its sequence number."""
    topic: str
    """The topic it was published on ("" for an event sent to one id)."""
    target: int | None
    """The one subscriber id it is for (``send``), or None for every match (``publish``)."""
    message: bytes
    """The encoded DATA message."""

    def matches(self, id: int, topics: Collection[str]) -> bool:
        """Whether the subscriber ``id`` with ``topics`` receives this event."""
        if self.target is not None:
            return self.target == id
        return not topics or self.topic in topics


class Encoder(Protocol):
    """``encode(kind, position, data, topic, payload, key=, deleted=) -> bytes``: one wire
    message (``payload`` an encoded ``google.protobuf.Any``; ``key`` for keyed events)."""

    def __call__(
        self,
        kind: Kind,
        position: Position,
        data: str,
        topic: str,
        payload: bytes = b"",
        *,
        key: str = "",
        deleted: bool = False,
    ) -> bytes: ...
