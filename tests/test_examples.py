from __future__ import annotations

from examples import typed_app


async def test_typed_app_receives_its_own_events() -> None:
    ticks = await typed_app.main(count=3)
    assert len(ticks) == 3
    for tick in ticks:
        symbol, price = tick.split()
        assert symbol in {"ACME", "INITECH"}
        assert 90 < float(price) < 110
