-- The slot map: one row per epoch, the newest is current. Rows are never
-- updated, so the history of every topology change stays readable.
CREATE TABLE IF NOT EXISTS tenfold_topology (
    epoch      BIGINT PRIMARY KEY,
    body       TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL
);

-- Id generator worker numbers, leased by live processes (see tenfold.ids).
CREATE TABLE IF NOT EXISTS tenfold_id_workers (
    worker     INTEGER PRIMARY KEY,
    owner      TEXT NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL
);
