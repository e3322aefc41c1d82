"""Jittered exponential backoff, as in gRPC's connection-backoff algorithm.

``Backoff`` is a value object: it holds the parameters and computes delays; it does no I/O
and owns no clock. Randomness is passed in, so a seeded ``random.Random`` makes it
deterministic.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["Backoff"]


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delay before retry ``attempt`` (0-based) is ``min(initial * multiplier**attempt, max)``,
    then spread uniformly by ``±jitter`` of itself.

    Attributes:
        initial: delay before the first retry, seconds.
        multiplier: growth factor per failed attempt.
        jitter: relative spread, 0 <= jitter < 1 (0.2 means ±20 %).
        max: cap on the delay before jitter, seconds.
    """

    initial: float = 1.0
    multiplier: float = 1.6
    jitter: float = 0.2
    max: float = 120.0

    def __post_init__(self) -> None:
        if self.initial <= 0:
            raise ValueError(f"initial must be > 0, got {self.initial}")
        if self.multiplier < 1:
            raise ValueError(f"multiplier must be >= 1, got {self.multiplier}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {self.jitter}")
        if self.max < self.initial:
            raise ValueError(f"max ({self.max}) must be >= initial ({self.initial})")

    def base(self, attempt: int) -> float:
        """The delay before retry ``attempt`` without jitter."""
        if attempt < 0:
            raise ValueError(f"attempt must be >= 0, got {attempt}")
        try:
            return min(self.initial * self.multiplier**attempt, self.max)
        except OverflowError:
            return self.max

    def compute(self, attempt: int, rng: random.Random) -> float:
        """The jittered delay before retry ``attempt``, in seconds."""
        base = self.base(attempt)
        return base * (1.0 + rng.uniform(-self.jitter, self.jitter))

    def delays(self, rng: random.Random) -> Iterator[float]:
        """An endless iterator of jittered delays for attempts 0, 1, 2, ..."""
        attempt = 0
        while True:
            yield self.compute(attempt, rng)
            attempt += 1
