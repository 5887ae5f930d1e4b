-- Slot-move workflows (tenfold.reshard.workflow): one row per move, its state
-- and progress; every step is idempotent, so a mover that died resumes here.
CREATE TABLE IF NOT EXISTS tenfold_moves (
    id           TEXT PRIMARY KEY,
    source       TEXT NOT NULL,
    target       TEXT NOT NULL,
    slots        TEXT NOT NULL,
    state        TEXT NOT NULL,
    progress     TEXT NOT NULL,
    error        TEXT,
    owner        TEXT,
    heartbeat_at DOUBLE PRECISION,
    created_at   DOUBLE PRECISION NOT NULL,
    updated_at   DOUBLE PRECISION NOT NULL
);
-- The slots an unfinished move holds: the primary key refuses a second move of a slot.
CREATE TABLE IF NOT EXISTS tenfold_move_slots (
    slot    INTEGER PRIMARY KEY,
    move_id TEXT NOT NULL
);
-- Shards added after deployment (`tenfold shards add`): routers open them by name.
CREATE TABLE IF NOT EXISTS tenfold_shards (
    name     TEXT PRIMARY KEY,
    url      TEXT NOT NULL,
    added_at DOUBLE PRECISION NOT NULL
);
