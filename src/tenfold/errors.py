"""The one exception tree of tenfold.

Driver errors (asyncpg, sqlite3, ...) are mapped once, at the backend boundary,
to the most specific error below. Every message names the thing that failed
(setting, shard, URL without its password, slot, epoch) and what to do next.

    TenfoldError
    ├── ConfigError            a setting is missing, malformed or inconsistent
    ├── KeyspaceError          a key, slot, id or topology is invalid
    │   └── TopologyError      a slot unowned or owned twice, an unknown shard
    ├── StaleEpoch             a topology write lost a race with a newer epoch
    ├── DataError              a shard answered with an error
    │   ├── ShardUnavailable   a shard (or replica) could not be reached in time,
    │   │                      or its circuit breaker is open (fail fast)
    │   ├── ShardTimeout       a query ran past its timeout
    │   │   └── ShardBusy      the shard's bulkhead was full: the request was not run
    │   ├── QueryError         the shard rejected a statement (syntax, types, ...)
    │   │   ├── ConstraintViolation  a unique, foreign-key or check constraint
    │   │   └── InvalidValue   a value the database cannot store (NUL in text,
    │   │                      a number out of range): a 4xx, not a server fault
    │   ├── ScatterError       some shards of a scatter failed (partial=False)
    │   └── MigrationError     a migration failed or was changed after applying
    ├── EventError             the event log refused or failed an operation
    │   ├── TopicError         an invalid or unknown topic, group or dead letter
    │   ├── PayloadError       a payload that cannot be serialised or is too large
    │   └── BrokerUnavailable  the stream broker could not be reached in time
    ├── RateLimitError         a rate-limit check named an unknown rule or an impossible cost
    ├── ResilienceError        a resilience guard refused or cut short a call
    │   ├── CircuitOpen        a circuit breaker is open for a dependency
    │   ├── BulkheadFull       a bulkhead had no free slot within its wait bound
    │   ├── Overloaded         admission control shed a request (503 + Retry-After)
    │   └── DeadlineExceeded   an operation ran past its deadline
    ├── MissingDependency      an optional extra is not installed
    ├── CacheError             a cache key or value that cannot be serialised or is too large
    └── AuthError              authentication refused (carries an HTTP status and a safe reason)
        ├── InvalidCredentials   wrong user name or password (401)
        ├── PasswordPolicyError  a new password breaks the password policy (422)
        ├── PasswordHashInvalid  a stored password hash cannot be read (500)
        └── TokenInvalid         a malformed, forged, unknown or revoked token (401)
            ├── TokenExpired     a token past its expiry (401)
            └── TokenReused      a rotated refresh token presented again: family revoked (401)
"""

from __future__ import annotations

__all__ = [
    "AuthError",
    "BrokerUnavailable",
    "BulkheadFull",
    "CacheError",
    "CircuitOpen",
    "ConfigError",
    "ConstraintViolation",
    "DataError",
    "DeadlineExceeded",
    "EventError",
    "InvalidCredentials",
    "InvalidValue",
    "KeyspaceError",
    "MigrationError",
    "MissingDependency",
    "MoveConflict",
    "MoveRefused",
    "Overloaded",
    "PasswordHashInvalid",
    "PasswordPolicyError",
    "PayloadError",
    "QueryError",
    "RateLimitError",
    "ReshardError",
    "ResilienceError",
    "ScatterError",
    "ShardBusy",
    "ShardTimeout",
    "ShardUnavailable",
    "SlotMoved",
    "StaleEpoch",
    "TenfoldError",
    "TokenExpired",
    "TokenInvalid",
    "TokenReused",
    "TopicError",
    "TopologyError",
    "VerifyFailed",
]


class TenfoldError(Exception):
    """Base of every error tenfold raises on purpose."""


class ConfigError(TenfoldError):
    """A setting is missing, malformed or conflicts with another one."""

    def __init__(self, setting: str, problem: str) -> None:
        self.setting = setting
        self.problem = problem
        super().__init__(f"{setting}: {problem}")


class KeyspaceError(TenfoldError, ValueError):
    """A key, slot or id is outside what the keyspace accepts."""


class TopologyError(KeyspaceError):
    """A topology does not map every slot to exactly one known shard."""


class StaleEpoch(TenfoldError):
    """A topology change was based on an epoch that is no longer current."""

    def __init__(self, expected: int, current: int) -> None:
        self.expected = expected
        self.current = current
        super().__init__(
            f"topology epoch {expected} is stale: the catalog is at epoch {current}; "
            "reload the topology and retry the change against the current epoch"
        )


class DataError(TenfoldError):
    """A shard operation failed."""

    def __init__(self, message: str, *, shard: str | None = None) -> None:
        self.shard = shard
        super().__init__(message)


class ShardUnavailable(DataError):
    """A shard or replica could not be reached within the connect timeout.

    Also raised, without contacting the shard, while its circuit breaker is
    open; `retry_after_s` then says when the next probe is let through (the
    gateway's Retry-After).
    """

    def __init__(
        self, shard: str, url: str, reason: str, *, retry_after_s: float | None = None
    ) -> None:
        self.url = url
        self.reason = reason
        self.retry_after_s = retry_after_s
        what = "the catalog" if shard == "catalog" else f"shard {shard}"
        super().__init__(
            f"{what} at {url} is unavailable: {reason}; "
            "check that the server is up and the URL is right",
            shard=shard,
        )


class ShardTimeout(DataError):
    """A query on a shard did not finish within its timeout."""

    def __init__(self, shard: str, timeout_s: float, what: str = "query") -> None:
        self.timeout_s = timeout_s
        super().__init__(
            f"{what} on shard {shard} did not finish within {timeout_s:g} s; "
            "raise the timeout or look for a slow query or a lock on that shard",
            shard=shard,
        )


class ShardBusy(ShardTimeout):
    """Every slot of the shard's bulkhead was taken and none freed in time.

    The request was not run: the shard is slow or stalled, and queueing more
    work behind it would only tie up the process (and its admission budget).
    """

    def __init__(self, shard: str, max_concurrent: int, max_wait_s: float) -> None:
        self.max_concurrent = max_concurrent
        self.max_wait_s = max_wait_s
        super().__init__(
            shard,
            max_wait_s,
            f"waiting for one of the {max_concurrent} request slots (the bulkhead)",
        )


class QueryError(DataError):
    """The shard rejected a statement; the driver's message is kept."""

    def __init__(self, shard: str, message: str, *, sql: str | None = None) -> None:
        self.sql = sql
        where = f" in {sql.strip()[:120]!r}" if sql else ""
        super().__init__(f"shard {shard}: {message}{where}", shard=shard)


class ConstraintViolation(QueryError):
    """A unique, foreign-key, not-null or check constraint refused the write."""


class InvalidValue(QueryError):
    """A value the database cannot store: a NUL character in text, a number out of range.

    Caused by the input, not by the server: the gateway answers 422 with
    `reason`, which is tenfold's own wording and never the driver's text.
    """

    http_status = 422
    slug = "invalid-value"

    def __init__(self, shard: str, problem: str, *, sql: str | None = None) -> None:
        self.reason = f"a value in the request cannot be stored: {problem}"
        super().__init__(shard, f"{self.reason}; nothing was written", sql=sql)


class ScatterError(DataError):
    """One or more shards of a scatter query failed and partial results were not allowed."""

    def __init__(self, failed: dict[str, BaseException]) -> None:
        self.failed = failed
        detail = "; ".join(f"{name}: {exc}" for name, exc in sorted(failed.items()))
        super().__init__(
            f"scatter failed on {len(failed)} shard(s) [{detail}]; "
            "pass partial=True to get the other shards' rows",
        )


class SlotMoved(DataError):
    """A shard refused a write to a slot it no longer owns (resharding's MOVED).

    Raised inside the writing transaction, which rolls back: nothing was
    written. The router has marked its topology stale; open the connection
    again (`db.transaction_for` does this for you) to reach the new owner.
    """

    retry_after_s = 1.0

    def __init__(self, shard: str, slot: int | None = None) -> None:
        self.slot = slot
        which = "a slot" if slot is None else f"slot {slot}"
        super().__init__(
            f"shard {shard} no longer owns {which} (it moved); nothing was written: "
            "refresh the topology and retry on the new owner",
            shard=shard,
        )


class MigrationError(DataError):
    """A migration could not be applied, or an applied one was edited."""


class MissingDependency(TenfoldError, ImportError):
    """An optional dependency is needed for the URL or feature in use."""

    def __init__(self, package: str, extra: str, needed_for: str) -> None:
        super().__init__(
            f"{needed_for} needs the '{package}' package: pip install 'tenfold[{extra}]'"
        )


class EventError(TenfoldError):
    """The event log refused or failed an operation."""


class TopicError(EventError, ValueError):
    """An invalid or unknown topic, consumer group or dead letter."""


class PayloadError(EventError, ValueError):
    """An event payload that cannot be serialised or exceeds the topic's limit."""

    def __init__(self, topic: str, problem: str) -> None:
        self.topic = topic
        super().__init__(f"event for topic {topic}: {problem}; nothing was written")


class BrokerUnavailable(EventError):
    """The stream broker could not be reached, or did not acknowledge, in time."""

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        super().__init__(
            f"event broker at {url} is unavailable: {reason}; emits still commit to the "
            "outbox and the relay publishes them when the broker is back"
        )


class RateLimitError(TenfoldError, ValueError):
    """A rate-limit check named an unknown rule or asked for an impossible cost.

    Not raised for a refused request: a refusal is a `Decision` with
    `allowed=False`.
    """


class ResilienceError(TenfoldError):
    """A resilience guard (breaker, bulkhead, deadline) refused or cut short a call."""


class CircuitOpen(ResilienceError):
    """A circuit breaker is open: the dependency was not called."""

    def __init__(self, name: str, retry_in_s: float) -> None:
        self.name = name
        self.retry_in_s = retry_in_s
        super().__init__(
            f"circuit breaker for {name} is open after repeated failures; the call was not "
            f"made; it will let a probe through in {retry_in_s:.3g} s: fail fast or serve a "
            f"fallback until then, and check the health of {name}"
        )


class BulkheadFull(ResilienceError):
    """A bulkhead had no free slot within its wait bound; the call was not made."""

    def __init__(self, name: str, max_concurrent: int, max_wait_s: float) -> None:
        self.name = name
        self.max_concurrent = max_concurrent
        self.max_wait_s = max_wait_s
        super().__init__(
            f"bulkhead for {name} is full: {max_concurrent} calls in flight and no slot freed "
            f"within {max_wait_s:g} s; the call was not made: shed load or retry later, or "
            f"raise max_concurrent if {name} can take more"
        )


class DeadlineExceeded(ResilienceError, TimeoutError):
    """An operation did not finish within its deadline and was cancelled."""

    def __init__(self, what: str, seconds: float) -> None:
        self.what = what
        self.seconds = seconds
        super().__init__(
            f"{what} did not finish within its {seconds:g} s deadline and was cancelled; "
            "raise the deadline or look for what made it slow"
        )


class CacheError(TenfoldError, ValueError):
    """A cache key or value that cannot be serialised or exceeds the size bound."""

    def __init__(self, key: object, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"cache key {str(key)[:200]!r}: {problem}; nothing was cached")


class Overloaded(ResilienceError):
    """Admission control shed the request: the service is at its concurrency limit."""

    def __init__(self, priority: str, limit: int, in_flight: int, retry_after_s: float) -> None:
        self.priority = priority
        self.limit = limit
        self.in_flight = in_flight
        self.retry_after_s = retry_after_s
        super().__init__(
            f"overloaded: {in_flight} requests in flight against an adaptive limit of {limit}; "
            f"this {priority!r} request was shed and not run: answer 503 with Retry-After "
            f"{retry_after_s:g} s, and add capacity if shedding persists"
        )


class AuthError(TenfoldError):
    """Authentication failed or was refused.

    The attributes are what `tenfold.gateway.problems` turns into a response:
    `http_status`, `reason` (safe to show the client: it never contains a
    token, a password or a hash), `slug` (the problem type) and `headers`
    (`WWW-Authenticate` on a 401). `str(exc)` may add a server-side `detail`
    for the logs, still without secrets.
    """

    http_status: int = 401
    slug: str = "unauthenticated"
    code: str = "invalid_request"  # the RFC 6750 error code of the challenge

    def __init__(self, reason: str, *, detail: str | None = None) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(reason if detail is None else f"{reason} ({detail})")

    @property
    def headers(self) -> dict[str, str]:
        """`WWW-Authenticate` for a 401 answer (RFC 6750), else nothing."""
        if self.http_status != 401:
            return {}
        description = self.reason.replace("\\", "").replace('"', "'")
        return {
            "WWW-Authenticate": f'Bearer error="{self.code}", error_description="{description}"'
        }


class InvalidCredentials(AuthError):
    """Wrong user name or password; deliberately does not say which."""

    slug = "invalid-credentials"
    code = "invalid_grant"

    def __init__(self, detail: str | None = None) -> None:
        super().__init__("wrong user name or password", detail=detail)


class PasswordPolicyError(AuthError, ValueError):
    """A new password breaks the password policy; the reason says how to fix it."""

    http_status = 422
    slug = "weak-password"

    def __init__(self, reason: str) -> None:
        super().__init__(reason)


class PasswordHashInvalid(AuthError):
    """A stored password hash is not a hash this hasher can read (corrupt or foreign)."""

    http_status = 500
    slug = "internal"
    code = "server_error"

    def __init__(self, detail: str) -> None:
        super().__init__("credentials could not be checked; try again later", detail=detail)


class TokenInvalid(AuthError):
    """A token that is malformed, forged, unknown, revoked or not accepted here."""

    slug = "invalid-token"
    code = "invalid_token"


class TokenExpired(TokenInvalid):
    """A token past its expiry: get a new one (refresh, or sign in again)."""

    slug = "token-expired"


class TokenReused(TokenInvalid):
    """A refresh token presented after it was rotated or revoked.

    The whole token family (every token descended from the same sign-in) has
    been revoked: whoever holds it must sign in again.
    """

    slug = "token-reused"


class ReshardError(TenfoldError):
    """A slot move could not start, continue or finish."""


class MoveRefused(ReshardError, ValueError):
    """A move request is invalid (bad slot ranges, unknown shard, no-op move): nothing changed."""


class MoveConflict(MoveRefused):
    """Another unfinished move already holds some of the requested slots: nothing changed."""


class VerifyFailed(ReshardError):
    """Source and target disagree after catch-up; `mismatches` names (slot, table, key)."""

    def __init__(self, move_id: str, mismatches: list[tuple[int, str, str]]) -> None:
        self.move_id = move_id
        self.mismatches = mismatches
        shown = "; ".join(f"slot {s} {t} key {k}" for s, t, k in mismatches[:10])
        more = f" (and {len(mismatches) - 10} more)" if len(mismatches) > 10 else ""
        super().__init__(
            f"move {move_id}: {len(mismatches)} row(s) differ between source and target: "
            f"{shown}{more}; the workflow stopped before the switch. Inspect the rows, then "
            f"`tenfold shards resume {move_id}` (catches up and verifies again) or "
            f"`cancel {move_id}`"
        )
