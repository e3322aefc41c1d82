"""The soak subset of the gate (``tests/prove/soak.py``; ``just soak`` runs the full one):
2,000 subscribe/unsubscribe cycles, ended each of the six ways, and a numbered stream to
resilient subscribers, against a server process whose tasks, file descriptors,
subscribers and connections must come back to the baseline (its RSS and gc objects within
a small slack). Timings are reported by ``just soak``, never asserted.
"""

from __future__ import annotations

import pytest

from tests.prove.soak import ENDINGS, soak


@pytest.mark.timeout(180)
async def test_cycles_and_a_stream_leave_the_server_as_it_was() -> None:
    run = await soak(cycles=2_000, events=3_000, workers=16, warm_up=1_000, history=10_000)
    assert run.problems() == []
    cycles, stream = run.phases
    assert sum(cycles.outcomes[ending] for ending in ENDINGS) == 2_000
    assert set(cycles.outcomes) == set(ENDINGS)
    assert stream.outcomes["delivered"] == 2 * 3_000  # two subscribers, each number once
    assert cycles.peak is not None
    assert cycles.peak.connections > run.baseline.connections  # the server was really used
