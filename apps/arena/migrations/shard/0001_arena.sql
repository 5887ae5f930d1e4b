-- arena's tables. Users, wallets and "my rooms" live on the shard of the
-- user's name (ids are made in that slot); rooms, members and messages on
-- the shard of the room id; the leaderboard projection on the shard of the
-- key 'leaderboard'. Every table has a slot column and an index led by slot.
CREATE TABLE arena_users (
    slot INTEGER NOT NULL,
    id BIGINT PRIMARY KEY,
    username TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX arena_users_slot ON arena_users (slot, id);

CREATE TABLE arena_wallets (
    slot INTEGER NOT NULL,
    user_id BIGINT PRIMARY KEY,
    balance BIGINT NOT NULL CHECK (balance >= 0)
);
CREATE INDEX arena_wallets_slot ON arena_wallets (slot, user_id);

CREATE TABLE arena_transfers (
    slot INTEGER NOT NULL,
    id BIGINT PRIMARY KEY,
    sender_id BIGINT NOT NULL,
    recipient TEXT NOT NULL,
    amount BIGINT NOT NULL CHECK (amount > 0),
    idem_key TEXT NOT NULL,
    status TEXT NOT NULL,
    reason TEXT,
    created_at DOUBLE PRECISION NOT NULL,
    UNIQUE (sender_id, idem_key)
);
CREATE INDEX arena_transfers_slot ON arena_transfers (slot, sender_id, id);

CREATE TABLE arena_credits (
    slot INTEGER NOT NULL,
    transfer_id BIGINT PRIMARY KEY,
    user_id BIGINT NOT NULL,
    amount BIGINT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX arena_credits_slot ON arena_credits (slot, user_id);

CREATE TABLE arena_rooms (
    slot INTEGER NOT NULL,
    id BIGINT PRIMARY KEY,
    name TEXT NOT NULL,
    owner_id BIGINT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX arena_rooms_slot ON arena_rooms (slot, id);

CREATE TABLE arena_members (
    slot INTEGER NOT NULL,
    room_id BIGINT NOT NULL,
    user_id BIGINT NOT NULL,
    username TEXT NOT NULL,
    joined_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (room_id, user_id)
);
CREATE INDEX arena_members_slot ON arena_members (slot, room_id);

CREATE TABLE arena_messages (
    slot INTEGER NOT NULL,
    id BIGINT PRIMARY KEY,
    room_id BIGINT NOT NULL,
    author_id BIGINT NOT NULL,
    author TEXT NOT NULL,
    body TEXT NOT NULL,
    idem_key TEXT,
    created_at DOUBLE PRECISION NOT NULL,
    UNIQUE (room_id, author_id, idem_key)
);
CREATE INDEX arena_messages_slot ON arena_messages (slot, room_id, id);

CREATE TABLE arena_my_rooms (
    slot INTEGER NOT NULL,
    user_id BIGINT NOT NULL,
    room_id BIGINT NOT NULL,
    name TEXT NOT NULL,
    joined_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (user_id, room_id)
);
CREATE INDEX arena_my_rooms_slot ON arena_my_rooms (slot, user_id);

CREATE TABLE arena_leaderboard (
    slot INTEGER NOT NULL,
    user_id BIGINT PRIMARY KEY,
    username TEXT NOT NULL,
    points BIGINT NOT NULL
);
CREATE INDEX arena_leaderboard_slot ON arena_leaderboard (slot, points);
