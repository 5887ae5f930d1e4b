-- Resharding's per-shard records (tenfold.reshard.capture).
-- tenfold_slot_state: only slots with a move in flight or gone from this shard
-- have a row: 'capture' (owned, moving out: writes are logged), 'fenced' (not
-- owned: writes are refused inside the writing transaction), 'apply' (only
-- ever seen inside the mover's own transaction). No row: owned, as usual.
CREATE TABLE IF NOT EXISTS tenfold_slot_state (
    slot    INTEGER PRIMARY KEY,
    state   TEXT NOT NULL,
    move_id TEXT NOT NULL
);
-- The change log of moving slots: the primary key of each written row, fed by
-- tenfold_slot_trigger() in the writing transaction; the mover drains it.
CREATE TABLE IF NOT EXISTS tenfold_reshard_log (
    id      BIGSERIAL PRIMARY KEY,
    move_id TEXT NOT NULL,
    tbl     TEXT NOT NULL,
    slot    INTEGER NOT NULL,
    pk      TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS tenfold_reshard_log_move ON tenfold_reshard_log (move_id, id);

CREATE OR REPLACE FUNCTION tenfold_slot_trigger() RETURNS trigger AS $$
DECLARE
    r record;
    st record;
    doc jsonb;
    k jsonb := '[]'::jsonb;
    col text;
BEGIN
    IF TG_OP = 'DELETE' THEN r := OLD; ELSE r := NEW; END IF;
    SELECT s.state, s.move_id INTO st FROM tenfold_slot_state s WHERE s.slot = r.slot;
    IF FOUND AND st.state = 'fenced' THEN
        RAISE EXCEPTION 'tenfold_slot_moved slot=%', r.slot USING ERRCODE = 'TF409';
    END IF;
    IF FOUND AND st.state = 'capture' AND TG_NARGS > 0 THEN
        doc := to_jsonb(r);
        FOREACH col IN ARRAY TG_ARGV LOOP
            k := k || jsonb_build_array(doc -> col);
        END LOOP;
        INSERT INTO tenfold_reshard_log (move_id, tbl, slot, pk)
            VALUES (st.move_id, TG_TABLE_NAME, r.slot, k::text);
    END IF;
    IF TG_OP = 'DELETE' THEN RETURN OLD; END IF;
    RETURN NEW;
END
$$ LANGUAGE plpgsql;
