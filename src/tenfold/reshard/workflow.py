"""The move workflow: copy, catch up, verify, fence and switch, then complete or reverse.

    created ─▶ copying ─▶ catching_up ─▶ verifying ─▶ fencing ─▶ switched
       └──────────┴────────────┴─────────────┴───────────┴─▶ cancelling ─▶ cancelled
    switched ─▶ completing ─▶ completed
    switched ─▶ reversing ─▶ reverse_cleanup ─▶ reversed

Every state is stored in the catalog before its work starts, and every step
is idempotent, so `resume` after the mover died (SIGKILL at any line) redoes
the current step and goes on. One process runs a move at a time (a lease in
`tenfold_moves`, renewed every third of `lease_s`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tenfold.data import migrations
from tenfold.data.base import Pool
from tenfold.errors import MoveConflict, MoveRefused, TenfoldError, VerifyFailed
from tenfold.reshard import rows
from tenfold.reshard.capture import CAPTURE, FENCED, ShardSide
from tenfold.reshard.outbox import carry_outbox
from tenfold.reshard.slots import format_ranges, parse_slots
from tenfold.reshard.store import MoveRecord, MoveStore, held_elsewhere
from tenfold.reshard.tables import SlotTable, slot_tables

if TYPE_CHECKING:
    from tenfold.data.router import ShardedDatabase

__all__ = ["MoveOptions", "Mover", "Progress"]

log = logging.getLogger("tenfold.reshard")

Progress = Callable[[MoveRecord, str, int, int | None], None]  # (move, phase, done, total)

_BEFORE_SWITCH = ("created", "copying", "catching_up", "verifying", "fencing")


@dataclass(frozen=True, slots=True)
class MoveOptions:
    """Bounds of a move.

    Args:
        batch_rows: rows per copy batch on SQLite (a batch holds its write lock),
            per catch-up round trip, verify read and delete batch.
        copy_batch_rows: rows per copy batch between PostgreSQL shards (bytes,
            never decoded: a bigger batch amortises its three round trips).
        duty: the share of wall time the copy may work: after a batch that
            took t seconds it sleeps t * (1 - duty) / duty (1.0: no pause).
        max_rows_s: a hard cap on copy rows per second (None: no cap).
        lag_rows: catch-up ends (and verify begins) once fewer changes than
            this wait in the log.
        fence_wait_s: how long the fence waits for transactions open before it.
        lease_s: a mover silent this long is presumed dead; another may resume.
        complete_after_s: `complete` waits until this long after the switch,
            so every process has re-read the topology before source rows go
            (None: twice `topology_ttl_s`).
    """

    batch_rows: int = 2000
    copy_batch_rows: int = 10_000
    duty: float = 0.5
    max_rows_s: float | None = None
    lag_rows: int = 200
    fence_wait_s: float = 5.0
    lease_s: float = 10.0
    complete_after_s: float | None = None


class Mover:
    """Runs move workflows against one `ShardedDatabase` (opened)."""

    def __init__(
        self,
        db: ShardedDatabase,
        options: MoveOptions | None = None,
        on_progress: Progress | None = None,
    ) -> None:
        self.db = db
        self.options = options or MoveOptions()
        self.store = MoveStore(db.catalog)
        self.on_progress = on_progress
        self._tables: dict[str, list[SlotTable]] = {}
        self._lost: dict[str, bool] = {}

    # -- starting ---------------------------------------------------------

    async def start(self, slots: Sequence[int] | str, to: str) -> list[MoveRecord]:
        """Validate and record the moves of `slots` to `to`: one per current owner.

        Raises:
            MoveRefused: bad slots, unknown shard, or slots `to` already owns.
            MoveConflict: another unfinished move holds some of the slots.
        """
        wanted = parse_slots(slots) if isinstance(slots, str) else sorted(set(slots))
        if not wanted:
            raise MoveRefused("no slots given: write ranges like 0-255,1024")
        bad = [s for s in wanted if not 0 <= s < 4096]
        if bad:
            raise MoveRefused(f"slot {bad[0]} is outside 0-4095")
        await self.db.refresh_topology()
        if to not in self.db.shard_names:
            raise MoveRefused(
                f"no shard named {to!r}; shards: {', '.join(self.db.shard_names)} "
                "(register a new one with `tenfold shards add NAME URL`)"
            )
        topology = self.db.topology
        by_source: dict[str, list[int]] = {}
        dialect = self.db.pool(to).dialect
        for slot in wanted:
            by_source.setdefault(topology.shard_of_slot(slot), []).append(slot)
        for source in by_source:
            if self.db.pool(source).dialect != dialect:
                raise MoveRefused(
                    f"shard {source} is {self.db.pool(source).dialect} and {to} is {dialect}: "
                    "a move copies rows between shards of one engine"
                )
        if to in by_source:
            raise MoveRefused(
                f"shard {to} already owns slot(s) {format_ranges(by_source[to])}: "
                "a move needs another owner; leave those out"
            )
        for source in by_source:
            await self._check_schema(source, to)  # refused here, before anything is recorded
            for name in (source, to):
                await _check_can_see_transactions(self.db.pool(name))
        holders = await self.store.holders(wanted)
        if holders:
            raise held_elsewhere(holders)
        return [await self.store.create(src, to, s) for src, s in sorted(by_source.items())]

    async def move(
        self, slots: Sequence[int] | str, to: str, *, until: str = "switched"
    ) -> list[MoveRecord]:
        """`start`, then run every resulting move to `until`, concurrently."""
        moves = await self.start(slots, to)
        return list(await asyncio.gather(*(self.run(m.id, until=until) for m in moves)))

    # -- running ----------------------------------------------------------

    async def run(self, move_id: str, *, until: str = "switched") -> MoveRecord:
        """Run (or resume) a move from its stored state up to `until`.

        `until` is "switched" or "completed". A failure is stored on the move
        (`tenfold shards moves` shows it) and raised; `run` again resumes.
        """
        move = await self.store.get(move_id)
        if move.finished:
            return move
        if move.state in ("cancelling",):
            return await self.cancel(move_id)
        if move.state in ("reversing", "reverse_cleanup"):
            return await self.reverse(move_id)
        await self.store.take(move, self.options.lease_s)
        beat = asyncio.create_task(self._heartbeat(move, asyncio.current_task()))
        try:
            await self._steps(move, until)
        except asyncio.CancelledError:
            if self._lost.pop(move.id, False):
                raise MoveConflict(
                    f"move {move.id}: this mover lost its lease (another process took the "
                    "move over); it stopped"
                ) from None
            raise
        except BaseException as exc:
            if isinstance(exc, TenfoldError):
                await self._record_failure(move, exc)
            raise
        finally:
            beat.cancel()
            with contextlib.suppress(TenfoldError):
                await self.store.let_go(move)
        return move

    async def _record_failure(self, move: MoveRecord, exc: TenfoldError) -> None:
        log.error("move %s stopped in %s: %s", move.id, move.state, exc)
        with contextlib.suppress(TenfoldError):
            await self.store.save(move, error=f"{type(exc).__name__}: {exc}")

    async def _heartbeat(self, move: MoveRecord, runner: asyncio.Task[Any] | None) -> None:
        """Renew the lease; if another process took the move over, stop this run."""
        while True:
            await asyncio.sleep(self.options.lease_s / 3)
            try:
                held = await self.store.heartbeat(move)
            except TenfoldError:
                continue  # the catalog blinked: the next renewal may succeed
            if not held and runner is not None:
                log.error("move %s: lease lost to another mover; stopping", move.id)
                self._lost[move.id] = True
                runner.cancel()
                return

    async def _steps(self, move: MoveRecord, until: str) -> None:
        fresh_verify = False
        while True:
            state = move.state
            if state == "created":
                await self._prepare(move)
                await self._enter(move, "copying")
            elif state == "copying":
                await self._copy(move)
                await self._enter(move, "catching_up")
            elif state == "catching_up":
                await self._catch_up(move)
                await self._enter(move, "verifying")
            elif state == "verifying":
                await self._verify(move)
                fresh_verify = True
                await self._enter(move, "fencing")
            elif state == "fencing":
                await self._switch(move, full_check=not fresh_verify)
            elif state == "switched":
                if until != "completed":
                    return
                await self._wait_before_complete(move)
                await self._enter(move, "completing")
            elif state == "completing":
                await self._complete(move)
                return
            else:
                return

    async def _enter(self, move: MoveRecord, state: str) -> None:
        move.state = state
        await self.store.save(move)

    def _report(self, move: MoveRecord, phase: str, done: int, total: int | None) -> None:
        if self.on_progress is not None:
            self.on_progress(move, phase, done, total)

    def _sides(self, move: MoveRecord) -> tuple[ShardSide, ShardSide]:
        return ShardSide(self.db.pool(move.source)), ShardSide(self.db.pool(move.target))

    async def _tables_of(self, move: MoveRecord) -> list[SlotTable]:
        if move.id not in self._tables:
            self._tables[move.id] = await self._check_schema(move.source, move.target)
        return self._tables[move.id]

    async def _check_schema(self, source: str, target: str) -> list[SlotTable]:
        """The source's slot tables, once each is known to exist alike on the target.

        Raises:
            MoveRefused: a table without a primary key, or one that is missing or
                has other columns on the target.
        """
        tables = await slot_tables(self.db.pool(source))
        there = {t.name: t for t in await slot_tables(self.db.pool(target))}
        for table in tables:
            other = there.get(table.name)
            if other is None or other.columns != table.columns:
                raise MoveRefused(
                    f"table {table.name} differs between {source} and {target} "
                    "(missing or other columns): every shard needs the same schema; run "
                    "`tenfold db migrate` (or make the table alike by hand), then move"
                )
        return tables

    # -- phases -----------------------------------------------------------

    async def _prepare(self, move: MoveRecord) -> None:
        """Install triggers, fence the target's copies, start capturing on the source."""
        src, dst = self._sides(move)
        for pool in (src.pool, dst.pool):
            await migrations.apply(pool, migrations.builtin("shard"))
        tables = await self._tables_of(move)
        await dst.cover(tables, move.slots, FENCED, move.id)
        await src.cover(tables, move.slots, CAPTURE, move.id)
        # A writer that read the state before 'capture' committed may still
        # commit a change the log missed: wait it out before the copy reads.
        await src.wait_in_flight(self.options.fence_wait_s)
        counts = {t.name: await _count(src.pool, t, move.ranges) for t in tables}
        move.progress = {
            "total_rows": sum(counts.values()),
            "copied_rows": 0,
            "copy": {
                t.name: {"after": None, "done": False, "rows": counts[t.name]} for t in tables
            },
            "started_at": time.time(),
        }

    async def _copy(self, move: MoveRecord) -> None:
        src, dst = self._sides(move)
        opts = self.options
        started = time.monotonic()
        copied0 = int(move.progress.get("copied_rows", 0))
        total = int(move.progress.get("total_rows", 0)) or None
        t_batch = time.monotonic()
        for table in await self._tables_of(move):
            mark = move.progress["copy"].setdefault(table.name, {"after": None, "done": False})
            if mark["done"]:
                continue
            after = mark["after"]
            saved = time.monotonic()
            # A first window of about one batch of rows, from the table's count.
            per_slot = max(1, int(mark.get("rows", 0))) / len(move.slots)
            size = opts.copy_batch_rows if src.pool.dialect == "postgresql" else opts.batch_rows
            width = max(1, min(4096, int(size / per_slot)))
            batches = rows.copy_batches(
                src.pool, dst, move.id, table, move.ranges, after, size, width
            )
            async for n, last in batches:
                t0 = time.monotonic()
                mark["after"] = last
                move.progress["copied_rows"] = int(move.progress["copied_rows"]) + n
                # A checkpoint a second is enough: a resume redoes at most that
                # much, and every batch write is idempotent.
                if t0 - saved >= 1.0:
                    await self.store.save(move)
                    saved = t0
                self._report(move, "copy", int(move.progress["copied_rows"]), total)
                await self._throttle(time.monotonic() - t_batch, started, copied0, move)
                t_batch = time.monotonic()
            mark["done"] = True
            await self.store.save(move)
        elapsed = time.monotonic() - started
        n = int(move.progress["copied_rows"]) - copied0
        if elapsed > 0 and n:
            move.progress["copy_rows_s"] = round(n / elapsed, 1)

    async def _throttle(
        self, took_s: float, started: float, copied0: int, move: MoveRecord
    ) -> None:
        opts = self.options
        pause = took_s * (1 - opts.duty) / opts.duty if 0 < opts.duty < 1 else 0.0
        if opts.max_rows_s:
            n = int(move.progress["copied_rows"]) - copied0
            ahead = n / opts.max_rows_s - (time.monotonic() - started)
            pause = max(pause, ahead)
        if pause > 0:
            await asyncio.sleep(pause)

    async def _drain(
        self,
        move: MoveRecord,
        frm: ShardSide,
        to: ShardSide,
        *,
        until: int,
        touched: set[Any] | None = None,
    ) -> int:
        """Apply logged changes of `frm` to `to` until fewer than `until` wait; return applied."""
        tables = {t.name: t for t in await self._tables_of(move)}
        applied = 0
        while True:
            entries = await frm.read_log(move.id, self.options.batch_rows)
            by_table: dict[str, dict[tuple[Any, ...], list[Any]]] = {}
            for _, tbl, slot, pk in entries:
                by_table.setdefault(tbl, {})[tuple(pk)] = pk
                if touched is not None:
                    touched.add((tbl, slot, tuple(pk)))
            for tbl, keys in by_table.items():
                await rows.apply_keys(frm.pool, to, move.id, tables[tbl], list(keys.values()))
            await frm.delete_log([e[0] for e in entries])
            applied += len(entries)
            pending = await frm.pending(move.id)
            self._report(move, "catch-up", applied, applied + pending)
            if pending < max(until, 1):
                return applied

    async def _catch_up(self, move: MoveRecord) -> None:
        src, dst = self._sides(move)
        await self._drain(move, src, dst, until=self.options.lag_rows)

    async def _verify(self, move: MoveRecord) -> None:
        """Compare every row; re-check differing keys after more catch-up (they may
        simply have changed since); any still differing with no change pending stop it."""
        src, dst = self._sides(move)
        tables = await self._tables_of(move)
        suspects: list[tuple[int, str, list[Any]]] = []
        summary: dict[str, Any] = {"rows": 0, "slots": len(move.slots)}
        for i, table in enumerate(tables):
            diff = await rows.compare(
                src.pool, dst.pool, table, move.ranges, self.options.batch_rows
            )
            summary["rows"] += sum(c[0] for c in diff.rows.values())
            suspects += diff.keys
            self._report(move, "verify", i + 1, len(tables))
        for _ in range(3):
            if not suspects:
                break
            # Down to lag_rows, not to empty: under a steady write stream the
            # log never empties while writes are allowed (the fence drains it).
            await self._drain(move, src, dst, until=self.options.lag_rows)
            suspects = await self._recheck(move, suspects)
        if suspects:
            logged = await _logged_keys(src, move.id)
            real = [s for s in suspects if (s[1], tuple(s[2])) not in logged]
            if real:
                raise VerifyFailed(move.id, [(s, t, repr(k)) for s, t, k in real])
            move.progress["recheck"] = [[s, t, k] for s, t, k in suspects]
        move.progress["verified"] = summary

    async def _recheck(
        self, move: MoveRecord, keys: Sequence[tuple[int, str, list[Any]]]
    ) -> list[tuple[int, str, list[Any]]]:
        tables = {t.name: t for t in await self._tables_of(move)}
        src, dst = self._sides(move)
        out = []
        by_table: dict[str, list[tuple[int, str, list[Any]]]] = {}
        for k in keys:
            by_table.setdefault(k[1], []).append(k)
        for name, items in by_table.items():
            table = tables[name]
            pks = [list(k[2]) for k in items]
            left = {
                _pk(table, r): rows.digest(r) for r in await rows.read_keys(src.pool, table, pks)
            }
            right = {
                _pk(table, r): rows.digest(r) for r in await rows.read_keys(dst.pool, table, pks)
            }
            out += [k for k in items if left.get(tuple(k[2])) != right.get(tuple(k[2]))]
        return out

    async def _switch(self, move: MoveRecord, *, full_check: bool) -> None:
        """Fence, drain, check, carry the outbox, and store the new owner: the write pause."""
        src, dst = self._sides(move)
        # Shorten the pause: drain what is there before writes stop.
        await self._drain(move, src, dst, until=self.options.lag_rows)
        t0 = time.monotonic()
        await src.set_state(move.slots, FENCED, move.id)
        try:
            await src.wait_in_flight(self.options.fence_wait_s)
            touched: set[Any] = set()
            await self._drain(move, src, dst, until=1, touched=touched)
            if full_check:
                # Resumed mid-fence: what was drained before the crash is unknown; check all.
                await self._verify(move)
                keys: list[tuple[int, str, list[Any]]] = [
                    (int(s), str(t), list(k)) for s, t, k in move.progress.get("recheck", [])
                ]
            else:
                keys = [(slot, tbl, list(pk)) for tbl, slot, pk in touched]
                keys += [(int(s), str(t), list(k)) for s, t, k in move.progress.get("recheck", [])]
            bad = await self._recheck(move, keys) if keys else []
            if bad:
                raise VerifyFailed(move.id, [(s, t, repr(k)) for s, t, k in bad])
            carried = await carry_outbox(src, dst, move.slots, move.id, open_target=CAPTURE)
        except BaseException:
            # Never leave writes paused: the source owns the slots again (and the
            # target is closed again, if the carry got that far). If the source
            # cannot be reached to say so, the move stays in `fencing`: resume
            # (or cancel) unfences it.
            try:
                await dst.set_state(move.slots, FENCED, move.id)
                await src.set_state(move.slots, CAPTURE, move.id)
            except TenfoldError:
                log.error("move %s: could not unfence slots after a failed switch", move.id)
            else:
                with contextlib.suppress(TenfoldError):
                    await self._enter(move, "catching_up")  # resume: catch up, verify, fence
            raise
        move.progress.pop("recheck", None)
        move.progress["carried_events"] = int(move.progress.get("carried_events", 0)) + carried
        move.progress["switched_at"] = time.time()
        await self.store.save(move)  # the carried count survives a mover dying here
        try:
            epoch = await self.store.switch(move, move.target, "switched")
        except BaseException:
            landed = await self._catalog_gives(move, move.target)
            if not landed:
                if landed is False:  # surely not switched: the source takes writes again
                    with contextlib.suppress(TenfoldError):
                        await dst.set_state(move.slots, FENCED, move.id)
                        await src.set_state(move.slots, CAPTURE, move.id)
                        await self._enter(move, "catching_up")
                raise
            move.state = "switched"
            await self.db.refresh_topology()
            epoch = self.db.topology.epoch
        move.progress["epoch"] = epoch
        move.progress["pause_ms"] = round((time.monotonic() - t0) * 1000, 2)
        await self.store.save(move)
        await self.db.refresh_topology()
        log.info(
            "move %s switched slots %s to %s at epoch %s; writes paused %.1f ms",
            move.id,
            format_ranges(move.slots),
            move.target,
            epoch,
            move.progress["pause_ms"],
        )

    async def _wait_before_complete(self, move: MoveRecord) -> None:
        wait = self.options.complete_after_s
        if wait is None:
            wait = 2 * self.db.settings.topology_ttl_s
        left = float(move.progress.get("switched_at", 0)) + wait - time.time()
        if left > 0:
            self._report(move, "wait for routers", 0, None)
            await asyncio.sleep(left)

    async def _complete(self, move: MoveRecord) -> None:
        src, dst = self._sides(move)
        deleted = await self._delete_rows(move, src)
        await dst.uncover(await self._tables_of(move), move.slots, move.id)
        await dst.clear(move.id)
        await src.clear(move.id)
        move.progress["deleted_rows"] = int(move.progress.get("deleted_rows", 0)) + deleted
        move.state = "completed"
        await self.store.save(move)
        await self.store.release(move)

    async def _delete_rows(self, move: MoveRecord, side: ShardSide) -> int:
        """Delete the move's rows from `side` (which no longer owns them) in bounded batches.

        Every slot table of that shard, as it is now: whatever sits there in
        these slots is a leftover copy. Paced by `duty` like the copy: the
        shard still serves its own slots meanwhile.
        """
        deleted = 0
        duty = self.options.duty
        for table in await slot_tables(side.pool):
            async for batch, _ in rows.scan(
                side.pool, table, move.ranges, None, self.options.batch_rows
            ):
                t0 = time.monotonic()
                keys = [list(_pk(table, r)) for r in batch]
                await rows.delete_keys(side, move.id, table, keys)
                deleted += len(batch)
                self._report(move, "delete", deleted, None)
                if 0 < duty < 1:
                    await asyncio.sleep((time.monotonic() - t0) * (1 - duty) / duty)
        return deleted

    # -- operator commands ------------------------------------------------

    async def complete(self, move_id: str) -> MoveRecord:
        """Finish a switched move: delete the source's copy, stop the reverse log."""
        move = await self.store.get(move_id)
        if move.state not in ("switched", "completing"):
            raise MoveRefused(
                f"move {move_id} is {move.state}: only a switched move can be completed"
            )
        return await self.run(move_id, until="completed")

    async def cancel(self, move_id: str) -> MoveRecord:
        """Abandon a move before its switch: the source keeps the slots, the target's copy goes."""
        move = await self.store.get(move_id)
        if move.state == "cancelled":
            return move
        if move.finished:
            raise MoveRefused(f"move {move_id} is {move.state}: it finished; nothing to cancel")
        if move.state not in (*_BEFORE_SWITCH, "cancelling"):
            raise MoveRefused(
                f"move {move_id} is {move.state}: after the switch use `reverse` to give the "
                "slots back"
            )
        await self.store.take(move, self.options.lease_s)
        try:
            await self._enter(move, "cancelling")
            src, dst = self._sides(move)
            for pool in (src.pool, dst.pool):  # a move cancelled before it ever ran
                await migrations.apply(pool, migrations.builtin("shard"))
            # The source's own tables, unchecked: a schema that differs between
            # the shards must not keep a move that never copied from ending.
            await src.uncover(await slot_tables(src.pool), move.slots, move.id)
            await src.clear(move.id)
            # The target does not own these slots: fenced (it may have been opened
            # by a switch that did not land), its copy and its log gone.
            await dst.set_state(move.slots, FENCED, move.id)
            await self._delete_rows(move, dst)
            await dst.clear(move.id)
            move.state = "cancelled"
            await self.store.save(move)
            await self.store.release(move)
        finally:
            await self.store.let_go(move)
        return move

    async def reverse(self, move_id: str) -> MoveRecord:
        """Give a switched move's slots back to the source, with every change made since."""
        move = await self.store.get(move_id)
        if move.state == "reversed":
            return move
        if move.state not in ("switched", "reversing", "reverse_cleanup"):
            raise MoveRefused(
                f"move {move_id} is {move.state}: only a switched move can be reversed "
                "(before the switch, `cancel` it)"
            )
        await self.store.take(move, self.options.lease_s)
        try:
            src, dst = self._sides(move)
            if move.state != "reverse_cleanup":
                await self._enter(move, "reversing")
                await self._drain(move, dst, src, until=self.options.lag_rows)
                t0 = time.monotonic()
                await dst.set_state(move.slots, FENCED, move.id)
                try:
                    await dst.wait_in_flight(self.options.fence_wait_s)
                    await self._drain(move, dst, src, until=1)
                    # The source stays fenced until the topology names it again.
                    await carry_outbox(
                        dst, src, move.slots, move.id, open_target=None, set_target_state=False
                    )
                    await self.store.switch(move, move.source, "reverse_cleanup")
                except BaseException:
                    landed = await self._catalog_gives(move, move.source)
                    if not landed:
                        if landed is False:  # surely not reversed: the target takes writes
                            with contextlib.suppress(TenfoldError):
                                await dst.set_state(move.slots, CAPTURE, move.id)
                                await self._enter(move, "switched")
                        raise
                    move.state = "reverse_cleanup"
                move.progress["reverse_pause_ms"] = round((time.monotonic() - t0) * 1000, 2)
                await self.db.refresh_topology()
            await src.uncover(await self._tables_of(move), move.slots, move.id)
            await self._delete_rows(move, dst)
            await dst.clear(move.id)
            move.state = "reversed"
            await self.store.save(move)
            await self.store.release(move)
        finally:
            await self.store.let_go(move)
        return move

    async def _catalog_gives(self, move: MoveRecord, owner: str) -> bool | None:
        """After a failed catalog write: does the stored topology give the move's slots
        to `owner` (the write landed but its answer was lost)? None when the catalog
        cannot say: the slots then stay fenced, since unfencing could let both shards
        take writes, and `resume` decides."""
        try:
            topology = await self.db.catalog.load_topology()
        except TenfoldError:
            log.error("move %s: catalog unreachable after a failed switch; fenced", move.id)
            return None
        assert topology is not None
        return all(topology.shard_of_slot(s) == owner for s in move.slots)

    async def moves(self) -> list[MoveRecord]:
        return await self.store.all()


def _pk(table: SlotTable, row: Any) -> tuple[Any, ...]:
    return tuple(row[c] for c in table.pk)


async def _count(pool: Pool, table: SlotTable, ranges: Sequence[tuple[int, int]]) -> int:
    total = 0
    async with pool.acquire() as conn:
        for lo, hi in ranges:
            total += int(
                await conn.fetchval(
                    f"SELECT count(*) FROM {table.name} WHERE slot BETWEEN $1 AND $2", lo, hi
                )
                or 0
            )
    return total


async def _check_can_see_transactions(pool: Pool) -> None:
    """The fence waits for transactions it sees in pg_stat_activity; PostgreSQL
    hides other roles' sessions from a role without pg_read_all_stats."""
    if pool.dialect != "postgresql":
        return
    async with pool.acquire() as conn:
        ok = await conn.fetchval(
            "SELECT rolsuper OR pg_has_role(current_user, 'pg_read_all_stats', 'MEMBER') "
            "FROM pg_roles WHERE rolname = current_user"
        )
    if not ok:
        raise MoveRefused(
            f"the role connecting to shard {pool.name} cannot see other sessions' "
            "transactions, which the switch must wait for: GRANT pg_read_all_stats TO "
            "that role (or move as a superuser)"
        )


async def _logged_keys(side: ShardSide, move_id: str) -> set[tuple[str, tuple[Any, ...]]]:
    entries = await side.read_log(move_id, 100_000)
    return {(tbl, tuple(pk)) for _, tbl, _, pk in entries}
