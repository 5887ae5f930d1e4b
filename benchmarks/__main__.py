"""Run the three benchmarks of issue 2 in order and record every figure.

    python -m benchmarks            # full sizes; writes benchmarks/results/issue2.json
    python -m benchmarks --quick    # smoke run in seconds; writes JSON only with --json

Each benchmark's module docstring says what it measures, against which peer and
why the comparison is fair. A quick run never overwrites the recorded figures.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from benchmarks import balance, insert_routing, slot_lookup
from benchmarks._common import RESULTS, console, environment, parse_args, write_json

BENCHMARKS = {"slot_lookup": slot_lookup, "insert_routing": insert_routing, "balance": balance}


def goals(figures: dict[str, dict]) -> list[str]:
    """One line per goal of the issue: met or not, with the figure."""
    lines = []
    routing = figures["insert_routing"]
    if routing.get("skipped"):
        lines.append("routing overhead ≤ 5% at 1 shard: not measured (PostgreSQL unreachable)")
    else:
        met = "met" if routing["goal_met"] else "NOT met"
        lines.append(
            f"routing overhead ≤ {routing['goal_percent']:g}% at 1 shard: {met} "
            f"({routing['overhead_1_shard_percent']:.1f}%)"
        )
    spread = figures["balance"]
    worst = max(r["max_deviation_percent"] for r in spread["by_shard_count"])
    met = "met" if spread["goal_met"] else "NOT met"
    lines.append(f"balance within ±{spread['goal_percent']:g}%: {met} (worst {worst:.2f}%)")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(__doc__ or "", argv)
    figures: dict[str, dict] = {"environment": environment(args.quick)}
    for name, module in BENCHMARKS.items():
        console.rule(name)
        figures[name] = module.run(args.quick)
        table = module.render(figures[name])
        if table is not None:
            console.print(table)
    console.rule("goals of issue 2")
    for line in goals(figures):
        console.print(line)
    path = args.json or (None if args.quick else RESULTS / "issue2.json")
    if path is not None:
        write_json(path, figures)
        console.print(f"figures written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
