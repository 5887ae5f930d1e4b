"""Every asyncpg error maps to a tenfold error at the backend boundary (data/postgres_errors.py)."""

from __future__ import annotations

import asyncpg
import pytest
from asyncpg.exceptions import _base as asyncpg_base

from tenfold.data.postgres_errors import map_error
from tenfold.errors import (
    ConstraintViolation,
    DataError,
    InvalidValue,
    QueryError,
    ShardTimeout,
    ShardUnavailable,
)

URL = "postgresql://postgres:***@db:5432/app_3"

CASES: list[tuple[BaseException, type[DataError]]] = [
    (asyncpg.UniqueViolationError("duplicate key"), ConstraintViolation),
    (asyncpg.ForeignKeyViolationError("fk"), ConstraintViolation),
    (asyncpg.CharacterNotInRepertoireError('invalid byte sequence for "UTF8": 0x00'), InvalidValue),
    (asyncpg.UntranslatableCharacterError("unsupported Unicode escape sequence"), InvalidValue),
    (asyncpg.NumericValueOutOfRangeError("integer out of range"), InvalidValue),
    (asyncpg.InvalidTextRepresentationError("invalid input syntax for type integer"), InvalidValue),
    (
        asyncpg.DataError("invalid input for query argument $1: 1 (value out of int64 range)"),
        InvalidValue,
    ),
    (asyncpg_base.DataError("invalid input for query argument $1"), InvalidValue),
    (asyncpg.QueryCanceledError("canceling statement due to statement timeout"), ShardTimeout),
    (asyncpg.LockNotAvailableError("could not obtain lock"), ShardTimeout),
    (TimeoutError(), ShardTimeout),
    (asyncpg_base.InternalClientError("cannot switch to state 12"), ShardUnavailable),
    (asyncpg_base.ProtocolError("unexpected message"), ShardUnavailable),
    (asyncpg.InterfaceError("connection is closed"), ShardUnavailable),
    (asyncpg.ConnectionDoesNotExistError("connection was closed in the middle"), ShardUnavailable),
    (
        asyncpg.AdminShutdownError("terminating connection due to administrator command"),
        ShardUnavailable,
    ),
    (asyncpg.CrashShutdownError("crash"), ShardUnavailable),
    (asyncpg.CannotConnectNowError("the database system is starting up"), ShardUnavailable),
    (asyncpg.TooManyConnectionsError("too many clients already"), ShardUnavailable),
    (ConnectionResetError(104, "reset by peer"), ShardUnavailable),
    (OSError("no route"), ShardUnavailable),
    (asyncpg.PostgresSyntaxError('syntax error at or near "SELEC"'), QueryError),
    (asyncpg.UndefinedTableError('relation "nope" does not exist'), QueryError),
    (TypeError("an int is required"), QueryError),
    (RuntimeError("anything else the driver raises"), QueryError),
]


@pytest.mark.parametrize(("exc", "expected"), CASES, ids=[type(e).__name__ for e, _ in CASES])
def test_every_driver_error_maps_to_one_tenfold_type(
    exc: BaseException, expected: type[DataError]
) -> None:
    mapped = map_error("s3", URL, 2.5, exc, "SELECT 1")
    assert type(mapped) is expected
    assert mapped.shard == "s3"
    assert "s3" in str(mapped)
    if isinstance(mapped, ShardUnavailable):
        assert mapped.url == URL
    if isinstance(mapped, ShardTimeout):
        assert mapped.timeout_s == 2.5


@pytest.mark.parametrize(
    ("exc", "words"),
    [
        (asyncpg.CharacterNotInRepertoireError('invalid byte sequence: 0x00 "secret"'), "NUL"),
        (asyncpg.UntranslatableCharacterError("\\u0000 cannot be converted"), "NUL"),
        (
            asyncpg.DataError("invalid input for query argument $1: 99 (out of int64 range)"),
            "out of range",
        ),
        (asyncpg.StringDataRightTruncationError("value too long for type varchar(3)"), "too long"),
    ],
)
def test_an_invalid_value_is_422_in_our_words(exc: BaseException, words: str) -> None:
    mapped = map_error("s3", URL, 1.0, exc, "INSERT INTO t VALUES ($1)")
    assert isinstance(mapped, InvalidValue)
    assert mapped.http_status == 422 and mapped.slug == "invalid-value"
    assert words in mapped.reason
    # the client-facing reason never repeats the driver's text or the statement
    assert str(exc) not in mapped.reason and "INSERT" not in mapped.reason


def test_our_own_errors_pass_through_unchanged() -> None:
    ours = ShardTimeout("s3", 1.0)
    assert map_error("s3", URL, 1.0, ours, "SELECT 1") is ours
