"""The fuzz subset of the gate (``tests/prove/fuzz.py``; ``just fuzz`` runs 20,000 cases):
a short seeded run of every kind of hostile input against a server process, each case
answered as the protocol says, while a canary subscriber receives every number of a
sequence with no gap, and with the server back to its baseline after every batch.
"""

from __future__ import annotations

import pytest

from tests.prove.fuzz import KINDS, fuzz


@pytest.mark.timeout(180)
async def test_hostile_input_is_answered_and_the_canary_loses_nothing() -> None:
    run = await fuzz(cases=250, seed=11)
    assert run.problems() == []
    assert set(run.outcomes) == set(KINDS)  # every kind ran
    assert run.canary is not None
    assert run.canary.received == run.ticked > 0
