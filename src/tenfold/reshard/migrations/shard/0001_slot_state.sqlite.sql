-- See 0001_slot_state.postgresql.sql. SQLite has no trigger function taking
-- arguments: tenfold.reshard.capture creates one trigger per table and operation.
CREATE TABLE IF NOT EXISTS tenfold_slot_state (
    slot    INTEGER PRIMARY KEY,
    state   TEXT NOT NULL,
    move_id TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS tenfold_reshard_log (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    move_id TEXT NOT NULL,
    tbl     TEXT NOT NULL,
    slot    INTEGER NOT NULL,
    pk      TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS tenfold_reshard_log_move ON tenfold_reshard_log (move_id, id);
