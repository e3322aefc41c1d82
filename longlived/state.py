"""Keyed state: the latest value of every key, for subscribers that start from a snapshot.

A keyed event (``put(key, message)``, ``delete(key)``) is an event like any other: it has
a position and goes to every subscriber of its topic. The hub also keeps its effect here,
one key space per topic, so a subscriber asking for a snapshot gets every current value,
then SYNCED, then live changes, all at one position (registration is synchronous: no
change falls between the snapshot and the live events, and none comes twice).

Each value is kept as its encoded SNAPSHOT message, built once when the key was put and
shared by every snapshot. The core knows nothing of gRPC.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import dataclass

from longlived.errors import StateFull

__all__ = ["Entry", "KeyedState"]


@dataclass(frozen=True, slots=True)
class Entry:
    """One key's current value."""

    seq: int
    """The position of the put that set it (its revision)."""
    data: str
    payload: bytes
    """The encoded ``google.protobuf.Any``."""
    message: bytes
    """Its encoded SNAPSHOT message."""


class KeyedState:
    """The latest value of every key, by topic, bounded to ``max_keys`` keys in all."""

    def __init__(self, *, max_keys: int) -> None:
        self.max_keys = max_keys
        self._topics: dict[str, dict[str, Entry]] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def check(self, topic: str, key: str) -> None:
        """Raise ``StateFull`` if putting ``key`` would add one key too many."""
        if self._count >= self.max_keys and key not in self._topics.get(topic, {}):
            raise StateFull(
                f"the keyed state holds {self._count} keys (state.max_keys): "
                f"{key!r} on topic {topic!r} was not put"
            )

    def put(self, topic: str, key: str, entry: Entry) -> None:
        """Set ``key`` of ``topic`` (beyond ``max_keys`` too: the caller checked, or a
        shared log did)."""
        keys = self._topics.setdefault(topic, {})
        if key not in keys:
            self._count += 1
        keys[key] = entry

    def delete(self, topic: str, key: str) -> None:
        """Remove ``key`` of ``topic`` (nothing if it is not there)."""
        keys = self._topics.get(topic)
        if keys is not None and keys.pop(key, None) is not None:
            self._count -= 1
            if not keys:
                del self._topics[topic]

    def get(self, topic: str, key: str) -> Entry | None:
        """The current value of ``key`` in ``topic``, if any."""
        return self._topics.get(topic, {}).get(key)

    def items(self, topic: str) -> Iterator[tuple[str, Entry]]:
        """Every key of ``topic`` and its value."""
        return iter(list(self._topics.get(topic, {}).items()))

    def snapshot(self, topics: Collection[str]) -> list[bytes]:
        """The SNAPSHOT messages of every key in ``topics`` (every topic if empty)."""
        chosen = self._topics.keys() if not topics else [t for t in topics if t in self._topics]
        return [entry.message for topic in chosen for entry in self._topics[topic].values()]

    def clear(self) -> None:
        """Forget every key (the log it mirrors was replaced)."""
        self._topics.clear()
        self._count = 0
