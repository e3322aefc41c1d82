"""The chaos subset of the gate: one run of every fault kind of ``tests/chaos`` (real
processes: a server or two replicas on a Redis of their own, a publisher of a numbered
sequence, three subscribers behind proxies). ``just chaos`` runs more and prints figures.

No event may be lost, duplicated or reordered, except the losses a RESET announces after
the in-memory log is lost (a restart of the only server). Recovery times are reported by
``just chaos``, never asserted.
"""

from __future__ import annotations

import pytest

from tests.chaos.harness import FAULTS, Kind, run_fault


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", FAULTS, ids=[kind.name for kind in FAULTS])
async def test_no_event_is_silently_lost_duplicated_or_reordered(kind: Kind) -> None:
    outcome = await run_fault(kind)
    assert outcome.published > 20  # events flowed before and after the fault
    assert (outcome.lost, outcome.duplicated, outcome.out_of_order) == (0, 0, 0), outcome
    if kind.lossless:
        assert outcome.announced == 0, outcome
