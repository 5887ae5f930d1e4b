"""Locust load for arena: `tenfold bench` runs this file headless (or `locust -f` it yourself).

Each simulated user, on start, registers a unique name, logs in, and creates or
joins one room of a small shared pool (ARENA_ROOMS rooms, 4 by default), so
messages from many users land in the same rooms. Then it loops over three
tasks, weighted as the issue asks:

    login   30%  POST /auth/login
    chat    50%  POST /rooms/{id}/messages with an Idempotency-Key;
                 one time in five also GET /rooms/{id}/messages (the latest page)
    wallet  20%  POST /wallet/transfers of 1 point to another registered user,
                 with an Idempotency-Key; then GET /wallet

Requests are named by route template (`/rooms/{id}/messages`), so the stats are
per route, not per room. Between tasks a user waits uniformly 0..TENFOLD_BENCH_WAIT
seconds (default 1; 0 = closed loop, as fast as the server answers).
"""

from __future__ import annotations

import os
import random
import threading
import time
import uuid

from locust import HttpUser, between, constant, task

ROOMS = int(os.environ.get("ARENA_ROOMS", "4"))
WAIT = float(os.environ.get("TENFOLD_BENCH_WAIT", "1"))
PASSWORD = "bench-password-1"

_lock = threading.Lock()
_rooms: list[str] = []  # the shared pool of room ids, filled by the first users
_names: list[str] = []  # every registered user name: transfer recipients
_claimed = 0  # rooms being or already created


class ArenaUser(HttpUser):
    wait_time = between(0, WAIT) if WAIT > 0 else constant(0)

    def on_start(self) -> None:
        self.username = f"u{uuid.uuid4().hex[:20]}"
        self.token = ""
        self.room = ""
        self.client.post(
            "/auth/register",
            json={"username": self.username, "password": PASSWORD},
            name="/auth/register",
        )
        self.login()
        if not self.token:
            return
        global _claimed
        with _lock:  # claim a slot in the pool before the request: greenlets interleave
            create = _claimed < ROOMS
            _claimed += create
        if create:
            r = self.client.post(
                "/rooms", json={"name": f"bench-{len(_rooms)}"}, headers=self.auth, name="/rooms"
            )
            if r.ok:
                self.room = r.json()["id"]
                with _lock:
                    _rooms.append(self.room)
        else:
            for _ in range(200):  # another user may still be creating the first room
                if _rooms:
                    break
                time.sleep(0.05)  # gevent-patched: yields to the other users
            if not _rooms:
                return
            with _lock:
                self.room = random.choice(_rooms)
            self.client.post(f"/rooms/{self.room}/join", headers=self.auth, name="/rooms/{id}/join")
        with _lock:
            _names.append(self.username)

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    @task(30)
    def login(self) -> None:
        r = self.client.post(
            "/auth/login",
            json={"username": self.username, "password": PASSWORD},
            name="/auth/login",
        )
        if r.ok:
            self.token = r.json()["access_token"]

    @task(50)
    def chat(self) -> None:
        if not self.room:
            return
        self.client.post(
            f"/rooms/{self.room}/messages",
            json={"body": f"hello from {self.username}"},
            headers={**self.auth, "Idempotency-Key": uuid.uuid4().hex},
            name="/rooms/{id}/messages",
        )
        if random.random() < 0.2:
            self.client.get(
                f"/rooms/{self.room}/messages?limit=20",
                headers=self.auth,
                name="/rooms/{id}/messages",
            )

    @task(20)
    def wallet(self) -> None:
        with _lock:
            others = [n for n in random.sample(_names, min(3, len(_names))) if n != self.username]
        if not self.token or not others:
            return
        self.client.post(
            "/wallet/transfers",
            json={"to": others[0], "amount": 1},
            headers={**self.auth, "Idempotency-Key": uuid.uuid4().hex},
            name="/wallet/transfers",
        )
        self.client.get("/wallet", headers=self.auth, name="/wallet")
