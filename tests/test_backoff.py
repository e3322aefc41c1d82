from __future__ import annotations

import itertools
import random

import pytest

from longlived import Backoff


def test_defaults_are_grpc_connection_backoff() -> None:
    backoff = Backoff()
    assert (backoff.initial, backoff.multiplier, backoff.jitter, backoff.max) == (
        1.0,
        1.6,
        0.2,
        120.0,
    )


def test_delays_grow_by_multiplier_and_cap_at_max() -> None:
    backoff = Backoff(initial=1.0, multiplier=2.0, jitter=0.0, max=10.0)
    assert [backoff.base(n) for n in range(6)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert backoff.base(10_000) == 10.0  # no overflow


def test_jitter_stays_within_bounds_and_varies() -> None:
    backoff = Backoff(initial=1.0, multiplier=1.6, jitter=0.2, max=120.0)
    rng = random.Random(42)
    for attempt in range(12):
        samples = [backoff.compute(attempt, rng) for _ in range(200)]
        base = backoff.base(attempt)
        assert all(0.8 * base <= s <= 1.2 * base for s in samples)
        assert len(set(samples)) > 100


def test_seeded_rng_is_deterministic() -> None:
    backoff = Backoff()
    first = list(itertools.islice(backoff.delays(random.Random(7)), 10))
    second = list(itertools.islice(backoff.delays(random.Random(7)), 10))
    assert first == second


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"initial": 0}, "initial"),
        ({"multiplier": 0.5}, "multiplier"),
        ({"jitter": 1.0}, "jitter"),
        ({"initial": 5.0, "max": 1.0}, "max"),
    ],
)
def test_invalid_parameters_are_named(kwargs: dict[str, float], fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        Backoff(**kwargs)
