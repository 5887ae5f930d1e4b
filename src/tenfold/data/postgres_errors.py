"""Every asyncpg error, mapped once to a `tenfold.errors` type (the backend boundary).

    driver error                                    tenfold error
    ───────────────────────────────────────────────────────────────────────────
    IntegrityConstraintViolation (SQLSTATE 23)      ConstraintViolation  (409)
    data exception (22: NUL in text, \\u0000 in     InvalidValue         (422)
      JSON, number out of range, bad text for a
      type), asyncpg's "invalid input for query
      argument" (client side)
    query_canceled (57014: statement_timeout),      ShardTimeout         (503)
      lock_not_available (55P03), TimeoutError
    connection exception (08), operator             ShardUnavailable     (503)
      intervention (57: shutdown, cannot connect
      now), insufficient resources (53: too many
      connections), InterfaceError (a closed or
      busy connection), InternalClientError (the
      protocol in a broken state, e.g. "cannot
      switch to state 12" after the backend was
      killed mid-query), OSError, ConnectionError
    any other PostgresError (syntax, undefined      QueryError           (500)
      table, ...) or anything else the driver
      raises

Only the driver call sits inside the `try` that calls `map_error`, so an
exception that reaches it came from asyncpg (or the socket under it): nothing
unmapped reaches the caller, and the driver's text stays in the server-side
message (`str(exc)`), never in `reason`, which is what a client may see.
"""

from __future__ import annotations

from tenfold.errors import (
    ConstraintViolation,
    DataError,
    InvalidValue,
    MissingDependency,
    QueryError,
    ShardTimeout,
    ShardUnavailable,
    SlotMoved,
)

try:
    import asyncpg
    from asyncpg.exceptions import _base as asyncpg_base
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise MissingDependency("asyncpg", "postgres", "a postgresql:// URL") from exc

__all__ = ["SLOT_MOVED_SQLSTATE", "UNREACHABLE", "map_error"]

# Raised by tenfold_slot_trigger() (tenfold.reshard.capture) for a write to a
# slot this shard no longer owns.
SLOT_MOVED_SQLSTATE = "TF409"

# Errors that mean "this server or this connection is gone": the shard is
# unavailable (for now), whatever the statement was.
UNREACHABLE: tuple[type[BaseException], ...] = (
    OSError,  # ConnectionError and socket errors are OSErrors
    asyncpg.PostgresConnectionError,  # SQLSTATE 08
    asyncpg.OperatorInterventionError,  # 57: admin/crash shutdown, cannot connect now
    asyncpg.InsufficientResourcesError,  # 53: too many connections, disk full, out of memory
    asyncpg.InterfaceError,  # the connection is closed or in use
    asyncpg_base.InternalClientError,  # protocol state broken (a backend killed mid-query)
)

_TIMED_OUT: tuple[type[BaseException], ...] = (
    TimeoutError,
    asyncpg.QueryCanceledError,  # statement_timeout fired (a subclass of 57, so first)
    asyncpg.LockNotAvailableError,  # lock_timeout fired
)

# asyncpg raises its client-side "cannot encode this argument" as a DataError
# that is also an InterfaceError (and a ValueError): it must be checked before
# UNREACHABLE, or a bad input would read as a lost connection.
_BAD_VALUE: tuple[type[BaseException], ...] = (
    asyncpg.DataError,  # SQLSTATE 22 (data exception) on the server side
    asyncpg_base.DataError,  # the client-side encoding error
)

_BAD_TEXT = (asyncpg.CharacterNotInRepertoireError, asyncpg.UntranslatableCharacterError)


def map_error(
    shard: str, safe_url: str, timeout_s: float, exc: BaseException, sql: str
) -> DataError:
    """The tenfold error for an exception raised by asyncpg while running `sql`.

    Args:
        shard: the shard (pool) name, for the message.
        safe_url: the shard's URL without its password.
        timeout_s: the bound that applied, for a timeout's message.
        exc: what the driver raised.
        sql: the statement, kept in the server-side message only.
    """
    if isinstance(exc, DataError):
        return exc  # already ours (raised under the driver call by our own code)
    if getattr(exc, "sqlstate", None) == SLOT_MOVED_SQLSTATE:
        # The slot fence of tenfold.reshard: "tenfold_slot_moved slot=N".
        slot = str(exc).rpartition("=")[2]
        return SlotMoved(shard, int(slot) if slot.isdigit() else None)
    if isinstance(exc, asyncpg.IntegrityConstraintViolationError):
        return ConstraintViolation(shard, str(exc), sql=sql)
    if isinstance(exc, _BAD_VALUE):
        return InvalidValue(shard, _bad_value_problem(exc), sql=sql)
    if isinstance(exc, _TIMED_OUT):
        return ShardTimeout(shard, timeout_s)
    if isinstance(exc, UNREACHABLE):
        reason = str(exc) or type(exc).__name__
        return ShardUnavailable(shard, safe_url, f"connection lost: {reason}")
    # A syntax error, an undefined table, an argument of a Python type asyncpg
    # cannot bind at all: a fault in the code, kept for the logs.
    return QueryError(shard, f"{type(exc).__name__}: {exc}", sql=sql)


def _bad_value_problem(exc: BaseException) -> str:
    """Our own words for a data exception (the driver's text may quote the value)."""
    if isinstance(
        exc, asyncpg.CharacterNotInRepertoireError | asyncpg.UntranslatableCharacterError
    ):
        return "text contains a NUL character (U+0000) or an escape the database refuses"
    if isinstance(exc, asyncpg.NumericValueOutOfRangeError):
        return "a number is out of range"
    if isinstance(exc, asyncpg.StringDataRightTruncationError):
        return "a text value is too long"
    text = str(exc)
    if "out of" in text and "range" in text:
        return "a number is out of range"
    return "a value has the wrong form for its column"
