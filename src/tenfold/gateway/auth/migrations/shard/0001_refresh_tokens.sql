-- Refresh tokens, on the shard of their user (the token id is a tenfold id in
-- the user's slot, so a token routes by its id alone). Only a SHA-256 digest of
-- the token's secret is stored. A family is every token descended from one
-- sign-in: family_id is the id of its first token.
CREATE TABLE IF NOT EXISTS tenfold_refresh_tokens (
    token_id    BIGINT PRIMARY KEY,
    slot        INTEGER NOT NULL,
    user_id     TEXT NOT NULL,
    user_kind   TEXT NOT NULL,
    family_id   BIGINT NOT NULL,
    secret_hash TEXT NOT NULL,
    created_at  DOUBLE PRECISION NOT NULL,
    expires_at  DOUBLE PRECISION NOT NULL,
    used_at     DOUBLE PRECISION,
    revoked_at  DOUBLE PRECISION,
    replaced_by BIGINT
);
CREATE INDEX IF NOT EXISTS tenfold_refresh_tokens_user
    ON tenfold_refresh_tokens (slot, user_id);
CREATE INDEX IF NOT EXISTS tenfold_refresh_tokens_family
    ON tenfold_refresh_tokens (slot, family_id);
CREATE INDEX IF NOT EXISTS tenfold_refresh_tokens_expiry
    ON tenfold_refresh_tokens (expires_at);
