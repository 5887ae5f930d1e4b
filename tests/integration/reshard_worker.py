"""A mover process for the reshard kill -9 tests (`python -m tests.integration.reshard_worker`).

Its one argument, CONFIG, is JSON: `settings` (keyword arguments of `Settings`), `slots`,
`to`, `until`, `options` (keyword arguments of `MoveOptions`) and `hang_in`: a phase name
("copying", "catching_up", "verifying", "fencing", "carried", "completing") or null. The worker
opens the database (shards added at runtime come from the catalog), runs
`Mover(db, MoveOptions(**options)).move(slots, to, until=until)` and, when `hang_in`
names a phase, stops inside that phase's work and prints `HANG <phase>` on stdout, so
the test can SIGKILL it at a known point:

    copying      after two copy batches were written to the target (the rest not),
                 the copy checkpoint at most a second old
    catching_up  after a drain round applied its rows but before the log entries went
    verifying    after the first table was compared
    fencing      with the source's slots fenced and drained, before the outbox carry
                 and the switch (writes to the moving slots are paused)
    carried      still 'fencing' in the catalog, but the outbox carried and the target's
                 slots opened ('capture'): the switch's catalog write not yet made
    completing   after the first batch of source rows was deleted

Without `hang_in` it prints `DONE <state>...` and exits 0.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from tenfold import ShardedDatabase
from tenfold.config import Settings
from tenfold.reshard import MoveOptions, Mover, capture, rows, workflow

PHASES = {
    "_copy": "copying",
    "_catch_up": "catching_up",
    "_verify": "verifying",
    "_switch": "fencing",
    "_complete": "completing",
}
_phase: list[str] = [""]


async def _hang(phase: str) -> None:
    print(f"HANG {phase}", flush=True)
    await asyncio.sleep(3600)


def _install_hooks(hang_in: str) -> None:
    """Wrap the mover's phases (to know which runs) and the hook point of `hang_in`."""
    for method, phase in PHASES.items():
        original = getattr(Mover, method)

        def wrap(orig: Any, name: str) -> Any:
            async def run(self: Mover, *args: Any, **kwargs: Any) -> Any:
                _phase[0] = name
                return await orig(self, *args, **kwargs)

            return run

        setattr(Mover, method, wrap(original, phase))
    calls = {"n": 0}

    def after(orig: Any, phase: str, count: int) -> Any:
        async def run(*args: Any, **kwargs: Any) -> Any:
            result = await orig(*args, **kwargs)
            if _phase[0] == phase:
                calls["n"] += 1
                if calls["n"] >= count:
                    await _hang(phase)
            return result

        return run

    if hang_in == "copying":
        original_throttle = Mover._throttle

        async def throttle(self: Mover, *args: Any) -> None:
            await original_throttle(self, *args)
            calls["n"] += 1
            if calls["n"] >= 2:
                await _hang("copying")

        Mover._throttle = throttle  # type: ignore[method-assign]
    elif hang_in == "catching_up":
        original_delete = capture.ShardSide.delete_log

        async def delete_log(self: capture.ShardSide, ids: Any) -> None:
            if _phase[0] == "catching_up":
                await _hang("catching_up")
            await original_delete(self, ids)

        capture.ShardSide.delete_log = delete_log  # type: ignore[method-assign]
    elif hang_in == "verifying":
        rows.compare = after(rows.compare, "verifying", 1)  # type: ignore[assignment]
    elif hang_in == "fencing":
        original_carry = workflow.carry_outbox

        async def carry(*args: Any, **kwargs: Any) -> int:
            await _hang("fencing")
            return await original_carry(*args, **kwargs)

        workflow.carry_outbox = carry  # type: ignore[assignment]
    elif hang_in == "carried":
        carry_first = workflow.carry_outbox

        async def carried(*args: Any, **kwargs: Any) -> int:
            n = await carry_first(*args, **kwargs)
            await _hang("carried")
            return n

        workflow.carry_outbox = carried  # type: ignore[assignment]
    elif hang_in == "completing":
        rows.delete_keys = after(rows.delete_keys, "completing", 1)  # type: ignore[assignment]
    else:
        raise SystemExit(f"unknown phase {hang_in!r}")


async def main(config: dict[str, Any]) -> int:
    if config.get("hang_in"):
        _install_hooks(str(config["hang_in"]))
    db = ShardedDatabase(Settings(**config["settings"]))
    await db.open()
    try:
        mover = Mover(db, MoveOptions(**config.get("options", {})))
        moves = await mover.start(config["slots"], config["to"])
        print("STARTED " + " ".join(m.id for m in moves), flush=True)
        done = await asyncio.gather(
            *(mover.run(m.id, until=config.get("until", "completed")) for m in moves)
        )
        print("DONE " + " ".join(m.state for m in done), flush=True)
    finally:
        await db.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(json.loads(sys.argv[1]))))
