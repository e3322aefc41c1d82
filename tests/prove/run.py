"""``python -m tests.prove.run soak|load|fuzz [flags]`` (``just soak``, ``just load``,
``just fuzz``): one full run, its figures printed as a Markdown table. Exits 1 if the run
found a problem (a lost, repeated or reordered event, a resource not released, an answer
the protocol does not give, a stream that did not get the broadcast). Timings are
reported, never judged.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from collections.abc import Sequence

from tests.prove.fuzz import KINDS, fuzz
from tests.prove.load import load
from tests.prove.probe import Resources, banner
from tests.prove.soak import soak


def _mib(kb: int) -> str:
    return f"{kb / 1024:.1f}"


def _resources(label: str, sample: Resources | None) -> str:
    if sample is None:
        return f"| {label} | - | - | - | - |"
    return (
        f"| {label} | {_mib(sample.rss_kb)} MiB | {sample.fds} | {sample.tasks} "
        f"| {sample.objects} |"
    )


def _problems(found: Sequence[str]) -> int:
    for problem in found[:20]:
        print(f"PROBLEM: {problem}")
    print("no problems" if not found else f"{len(found)} problems")
    return 1 if found else 0


async def run_soak(args: argparse.Namespace) -> int:
    print(banner("soak"), flush=True)
    result = await soak(
        cycles=args.cycles, events=args.events, rate=args.rate, size=args.size,
        clients=args.clients, workers=args.workers, history=args.history, seed=args.seed,
    )  # fmt: skip
    print("| phase | count | seconds | per second | outcomes |")
    print("|---|---|---|---|---|")
    for phase in result.phases:
        outcomes = ", ".join(f"{name} {n}" for name, n in sorted(phase.outcomes.items()))
        rate = phase.count / phase.seconds if phase.seconds else 0.0
        print(f"| {phase.name} | {phase.count} | {phase.seconds:.1f} | {rate:.0f} | {outcomes} |")
    print()
    print("| server | RSS | open fds | asyncio tasks | gc objects |")
    print("|---|---|---|---|---|")
    print(_resources("baseline", result.baseline))
    for phase in result.phases:
        print(_resources(f"{phase.name}: peak RSS", phase.peak))
        print(_resources(f"{phase.name}: after", phase.after))
    return _problems(result.problems())


async def run_load(args: argparse.Namespace) -> int:
    print(banner("load"), flush=True)
    result = await load(
        subscribers=args.subscribers, generators=args.generators,
        connections=args.connections, broadcasts=args.broadcasts,
    )  # fmt: skip
    ordered = sorted(result.latencies)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    print("| subscribers | connections | load generators | time to open all | server KB per "
          "subscriber | broadcasts | deliveries | latency median | p99 | worst |")  # fmt: skip
    print("|" + "---|" * 10)
    print(
        f"| {result.subscribers} | {result.connections} | {args.generators} "
        f"| {result.open_seconds:.2f} s | {result.kb_per_subscriber:.1f} | {args.broadcasts} "
        f"| {len(ordered)} | {statistics.median(ordered) * 1e3:.0f} ms | {p99 * 1e3:.0f} ms "
        f"| {ordered[-1] * 1e3:.0f} ms |"
    )
    print()
    print("| server | RSS | open fds | asyncio tasks | gc objects |")
    print("|---|---|---|---|---|")
    print(_resources("before", result.before))
    print(_resources("all subscribed", result.opened))
    print(_resources("after they left", result.after))
    return _problems(result.problems())


async def run_fuzz(args: argparse.Namespace) -> int:
    print(banner("fuzz"), flush=True)
    result = await fuzz(cases=args.cases, seed=args.seed, only=args.only)
    print(f"{result.cases} cases, seed {result.seed}, in {result.seconds:.0f} s")
    print("| kind | cases | answers |")
    print("|---|---|---|")
    for kind in KINDS:
        outcomes = result.outcomes.get(kind)
        if outcomes:
            answers = "; ".join(f"{label} {n}" for label, n in outcomes.most_common())
            print(f"| {kind} | {sum(outcomes.values())} | {answers} |")
    canary = result.canary
    if canary is not None:
        print(f"\ncanary: {canary.received} numbers of {result.ticked} published while it "
              f"listened, {len(canary.gaps)} gaps, longest silence {canary.longest:.2f} s "
              f"(one number every 10 ms)")  # fmt: skip
    print()
    print("| server | RSS | open fds | asyncio tasks | gc objects |")
    print("|---|---|---|---|---|")
    print(_resources("before", result.baseline))
    print(f"| peak after a batch | {_mib(max(result.rss_kb, default=0))} MiB | | | |")
    print(_resources("after", result.after))
    return _problems(result.problems())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.prove.run")
    commands = parser.add_subparsers(dest="command", required=True)
    s = commands.add_parser("soak", help="subscribe/unsubscribe cycles and a long stream")
    s.add_argument("--cycles", type=int, default=100_000)
    s.add_argument("--events", type=int, default=604_800, help="a week of a 1/s feed")
    s.add_argument("--rate", type=float, default=5_000.0, help="events per second")
    s.add_argument("--size", type=int, default=100, help="bytes of padding per event")
    s.add_argument("--clients", type=int, default=2, help="subscribers of the stream")
    s.add_argument("--workers", type=int, default=32, help="concurrent cycling connections")
    s.add_argument("--history", type=int, default=100_000, help="server replay.size")
    s.add_argument("--seed", type=int, default=1)
    lo = commands.add_parser("load", help="concurrent subscribers receive a broadcast")
    lo.add_argument("--subscribers", type=int, default=10_000)
    lo.add_argument("--generators", type=int, default=2, help="load-generator processes")
    lo.add_argument("--connections", type=int, default=8, help="in all")
    lo.add_argument("--broadcasts", type=int, default=10)
    f = commands.add_parser("fuzz", help="hostile input against the port, with a canary")
    f.add_argument("--cases", type=int, default=20_000)
    f.add_argument("--seed", type=int, default=1)
    f.add_argument("--only", default="", help=f"only the kinds named so: {', '.join(KINDS)}")
    args = parser.parse_args(argv)
    runner = {"soak": run_soak, "load": run_load, "fuzz": run_fuzz}[args.command]
    return asyncio.run(runner(args))


if __name__ == "__main__":
    sys.exit(main())
