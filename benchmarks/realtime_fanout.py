"""Realtime fan-out: tenfold's hub vs python-socketio, N clients on one channel, 2 workers.

Measured: messages delivered per second (summed over all clients) and the p50/p99
publish-to-receive latency, with N clients (5,000, see CLIENTS; 200 with `--quick`;
`TENFOLD_BENCH_FANOUT_CLIENTS` overrides)
subscribed to one channel and one publisher, against 2 worker processes:

- "tenfold hub" (the subject): `tenfold up arena --workers 2 --server uvicorn`
  on 2 PostgreSQL shard databases + catalog, events on NATS (cross-worker
  fan-out is the hub's own). Every client sends `auth` (the access token of one
  of N/50 arena users, 50 connections each, per-user connection limit raised
  by env) and `sub` to the channel `room:<id>` of a room they all joined; the
  publisher, one more connection of the room's owner (publish rate limit
  raised), sends `pub` frames with `"ephemeral": true` (delivered, not stored:
  socket.io stores nothing either).
- "python-socketio" (the peer, `benchmarks/socketio_peer.py`): an
  `AsyncServer` in ASGI mode under `tenfold up benchmarks.socketio_peer:create_app
  --workers 2`, so the same uvicorn, uvloop, httptools and WebSocket
  implementation, with `AsyncRedisManager` on the local Redis (127.0.0.1:6379),
  python-socketio's documented multi-worker setup. Every client speaks Engine.IO
  v4 / Socket.IO v5 over a WebSocket (`40` connect, then an acknowledged
  `join` event); the publisher emits `pub` and the server emits `msg` to the room.

The load generator is ONE separate process (`python -m benchmarks.realtime_fanout
load ...`, uvloop) holding every connection on a lean client written on raw
asyncio (HTTP upgrade, unmasked server frames, masked client frames, pongs to
WebSocket pings and Engine.IO pings), no compression offered, so that the
client costs a few microseconds per frame on both sides alike. The payload is
`{"t": <publish time>, "i": <sequence>}`; every client counts the messages it
gets, and one client in `SAMPLE` parses them for the latency (send and receive
times are `time.perf_counter()` in the same process). The publisher keeps at
most `WINDOW` messages not yet delivered to every client (closed loop: the
rate is the server's, and no side's send queues overflow); after a warm-up,
it publishes for `seconds`, then waits for the last deliveries, so
deliveries/s = deliveries in the window / its length, and lost deliveries
are counted.

Why it is fair: same machine, server, worker count, loop, WebSocket
implementation, client, client count, payload and pacing; both sides fan out
across 2 processes through a broker (NATS, Redis). Rounds alternate (peer,
tenfold), each round with a fresh load-generator process and fresh
connections; medians of 3 rounds (1 with `--quick`). The machine has 2 cores
shared by both servers' workers, the broker and the load generator, so the
absolute rates are low; the ratio is the figure (goal: ≥ 3x the peer's
deliveries/s).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
from rich.table import Table

from benchmarks._common import console, median, rate
from benchmarks._common import main as run_main

PEER, SUBJECT = "python-socketio", "tenfold hub"
GOAL_RATIO = 3.0
# The size. (Join/leave frames are opt-in and coalesced, and the clients do not
# opt in, so setting up 5,000 subscribers is O(n), not n²/2 presence frames.)
CLIENTS, QUICK_CLIENTS = 5000, 200
WINDOW = 2  # messages in flight (not yet delivered to every client)
SAMPLE = 25  # one client in SAMPLE parses messages for the latency
CONNS_PER_USER = 50  # clients share arena users, 50 connections each
# One arena user holds every connection and one connection publishes: the hub's
# per-user connection limit and per-connection publish rate are raised for the run.
HUB_LIMITS = {
    "TENFOLD_ADMISSION_ENABLED": "false",  # as in `servers`: no 503 shedding on 2 busy cores
    "TENFOLD_REALTIME_MAX_CONNS_PER_USER": "1000000",
    "TENFOLD_REALTIME_PUBLISH_RATE": "1000000",
    "TENFOLD_REALTIME_PUBLISH_BURST": "1000000",
}


# --------------------------------------------------------------------------- lean client


def raise_nofile(n: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(max(soft, n), hard) if hard != resource.RLIM_INFINITY else max(soft, n)
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def ws_frame(payload: bytes, opcode: int = 1) -> bytes:
    """One masked client frame (RFC 6455)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    mask = os.urandom(4)
    if n == 0:
        return head + mask
    keys = (mask * (n // 4 + 1))[:n]
    body = (int.from_bytes(payload, "big") ^ int.from_bytes(keys, "big")).to_bytes(n, "big")
    return head + mask + body


class Stats:
    """Shared by every connection of the load generator."""

    def __init__(self) -> None:
        self.delivered = 0
        self.threshold = 1 << 62
        self.reached = asyncio.Event()
        self.latencies: list[float] = []
        self.measure_from = 1 << 62  # the first sequence number whose latency counts
        self.closed = 0
        self.frames = 0  # every text frame (presence frames too)
        self.close_codes: dict[int, int] = {}


class Client(asyncio.Protocol):
    """One WebSocket connection; `proto` is "tenfold" or "socketio"."""

    def __init__(
        self,
        stats: Stats,
        proto: str,
        host: str,
        path: str,
        setup: list[bytes],
        *,
        sampled: bool = False,
        counts: bool = True,
    ) -> None:
        self.stats, self.proto, self.sampled, self.counts = stats, proto, sampled, counts
        self.host, self.path = host, path
        self.setup = list(setup)  # frames to send, each after the previous answer
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.buf = b""
        self.upgraded = False
        self.transport: asyncio.Transport | None = None
        self.sio = proto == "socketio"

    # the socket.io handshake opens with the server's "0{...}" before the client speaks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        key = base64.b64encode(os.urandom(16)).decode()
        transport.write(  # type: ignore[attr-defined]
            (
                f"GET {self.path} HTTP/1.1\r\nHost: {self.host}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )

    def send(self, payload: bytes) -> None:
        assert self.transport is not None
        self.transport.write(ws_frame(payload))

    def connection_lost(self, exc: Exception | None) -> None:
        self.stats.closed += 1
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"closed during setup: {exc}"))

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        pos = 0
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            status = buf[: buf.find(b"\r\n")]
            if b" 101 " not in status:
                self.fail(f"upgrade refused: {status.decode(errors='replace')}")
                return
            self.upgraded = True
            pos = end + 4
            if not self.sio:
                self.next_setup()
        size = len(buf)
        while size - pos >= 2:
            b1 = buf[pos + 1]
            n, h = b1 & 0x7F, 2
            if n == 126:
                if size - pos < 4:
                    break
                n, h = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
            elif n == 127:
                if size - pos < 10:
                    break
                n, h = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
            start = pos + h
            end = start + n
            if end > size:
                break
            op = buf[pos] & 0x0F
            pos = end
            if op == 1:
                self.stats.frames += 1
                self.on_text(buf, start, end)
            elif op == 9:
                assert self.transport is not None
                self.transport.write(ws_frame(buf[start:end], 0xA))
            elif op == 8:
                code = int.from_bytes(buf[start : start + 2], "big") if n >= 2 else 1005
                codes = self.stats.close_codes
                codes[code] = codes.get(code, 0) + 1
                if not self.ready.done():
                    self.fail(
                        f"closed with {code}: {buf[start + 2 : end].decode(errors='replace')}"
                    )
        self.buf = buf[pos:] if pos < size else b""

    def fail(self, why: str) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(why))
        if self.transport is not None:
            self.transport.close()

    def next_setup(self) -> None:
        if self.setup:
            self.send(self.setup.pop(0))
        elif not self.ready.done():
            self.ready.set_result(None)

    def on_text(self, buf: bytes, start: int, end: int) -> None:
        if self.sio:
            if buf.startswith(b"42", start):
                self.on_msg(buf, start + 2, end, 1)
                return
            if end - start == 1 and buf[start] == 0x32:  # Engine.IO ping "2"
                self.send(b"3")
                return
        elif buf.find(b'"msg"', start, end) >= 0:
            self.on_msg(buf, start, end, 0)
            return
        if self.ready.done():
            return
        text = buf[start:end]
        if self.sio:
            # "0{...}" open, "40{...}" namespace connected, "431[...]" the join's ack
            if text.startswith(b"44") or text.startswith(b"41"):
                self.fail(f"socket.io refused: {text[:200]!r}")
            else:
                self.next_setup()
        elif b'"ok"' in text:
            self.next_setup()
        else:
            self.fail(f"hub refused: {text[:300].decode(errors='replace')}")

    def on_msg(self, buf: bytes, start: int, end: int, index: int) -> None:
        if not self.counts:
            return
        stats = self.stats
        stats.delivered += 1
        if stats.delivered >= stats.threshold:
            stats.reached.set()
        if self.sampled:
            now = time.perf_counter()
            doc = orjson.loads(buf[start:end])
            data = doc[index] if index else doc["data"]
            if data["i"] >= stats.measure_from:
                stats.latencies.append(now - data["t"])


def setup_frames(proto: str, channel: str, token: str) -> tuple[str, list[bytes]]:
    """(path, frames sent one after each answer) of a subscriber."""
    if proto == "socketio":
        return "/socket.io/?EIO=4&transport=websocket", [
            b"40",
            b"421" + orjson.dumps(["join", channel]),
        ]
    return "/ws", [
        orjson.dumps({"op": "auth", "token": token, "ref": 1}),
        orjson.dumps({"op": "sub", "ch": channel, "ref": 2}),
    ]


def pub_frame(proto: str, channel: str, i: int, stored: bool) -> bytes:
    data = {"t": time.perf_counter(), "i": i}
    if proto == "socketio":
        return b"42" + orjson.dumps(["pub", {"ch": channel, **data}])
    frame: dict[str, Any] = {"op": "pub", "ch": channel, "data": data}
    if stored:
        frame["ref"] = i + 10
    else:
        frame["ephemeral"] = True
    return orjson.dumps(frame)


async def open_clients(
    stats: Stats,
    proto: str,
    host: str,
    port: int,
    channel: str,
    token: str,
    n: int,
    *,
    sample: int = SAMPLE,
    concurrency: int = 200,
    subscribe: bool = True,
) -> list[Client]:
    """`n` connections, each set up (authed and subscribed / joined); raises on any failure."""
    loop = asyncio.get_running_loop()
    # "token" or "token@channel" (a channel of its own for that user's connections)
    tokens = [t.partition("@") for t in token.split(",")]
    setups = [setup_frames(proto, ch or channel, t) for t, _, ch in tokens]
    path = setups[0][0]
    gate = asyncio.Semaphore(concurrency)
    hostport = f"{host}:{port}"

    async def one(k: int) -> Client:
        async with gate:
            frames = setups[k % len(setups)][1]
            if not subscribe:
                frames = frames[:1]
            client = Client(stats, proto, hostport, path, frames, sampled=k % sample == 0)
            for attempt in range(5):
                try:
                    await loop.create_connection(lambda: client, host, port)
                    break
                except OSError:
                    if attempt == 4:
                        raise
                    await asyncio.sleep(0.2 * (attempt + 1))
            await asyncio.wait_for(client.ready, 30)
            return client

    return list(await asyncio.gather(*(one(k) for k in range(n))))


def close_all(clients: list[Client]) -> None:
    for c in clients:
        if c.transport is not None:
            c.transport.abort()


async def quiesce(stats: Stats, limit_s: float = 180.0) -> float:
    """Wait until no frame arrives for 1 s (anything still in flight from the setup);
    the seconds waited."""
    t = time.perf_counter()
    seen = -1
    while stats.frames != seen and time.perf_counter() - t < limit_s:
        seen = stats.frames
        await asyncio.sleep(1.0)
    return time.perf_counter() - t


async def load(args: argparse.Namespace) -> dict[str, Any]:
    """The load generator: connect, warm up, publish for `seconds`, drain; figures as a dict."""
    raise_nofile(args.clients + 1000)
    stats = Stats()
    t = time.perf_counter()
    clients = await open_clients(
        stats, args.proto, args.host, args.port, args.channel, args.token, args.clients
    )
    connect_s = time.perf_counter() - t
    quiet_s = await quiesce(stats)
    pub_path, pub_setup = setup_frames(args.proto, args.channel, args.token.split(",")[0])
    publisher = Client(
        stats,
        args.proto,
        f"{args.host}:{args.port}",
        pub_path,
        pub_setup[:1],  # auth (tenfold) / namespace connect (socket.io), no subscription
        counts=False,
    )
    await asyncio.get_running_loop().create_connection(lambda: publisher, args.host, args.port)
    await asyncio.wait_for(publisher.ready, 30)
    n = args.clients
    stalls = 0
    sent = 0

    async def publish_until(deadline: float) -> None:
        nonlocal sent, stalls
        while time.perf_counter() < deadline:
            need = max(0, sent - args.window + 1) * n
            if stats.delivered < need:
                stats.threshold = need
                stats.reached.clear()
                try:
                    await asyncio.wait_for(stats.reached.wait(), 5)
                except TimeoutError:
                    stalls += 1
            publisher.send(pub_frame(args.proto, args.channel, sent, args.stored))
            sent += 1

    await publish_until(time.perf_counter() + args.warm)
    stats.measure_from = sent
    d0, t0 = stats.delivered, time.perf_counter()
    await publish_until(t0 + args.seconds)
    # the window ends when the messages published in it are delivered (or 10 s pass)
    stats.threshold = sent * n
    stats.reached.clear()
    if stats.delivered < stats.threshold:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stats.reached.wait(), 10)
    t1 = time.perf_counter()
    d1 = stats.delivered
    measured = sent - stats.measure_from
    lat = sorted(stats.latencies)

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else float("nan")

    close_all([*clients, publisher])
    return {
        "clients": n,
        "connect_s": connect_s,
        "text_frames": stats.frames,  # all of the round: setup, presence, messages
        "quiesce_s": quiet_s,
        "messages": measured,
        "seconds": t1 - t0,
        "deliveries": d1 - d0,
        "deliveries_per_s": (d1 - d0) / (t1 - t0),
        "messages_per_s": measured / (t1 - t0),
        "lost": sent * n - d1,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "max_ms": lat[-1] * 1000 if lat else float("nan"),
        "latency_samples": len(lat),
        "stalls": stalls,
        "closed_by_server": dict(stats.close_codes),
    }


def load_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.realtime_fanout load")
    p.add_argument("--proto", choices=("tenfold", "socketio"), required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--channel", required=True)
    p.add_argument("--clients", type=int, default=CLIENTS)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--warm", type=float, default=3.0)
    p.add_argument("--window", type=int, default=WINDOW)
    p.add_argument("--stored", action="store_true", help="tenfold: stored pub (with offsets)")
    args = p.parse_args(argv)
    args.token = sys.stdin.readline().strip()  # the access tokens: not on the command line
    import uvloop

    result = uvloop.run(load(args))
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


def run_load(proto: str, url: str, channel: str, token: str, **opts: Any) -> dict[str, Any]:
    """One load-generator process against `url` (the tokens on its stdin); its figures."""
    port = url.rsplit(":", 1)[1]
    cmd = [sys.executable, "-m", "benchmarks.realtime_fanout", "load", "--proto", proto]
    cmd += ["--port", port, "--channel", channel]
    for k, v in opts.items():
        if v is True:
            cmd.append(f"--{k}")
        elif v is not False:
            cmd += [f"--{k}", str(v)]
    done = subprocess.run(
        cmd,
        input=token + "\n",
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=Path(__file__).parent.parent,
    )
    if done.returncode != 0:
        raise RuntimeError(f"load generator ({proto}) failed: {done.stderr.strip()[-1500:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


# --------------------------------------------------------------------------- harness


def arena_users(url: str, clients: int, own_rooms: bool = False) -> tuple[str, str]:
    """Arena users for `clients` connections (CONNS_PER_USER each), all members of one
    room: (comma-separated access tokens, room id). With `own_rooms`, every user
    creates a room of their own instead and the tokens read "token@room:<id>"."""
    from benchmarks.gateway_overhead import arena_room

    owner, room = arena_room(url)
    count = max(1, -(-clients // CONNS_PER_USER)) - 1
    stamp = f"rt{os.getpid()}{int(time.time() * 1000) % 10**8}"

    async def one(c: Any, gate: asyncio.Semaphore, i: int) -> str:
        creds = {"username": f"{stamp}u{i}", "password": "bench-password-1"}
        async with gate:
            await post(c, "/auth/register", json=creds)
            token = (await post(c, "/auth/login", json=creds)).json()["access_token"]
            auth = {"Authorization": f"Bearer {token}"}
            if own_rooms:
                mine = (await post(c, "/rooms", json={"name": "bench"}, headers=auth)).json()
                return f"{token}@room:{mine['id']}"
            await post(c, f"/rooms/{room}/join", headers=auth)
        return str(token)

    async def post(c: Any, path: str, **kw: Any) -> Any:
        for _ in range(20):  # 503 / 429 under the other engineers' load: try again
            r = await c.post(path, **kw)
            if r.status_code not in (429, 503):
                break
            await asyncio.sleep(0.2)
        r.raise_for_status()
        return r

    async def all_users() -> list[str]:
        import httpx

        gate = asyncio.Semaphore(8)
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            return list(await asyncio.gather(*(one(c, gate, i) for i in range(count))))

    first = f"{owner}@room:{room}" if own_rooms else owner
    return ",".join([first, *asyncio.run(all_users())]), room


def wait_idle(limit_s: float = 60.0) -> float:
    """Wait until this process's descendants (both servers' workers, NATS) use < 25% of a
    core over 1 s (arena's relay and consumers poll in the background): the hub's
    presence `leave` frames after a round's clients went away must not run into the
    next side's round. The seconds waited (at most `limit_s`)."""
    tick = os.sysconf("SC_CLK_TCK")
    t = time.monotonic()

    def cpu() -> float:
        total = 0
        for pid in descendants(os.getpid()):
            with contextlib.suppress(OSError, IndexError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
        return total / tick

    before = cpu()
    while time.monotonic() - t < limit_s:
        time.sleep(1.0)
        now = cpu()
        if now - before < 0.25:
            break
        before = now
    return time.monotonic() - t


def descendants(root: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                stat = entry.joinpath("stat").read_text().rsplit(") ", 1)[1].split()
                parents[int(entry.name)] = int(stat[1])
    out, frontier = [], {root}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier}
        out.extend(frontier)
    return out


def hub_env(env: dict[str, str]) -> dict[str, str]:
    """`env` with the hub's per-user connection and per-connection publish limits raised
    (and admission control off)."""
    return {**env, **HUB_LIMITS}


@contextlib.contextmanager
def peer_env(env: dict[str, str]) -> Iterator[dict[str, str]]:
    """`env` for the socket.io peer: Redis manager on a channel of this run; checks Redis."""
    import redis

    url = os.environ.get("TENFOLD_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
    redis.Redis.from_url(url, socket_timeout=2).ping()
    yield {**env, "SOCKETIO_REDIS_URL": url, "SOCKETIO_REDIS_CHANNEL": f"tfbench-{os.getpid()}"}


def preflight() -> str | None:
    """Why the realtime benchmarks cannot run here, or None."""
    import socket
    from urllib.parse import urlsplit

    from benchmarks._nats import ADMIN_URL

    pg = urlsplit(ADMIN_URL)
    try:
        with socket.create_connection((pg.hostname or "127.0.0.1", pg.port or 5432), timeout=2):
            pass
    except OSError as exc:
        return f"no PostgreSQL at {ADMIN_URL}: {exc}"
    try:
        import socketio  # noqa: F401
    except ImportError:
        return "python-socketio is not installed (pip install 'tenfold[bench]')"
    try:
        import redis

        url = os.environ.get("TENFOLD_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
        redis.Redis.from_url(url, socket_timeout=2).ping()
    except Exception as exc:
        return f"no Redis for the socket.io peer's AsyncRedisManager: {exc}"
    if importlib.util.find_spec("tenfold.realtime") is None:
        return "tenfold's realtime hub (tenfold.realtime) is not there yet"
    return None


def run(quick: bool, clients: int | None = None) -> dict[str, Any]:
    from benchmarks.gateway_overhead import server
    from benchmarks.servers import services_env

    problem = preflight()
    if problem:
        console.print(f"realtime_fanout: skipped, {problem}")
        return {"skipped": True, "reason": problem}
    n = (
        clients
        or int(os.environ.get("TENFOLD_BENCH_FANOUT_CLIENTS", 0))
        or (QUICK_CLIENTS if quick else CLIENTS)
    )
    rounds, seconds, warm = (1, 4.0, 2.0) if quick else (3, 10.0, 3.0)
    work = Path(tempfile.mkdtemp(prefix="tfbench-rt-"))
    load_avg = os.getloadavg()[0]
    samples: dict[str, list[dict[str, Any]]] = {PEER: [], SUBJECT: []}
    try:
        with (
            services_env(work) as env,
            peer_env(env) as penv,
            server("arena", hub_env(env), workers=2, logdir=work) as hub,
            server("benchmarks.socketio_peer:create_app", penv, workers=2, logdir=work) as sio,
        ):
            token, room = arena_users(hub, n)
            sides = {
                PEER: ("socketio", sio, "room-bench", ""),
                SUBJECT: ("tenfold", hub, f"room:{room}", token),
            }
            for i in range(rounds):
                for name, (proto, url, channel, tok) in sides.items():
                    s = run_load(proto, url, channel, tok, clients=n, seconds=seconds, warm=warm)
                    s["idle_wait_s"] = wait_idle()
                    samples[name].append(s)
                    console.print(
                        f"  round {i + 1} {name}: {rate(s['deliveries_per_s'])} deliveries/s "
                        f"({s['messages_per_s']:.1f} msg/s), p99 {s['p99_ms']:.0f} ms, "
                        f"lost {s['lost']}, connect {s['connect_s']:.1f} s"
                        + (f", closed {s['closed_by_server']}" if s["closed_by_server"] else ""),
                        highlight=False,
                    )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {
        name: {
            k: median([r[k] for r in runs])
            for k in ("deliveries_per_s", "messages_per_s", "p50_ms", "p99_ms", "connect_s")
        }
        for name, runs in samples.items()
    }
    ratio = med[SUBJECT]["deliveries_per_s"] / med[PEER]["deliveries_per_s"]
    return {
        "skipped": False,
        "clients": n,
        "workers": 2,
        "window_messages": WINDOW,
        "latency_sample": f"1 client in {SAMPLE}",
        "seconds_per_round": seconds,
        "rounds": rounds,
        "loadavg_1m_at_start": load_avg,
        "medians": med,
        "rounds_detail": samples,
        "ratio_deliveries": ratio,
        "ratio_p99": med[SUBJECT]["p99_ms"] / med[PEER]["p99_ms"],
        "goal_ratio": GOAL_RATIO,
        "goal_met": ratio >= GOAL_RATIO,
    }


def render(result: dict[str, Any]) -> Table | None:
    if result["skipped"]:
        return None
    table = Table(
        title=f"fan-out: {result['clients']:,} clients on one channel, 2 workers, "
        f"median of {result['rounds']} rounds",
        caption=f"tenfold / socket.io deliveries/s = {result['ratio_deliveries']:.2f}x "
        f"(goal ≥ {result['goal_ratio']:g}x: {'met' if result['goal_met'] else 'NOT met'})",
    )
    for col in ("side", "deliveries/s", "msg/s", "p50 ms", "p99 ms", "connect s"):
        table.add_column(col, justify="left" if col == "side" else "right", no_wrap=True)
    for name, m in result["medians"].items():
        table.add_row(
            name,
            rate(m["deliveries_per_s"]),
            f"{m['messages_per_s']:.1f}",
            f"{m['p50_ms']:.0f}",
            f"{m['p99_ms']:.0f}",
            f"{m['connect_s']:.1f}",
        )
    return table


def goal_lines(result: dict[str, Any]) -> list[str]:
    if result.get("skipped"):
        return [f"fan-out ≥ 3x python-socketio: not measured ({result['reason']})"]
    met = "met" if result["goal_met"] else "NOT met"
    m = result["medians"]
    return [
        f"fan-out {result['clients']:,} clients, 2 workers, ≥ {result['goal_ratio']:g}x "
        f"python-socketio deliveries/s: {met} ({result['ratio_deliveries']:.2f}x; "
        f"{rate(m[SUBJECT]['deliveries_per_s'])}/s vs {rate(m[PEER]['deliveries_per_s'])}/s, "
        f"p99 {m[SUBJECT]['p99_ms']:.0f} vs {m[PEER]['p99_ms']:.0f} ms)"
    ]


if __name__ == "__main__":
    if sys.argv[1:2] == ["load"]:
        raise SystemExit(load_main(sys.argv[2:]))
    raise SystemExit(run_main("realtime_fanout", __doc__ or "", run, render))
