"""``python -m tests.chaos.run [--runs N] [--only TEXT]`` (``just chaos``): every fault kind,
N runs each, one line of figures per kind. Exits 1 if any run lost, duplicated or reordered
an event (losses a RESET announced after an in-memory restart are reported, not failures).
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import sys
from datetime import UTC, datetime
from importlib.metadata import version

from tests.chaos.harness import FAULTS, Outcome, run_fault

HEADER = (
    "| fault | runs | published | delivered | lost | lost, announced by RESET | duplicated "
    "| out of order | recovery median (max) |"
)


async def main(runs: int, only: str) -> int:
    print(f"chaos run {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, Python {platform.python_version()}, "
          f"grpclib {version('grpclib')}, {platform.machine()} {platform.system()}")  # fmt: skip
    print(HEADER)
    print("|" + "---|" * 9)
    failed = False
    for kind in FAULTS:
        if only and only not in kind.name:
            continue
        outcomes: list[Outcome] = [await run_fault(kind) for _ in range(runs)]
        total = Outcome(
            published=sum(o.published for o in outcomes),
            delivered=sum(o.delivered for o in outcomes),
            lost=sum(o.lost for o in outcomes),
            announced=sum(o.announced for o in outcomes),
            duplicated=sum(o.duplicated for o in outcomes),
            out_of_order=sum(o.out_of_order for o in outcomes),
        )
        recoveries = [o.recovery for o in outcomes]
        bad = total.lost or total.duplicated or total.out_of_order
        bad = bad or (kind.lossless and total.announced)
        failed = failed or bool(bad)
        print(f"| {kind.name} | {runs} | {total.published} | {total.delivered} | {total.lost} "
              f"| {total.announced} | {total.duplicated} | {total.out_of_order} "
              f"| {statistics.median(recoveries):.2f} s ({max(recoveries):.2f} s) |",
              flush=True)  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m tests.chaos.run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", default="", help="only the fault kinds whose name has this")
    args = parser.parse_args()
    sys.exit(asyncio.run(main(args.runs, args.only)))
