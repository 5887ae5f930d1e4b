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

-- One trigger function for every slot table (the primary key columns are its
-- arguments). It is on the write path of every row of a shard that took part in
-- a move, so it reads NEW/OLD directly and returns at once for an owned slot.
CREATE OR REPLACE FUNCTION tenfold_slot_trigger() RETURNS trigger AS $$
DECLARE
    s integer;
    st text;
    mv text;
    doc jsonb;
    k jsonb := '[]'::jsonb;
    k_old jsonb;
    col text;
BEGIN
    IF TG_OP = 'DELETE' THEN s := OLD.slot; ELSE s := NEW.slot; END IF;
    SELECT state, move_id INTO st, mv FROM tenfold_slot_state WHERE slot = s;
    IF st IS NULL OR st = 'apply' THEN
        IF TG_OP = 'DELETE' THEN RETURN OLD; END IF;
        RETURN NEW;
    END IF;
    IF st = 'fenced' THEN
        -- The mover's own transaction (SET LOCAL tenfold.apply = its move id)
        -- writes a slot it is bringing in; every other writer is refused.
        IF current_setting('tenfold.apply', true) = mv THEN
            IF TG_OP = 'DELETE' THEN RETURN OLD; END IF;
            RETURN NEW;
        END IF;
        RAISE EXCEPTION 'tenfold_slot_moved slot=%', s USING ERRCODE = 'TF409';
    END IF;
    IF TG_NARGS > 0 THEN
        IF TG_OP = 'DELETE' THEN doc := to_jsonb(OLD); ELSE doc := to_jsonb(NEW); END IF;
        FOREACH col IN ARRAY TG_ARGV LOOP
            k := k || jsonb_build_array(doc -> col);
        END LOOP;
        INSERT INTO tenfold_reshard_log (move_id, tbl, slot, pk) VALUES (mv, TG_TABLE_NAME, s, k::text);
        IF TG_OP = 'UPDATE' THEN
            -- A changed primary key must not leave the old row on the target.
            doc := to_jsonb(OLD);
            k_old := '[]'::jsonb;
            FOREACH col IN ARRAY TG_ARGV LOOP
                k_old := k_old || jsonb_build_array(doc -> col);
            END LOOP;
            IF k_old <> k THEN
                INSERT INTO tenfold_reshard_log (move_id, tbl, slot, pk)
                    VALUES (mv, TG_TABLE_NAME, s, k_old::text);
            END IF;
        END IF;
    END IF;
    IF TG_OP = 'DELETE' THEN RETURN OLD; END IF;
    RETURN NEW;
END
$$ LANGUAGE plpgsql;
