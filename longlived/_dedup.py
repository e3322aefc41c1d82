"""Idempotency keys: a publish retried with the same key within a window is emitted once."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from longlived.events import Position

__all__ = ["Deduplicator"]


class Deduplicator:
    """The positions of the keys seen in the last ``window`` seconds (at most ``max_keys``).

    Keys expire in the order they arrived, so expiry is a walk from the oldest; past
    ``max_keys`` the oldest are forgotten early (a retry that late is emitted again).
    """

    def __init__(
        self, *, window: float, max_keys: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.window = window
        self.max_keys = max_keys
        self._clock = clock
        self._seen: OrderedDict[str, tuple[float, Position]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def get(self, key: str) -> Position | None:
        """The position ``key`` was first published at, if it is still remembered."""
        self._expire()
        seen = self._seen.get(key)
        return seen[1] if seen is not None else None

    def remember(self, key: str, position: Position) -> None:
        """``key`` was just published at ``position``."""
        self._seen[key] = (self._clock() + self.window, position)
        while len(self._seen) > self.max_keys:
            self._seen.popitem(last=False)

    def _expire(self) -> None:
        now, seen = self._clock(), self._seen
        while seen:
            key, (expires, _) = next(iter(seen.items()))
            if expires > now:
                return
            del seen[key]
