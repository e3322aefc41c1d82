"""A small load run in the gate (``tests/prove/load.py``; ``just load`` runs 10,000
subscribers): 1,100 streams on one connection (past the default 1024 streams per
connection, raised as a user would) all receive each broadcast, and the server lets go of
them. Time to open and latencies are reported by ``just load``, never asserted.
"""

from __future__ import annotations

import pytest

from tests.prove.load import load


@pytest.mark.timeout(180)
async def test_every_subscriber_gets_every_broadcast() -> None:
    run = await load(subscribers=1_100, generators=1, connections=1, broadcasts=2)
    assert run.problems() == []
    assert len(run.latencies) == 2 * 1_100
    assert run.opened is not None
    assert run.opened.subscribers == 1_100
    assert run.after is not None
    assert run.after.released(run.before)  # type: ignore[arg-type]  # set by the run
