"""Password hashing with argon2id, off the event loop and bounded in memory.

Invariants:
- Hashing and verifying run in a worker thread (`asyncio.to_thread`), so a
  login never stalls the event loop for the tens of milliseconds a hash takes.
- At most `max_concurrent` hashes run at once: each takes `memory_kib` of RAM,
  so a login flood costs at most `max_concurrent * memory_kib`; a caller that
  waits longer than `max_wait_s` for a turn gets `BulkheadFull` (answer 503),
  and so does one arriving while `max_waiting` callers already wait.
  The turn is held until the thread finishes, even if the caller is cancelled.
- A request that comes to hash steps aside from admission control
  (`tenfold.limits.admission.step_aside`): this queue and its bounds govern it
  from there, and its wait is not read as the process's congestion (40 logins
  at once were shed by admission while the hasher would have served them).
- `verify` answers False for a wrong password and never raises for one; a
  stored hash that cannot be read raises `PasswordHashInvalid`.
- Passwords and hashes never appear in an error message.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import argon2
from argon2.exceptions import (
    InvalidHashError,
    VerificationError,
    VerifyMismatchError,
)

from tenfold.errors import BulkheadFull, ConfigError, PasswordHashInvalid, PasswordPolicyError
from tenfold.limits.admission import step_aside

__all__ = ["OWASP", "TESTING", "PasswordHasher", "PasswordParams", "check_password_policy"]

_T = TypeVar("_T")

# Passwords longer than this are refused by `verify` without hashing: no
# policy accepts them, and hashing megabytes on request is a denial of service.
_VERIFY_MAX_CHARS = 4096


@dataclass(frozen=True, slots=True)
class PasswordParams:
    """argon2id cost parameters (see RFC 9106 and the OWASP password storage cheat sheet).

    Args:
        time_cost: passes over memory.
        memory_kib: memory per hash, in KiB.
        parallelism: lanes (threads) per hash.
        hash_len: bytes of derived key.
        salt_len: bytes of random salt.
    """

    time_cost: int = 2
    memory_kib: int = 19 * 1024
    parallelism: int = 1
    hash_len: int = 32
    salt_len: int = 16

    def check(self) -> None:
        if self.time_cost < 1:
            raise ConfigError("PasswordParams.time_cost", f"must be >= 1, got {self.time_cost}")
        if self.parallelism < 1:
            raise ConfigError("PasswordParams.parallelism", f"must be >= 1, got {self.parallelism}")
        if self.memory_kib < 8 * self.parallelism:
            raise ConfigError(
                "PasswordParams.memory_kib",
                f"argon2 needs at least 8 KiB per lane ({8 * self.parallelism}), "
                f"got {self.memory_kib}",
            )
        if self.hash_len < 16 or self.salt_len < 16:
            raise ConfigError(
                "PasswordParams.hash_len/salt_len",
                f"need at least 16 bytes each, got {self.hash_len}/{self.salt_len}",
            )


# OWASP's first argon2id recommendation: m=19 MiB, t=2, p=1.
OWASP = PasswordParams()
# Cheap parameters for tests and local development only: never in production.
TESTING = PasswordParams(time_cost=1, memory_kib=1024, parallelism=1)


def check_password_policy(password: object, *, min_length: int = 8, max_length: int = 128) -> str:
    """Return `password` if the policy accepts it, else raise `PasswordPolicyError`.

    The policy (NIST SP 800-63B style): a string of `min_length`..`max_length`
    characters that is not all whitespace. No composition rules.
    """
    if not isinstance(password, str):
        raise PasswordPolicyError("the password must be a string")
    if len(password) < min_length:
        raise PasswordPolicyError(f"the password must be at least {min_length} characters long")
    if len(password) > max_length:
        raise PasswordPolicyError(f"the password must be at most {max_length} characters long")
    if not password.strip():
        raise PasswordPolicyError("the password must not be only whitespace")
    if "\x00" in password:
        raise PasswordPolicyError("the password must not contain NUL characters")
    return password


class PasswordHasher:
    """argon2id hashing for `async` code.

    Args:
        params: cost parameters (`OWASP` by default; `TESTING` for tests).
        max_concurrent: hashes running at once (default: the CPU count, at most 8).
        max_wait_s: how long a caller waits for a turn before `BulkheadFull`.
        max_waiting: callers allowed to wait for a turn at once; beyond, `BulkheadFull`.
        min_length, max_length: the password policy applied by `hash`.
    """

    def __init__(
        self,
        params: PasswordParams = OWASP,
        *,
        max_concurrent: int | None = None,
        max_wait_s: float = 5.0,
        max_waiting: int = 256,
        min_length: int = 8,
        max_length: int = 128,
    ) -> None:
        params.check()
        if max_concurrent is None:
            max_concurrent = min(8, os.cpu_count() or 1)
        if max_concurrent < 1:
            raise ConfigError(
                "PasswordHasher.max_concurrent", f"must be >= 1, got {max_concurrent}"
            )
        if max_wait_s <= 0:
            raise ConfigError("PasswordHasher.max_wait_s", f"must be > 0, got {max_wait_s}")
        if max_waiting < 0:
            raise ConfigError("PasswordHasher.max_waiting", f"must be >= 0, got {max_waiting}")
        if not 1 <= min_length <= max_length <= _VERIFY_MAX_CHARS:
            raise ConfigError(
                "PasswordHasher.min_length/max_length",
                f"need 1 <= min_length <= max_length <= {_VERIFY_MAX_CHARS}, "
                f"got {min_length}/{max_length}",
            )
        self.params = params
        self.max_concurrent = max_concurrent
        self.max_wait_s = max_wait_s
        self.max_waiting = max_waiting
        self._waiting = 0
        self.min_length = min_length
        self.max_length = max_length
        self._ph = argon2.PasswordHasher(
            time_cost=params.time_cost,
            memory_cost=params.memory_kib,
            parallelism=params.parallelism,
            hash_len=params.hash_len,
            salt_len=params.salt_len,
            type=argon2.Type.ID,
        )
        self._turns = asyncio.Semaphore(max_concurrent)
        self._dummy: str | None = None

    def check_policy(self, password: object) -> str:
        """Return `password` if the policy accepts it, else raise `PasswordPolicyError`."""
        return check_password_policy(
            password, min_length=self.min_length, max_length=self.max_length
        )

    async def hash(self, password: str) -> str:
        """The argon2id hash (PHC string) of a password the policy accepts."""
        self.check_policy(password)
        return await self._run(self._ph.hash, password)

    async def verify(self, hash: str, password: str) -> bool:
        """True if `password` matches `hash`; False for any wrong password.

        Raises:
            PasswordHashInvalid: `hash` is not an argon2 hash this hasher can read.
        """
        if not isinstance(hash, str) or not hash.startswith("$argon2"):
            raise PasswordHashInvalid("the stored password hash is not an argon2 PHC string")
        if not isinstance(password, str) or len(password) > _VERIFY_MAX_CHARS:
            return False
        return await self._run(self._verify, hash, password)

    async def verify_absent(self, password: str) -> bool:
        """Spend the time of a `verify` and answer False: for a user that does not exist.

        Calling it on a login for an unknown user keeps the answer time the same
        as for a known user with a wrong password, so timing does not reveal
        which user names exist.
        """
        if self._dummy is None:
            self._dummy = await self._run(self._ph.hash, "tenfold-absent-user")
        await self.verify(self._dummy, password if isinstance(password, str) else "")
        return False

    def needs_rehash(self, hash: str) -> bool:
        """True if `hash` was made with other parameters (or type) than this hasher's.

        Rehash on the next successful login: `await hasher.hash(password)`.
        """
        try:
            return self._ph.check_needs_rehash(hash)
        except (InvalidHashError, ValueError, TypeError) as exc:
            raise PasswordHashInvalid(
                f"the stored password hash cannot be parsed: {type(exc).__name__}"
            ) from None

    def _verify(self, hash: str, password: str) -> bool:
        try:
            return self._ph.verify(hash, password)
        except VerifyMismatchError:
            return False
        except InvalidHashError:
            raise PasswordHashInvalid(
                "the stored password hash is malformed; reset the user's password"
            ) from None
        except VerificationError as exc:
            raise PasswordHashInvalid(
                f"the stored password hash could not be checked ({exc}); reset the user's password"
            ) from None

    async def _run(self, fn: Callable[..., _T], *args: str) -> _T:
        step_aside()
        if self._waiting >= self.max_waiting and self._turns.locked():
            raise BulkheadFull("password hashing", self.max_concurrent, self.max_wait_s)
        self._waiting += 1
        try:
            async with asyncio.timeout(self.max_wait_s):
                await self._turns.acquire()
        except TimeoutError:
            raise BulkheadFull("password hashing", self.max_concurrent, self.max_wait_s) from None
        finally:
            self._waiting -= 1
        try:
            task = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        except BaseException:
            self._turns.release()
            raise
        # The turn is released when the thread is done, not when the caller
        # stops waiting: a cancelled login must not let more hashes run at once.
        task.add_done_callback(self._release)
        return await asyncio.shield(task)

    def _release(self, task: asyncio.Future[Any]) -> None:
        self._turns.release()
        if not task.cancelled():
            task.exception()  # mark it retrieved when nobody awaits it any more
