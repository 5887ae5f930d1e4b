"""Two `tenfold up` worker processes behind one port deliver to each other's clients.

`tenfold up --stack local --workers 2` (NATS for realtime) as a user runs it;
clients connect to the one port until two of them land on different worker
processes (the auth `ok` frame names the serving node), then each receives
the other's publishes to their room (cross-worker fan-out over NATS), and a
message posted through the API reaches both (outbox, JetStream, consumer, hub).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson
from websockets.asyncio.client import ClientConnection, connect

from tests.integration.test_stack_local import Up, _env, open_tmp  # noqa: F401 - fixture

PASSWORD = "correct horse battery staple"


async def _user(client: httpx.AsyncClient) -> dict[str, str]:
    name = f"u{uuid.uuid4().hex[:12]}"
    r = await client.post("/auth/register", json={"username": name, "password": PASSWORD})
    assert r.status_code == 201, r.text
    r = await client.post("/auth/login", json={"username": name, "password": PASSWORD})
    assert r.status_code == 200, r.text
    return {"name": name, "token": r.json()["access_token"]}


async def _frame(
    ws: ClientConnection, op: str, timeout_s: float = 20.0, **match: Any
) -> dict[str, Any]:
    async with asyncio.timeout(timeout_s):
        while True:
            f: dict[str, Any] = orjson.loads(await ws.recv())
            if f.get("op") == op and all(f.get(k) == v for k, v in match.items()):
                return f


async def test_two_workers_deliver_each_others_room_messages(
    tmp_path: Path,
    open_tmp: Path,  # noqa: F811 - the fixture imported above
) -> None:
    up = Up(tmp_path, _env(TMPDIR=str(open_tmp)), tmp_path / "logs", "--workers", "2")
    try:
        await asyncio.to_thread(up.wait_ready)
        async with httpx.AsyncClient(base_url=up.base, timeout=10) as client:
            alice, bob = await _user(client), await _user(client)
            auth = {u["name"]: {"Authorization": f"Bearer {u['token']}"} for u in (alice, bob)}
            r = await client.post("/rooms", json={"name": "w"}, headers=auth[alice["name"]])
            assert r.status_code == 201, r.text
            room = r.json()["id"]
            r = await client.post(f"/rooms/{room}/join", headers=auth[bob["name"]])
            assert r.status_code == 200, r.text
            ch = f"room:{room}"
            url = up.base.replace("http://", "ws://") + "/ws?token="
            async with contextlib.AsyncExitStack() as stack:
                # one connection per worker: connect until both nodes have answered
                by_node: dict[str, tuple[ClientConnection, dict[str, str]]] = {}
                for attempt in range(200):
                    user = (alice, bob)[attempt % 2]
                    ws = await connect(url + user["token"])
                    ok = await _frame(ws, "ok")
                    if ok["node"] in by_node:  # close it: each user may hold only 20
                        await ws.close()
                        await asyncio.sleep(0.01)
                        continue
                    by_node[ok["node"]] = (await stack.enter_async_context(ws), user)
                    if len(by_node) == 2:
                        break
                assert len(by_node) == 2, f"every connection landed on {list(by_node)}"
                (node_a, (wa, _)), (node_b, (wb, _)) = by_node.items()
                assert node_a.rsplit(":", 1)[1] != node_b.rsplit(":", 1)[1]  # two pids
                for ws in (wa, wb):
                    await ws.send(orjson.dumps({"op": "sub", "ch": ch, "ref": 1}).decode())
                    assert (await _frame(ws, "ok", ref=1))["ch"] == ch
                # each client's ephemeral publish reaches the client on the other worker
                for sender, receiver, who in ((wa, wb, node_a), (wb, wa, node_b)):
                    pub = {"op": "pub", "ch": ch, "data": {"from": who}, "ephemeral": True}
                    await sender.send(orjson.dumps(pub).decode())
                    got = await _frame(receiver, "msg", ch=ch, data={"from": who})
                    assert got["ephemeral"] is True
                # a committed message (API -> outbox -> NATS -> one worker's consumer ->
                # realtime publish) reaches the clients of both workers
                r = await client.post(
                    f"/rooms/{room}/messages", json={"body": "stored"}, headers=auth[alice["name"]]
                )
                assert r.status_code == 201, r.text
                for ws in (wa, wb):
                    got = await _frame(ws, "msg", ch=ch)
                    while got["data"].get("body") != "stored":
                        got = await _frame(ws, "msg", ch=ch)
                    assert "ephemeral" not in got or got["ephemeral"] is False
        code, _ = await asyncio.to_thread(up.sigterm)
        assert code == 0, up.output()
    finally:
        up.close()
