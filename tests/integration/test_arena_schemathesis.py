"""A full Schemathesis run against arena: every check, every phase, on both stacks.

arena is served by a real uvicorn (SQLite shards, then PostgreSQL shards), and
the `schemathesis` CLI runs against its OpenAPI document exactly as a user
would (`st run ... --checks all`), with the repository's `schemathesis.toml`:
- phases: coverage (boundary values, undeclared methods, missing headers),
  fuzzing (positive and negative data), stateful (links inferred from the
  schema: a room created, then posted to, joined, left);
- checks: all of them: no 5xx, every status, header, content type and body
  documented, schema-valid data accepted, schema-invalid data refused, 405s
  with an `Allow` listing every method of the path, missing required headers
  refused, and the rest;
- bounded: `--generation-deterministic` (the same cases every run, so a pass
  is not luck and a failure reproduces) and `MAX_EXAMPLES` per operation; the
  run takes about 15 s per backend on a 2-core box.

Authenticated operations carry a valid Bearer token of a registered user; a
second user, "bob", exists so transfers can be credited.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.integration.realtime_support import served_arena

MAX_EXAMPLES = 20  # per operation and phase
CONFIG = Path(__file__).resolve().parents[2] / "schemathesis.toml"
CLI = Path(sys.executable).parent / "schemathesis"
RUN_TIMEOUT_S = 240.0


async def test_full_schemathesis_run_is_clean(
    make_settings: Callable[..., Any], tmp_path: Path
) -> None:
    settings = make_settings(
        shards=2,
        # the run sends a few thousand requests from one address
        rate_limits={"ip": "100000/minute burst 100000 per ip on *"},
        max_body_bytes=256 * 1024,
    )
    async with served_arena(settings) as srv:
        user = await srv.arena.signup("prop_user")
        await srv.arena.signup("bob")
        proc = await asyncio.create_subprocess_exec(
            str(CLI),
            "--config-file",
            str(CONFIG),
            "--no-color",
            "run",
            f"http://127.0.0.1:{srv.port}/openapi.json",
            "--checks",
            "all",
            "--max-examples",
            str(MAX_EXAMPLES),
            "--generation-deterministic",
            "--workers",
            "1",
            "--request-timeout",
            "10",
            "-H",
            f"Authorization: Bearer {user.access}",
            cwd=tmp_path,  # its example cache (.schemathesis/) stays out of the checkout
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            async with asyncio.timeout(RUN_TIMEOUT_S):
                output, _ = await proc.communicate()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    report = output.decode(errors="replace")
    assert proc.returncode == 0, report[-12000:]
    assert "No issues found" in report, report[-4000:]
