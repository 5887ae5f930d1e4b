// arena chat: plain JavaScript, no framework, no build step.
//
// HTTP (docs/arena.md) for accounts, rooms and message history and sending;
// the WebSocket hub at /ws (docs/realtime.md) for live messages, presence and
// typing. All user text goes into the page through textContent, never innerHTML.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const TYPING_EVERY_MS = 2000; // at most one typing frame per this interval
  const TYPING_SHOWN_MS = 4000; // how long a typing hint stays without a new frame
  const PING_EVERY_MS = 25000;
  const BACKOFF_MIN_MS = 250;
  const BACKOFF_MAX_MS = 10000;

  const state = {
    access: null,
    refresh: null,
    username: null,
    userId: null,
    room: null, // {id, name}
    messageIds: new Set(), // ids rendered in the current room
    presence: new Map(), // user id -> name
    typing: new Map(), // name -> timer
    lastTypingSent: 0,
  };

  // ---------- small helpers ----------

  function showError(text) {
    const el = $("error");
    if (!text) {
      el.hidden = true;
      el.textContent = "";
      return;
    }
    el.textContent = text;
    el.hidden = false;
  }

  function newKey() {
    if (window.crypto && typeof crypto.randomUUID === "function") return crypto.randomUUID();
    // randomUUID needs a secure context; getRandomValues does not.
    const bytes = new Uint8Array(16);
    crypto.getRandomValues(bytes);
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  function jwtClaims(token) {
    try {
      const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
      const padded = part + "===".slice((part.length + 3) % 4);
      return JSON.parse(atob(padded));
    } catch (e) {
      return {};
    }
  }

  function compareIds(a, b) {
    // 63-bit ids travel as decimal strings: compare them as BigInt.
    const x = BigInt(a);
    const y = BigInt(b);
    return x < y ? -1 : x > y ? 1 : 0;
  }

  function sleep(ms) {
    return new Promise((resolve) => setTimeout(resolve, ms));
  }

  // ---------- tokens (sessionStorage: per tab, gone when it closes) ----------

  function saveTokens(tokens, username) {
    state.access = tokens.access_token;
    state.refresh = tokens.refresh_token;
    const claims = jwtClaims(state.access);
    state.userId = claims.sub ? String(claims.sub) : null;
    state.username = claims.name || username || state.username;
    sessionStorage.setItem(
      "arena.session",
      JSON.stringify({ access: state.access, refresh: state.refresh, username: state.username })
    );
  }

  function loadTokens() {
    try {
      const s = JSON.parse(sessionStorage.getItem("arena.session") || "null");
      if (!s || !s.access) return false;
      state.access = s.access;
      state.refresh = s.refresh;
      state.username = s.username;
      state.userId = String(jwtClaims(s.access).sub || "") || null;
      return true;
    } catch (e) {
      return false;
    }
  }

  function clearTokens() {
    state.access = state.refresh = state.username = state.userId = null;
    sessionStorage.removeItem("arena.session");
  }

  // ---------- HTTP ----------

  class ApiError extends Error {
    constructor(status, detail) {
      super(detail);
      this.status = status;
    }
  }

  let refreshing = null;

  async function refreshTokens() {
    if (!state.refresh) return false;
    if (!refreshing) {
      refreshing = (async () => {
        try {
          const r = await fetch("/auth/refresh", {
            method: "POST",
            headers: { "content-type": "application/json" },
            body: JSON.stringify({ refresh_token: state.refresh }),
          });
          if (!r.ok) return false;
          saveTokens(await r.json(), state.username);
          return true;
        } catch (e) {
          return false;
        } finally {
          setTimeout(() => (refreshing = null), 0);
        }
      })();
    }
    return refreshing;
  }

  async function api(method, path, body, extraHeaders, retried) {
    const headers = Object.assign({}, extraHeaders || {});
    if (body !== undefined) headers["content-type"] = "application/json";
    if (state.access) headers["authorization"] = "Bearer " + state.access;
    const r = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (r.status === 401 && state.access && !retried && (await refreshTokens())) {
      return api(method, path, body, extraHeaders, true);
    }
    if (r.status === 204) return null;
    let data = null;
    try {
      data = await r.json();
    } catch (e) {
      data = null;
    }
    if (!r.ok) {
      let detail = (data && (data.detail || data.title)) || r.statusText;
      if (Array.isArray(detail)) detail = detail.map((d) => d.msg || String(d)).join("; ");
      if (typeof detail !== "string") detail = JSON.stringify(detail);
      throw new ApiError(r.status, `${r.status}: ${detail}`);
    }
    return data;
  }

  // ---------- accounts ----------

  function credentials() {
    return { username: $("username").value.trim(), password: $("password").value };
  }

  async function register() {
    showError(null);
    try {
      const user = await api("POST", "/auth/register", credentials());
      $("auth-status").textContent = `Registered ${user.username}; now log in.`;
      $("auth-status").dataset.state = "registered";
    } catch (e) {
      showError("Register failed: " + e.message);
    }
  }

  async function login(ev) {
    if (ev) ev.preventDefault();
    showError(null);
    const creds = credentials();
    try {
      const tokens = await api("POST", "/auth/login", creds);
      saveTokens(tokens, creds.username.toLowerCase());
      $("password").value = "";
      enterApp();
    } catch (e) {
      showError("Log in failed: " + e.message);
    }
  }

  async function logout() {
    const refresh = state.refresh;
    hub.stop();
    if (refresh) {
      try {
        await api("POST", "/auth/logout", { refresh_token: refresh });
      } catch (e) {
        /* the session ends here either way */
      }
    }
    clearTokens();
    state.room = null;
    $("app").hidden = true;
    $("chat").hidden = true;
    $("auth").hidden = false;
    $("me").hidden = true;
    $("logout-btn").hidden = true;
    $("auth-status").textContent = "";
  }

  function enterApp() {
    $("auth").hidden = true;
    $("app").hidden = false;
    $("me").textContent = state.username || "";
    $("me").hidden = false;
    $("logout-btn").hidden = false;
    hub.start();
    loadRooms();
  }

  // ---------- rooms ----------

  async function loadRooms() {
    try {
      const page = await api("GET", "/rooms/mine");
      renderRooms(page.items);
    } catch (e) {
      showError("Could not list your rooms: " + e.message);
    }
  }

  function renderRooms(items) {
    const list = $("rooms-list");
    list.replaceChildren();
    for (const room of items) addRoomToList(room);
  }

  function addRoomToList(room) {
    const list = $("rooms-list");
    if (list.querySelector(`li[data-room-id="${CSS.escape(room.id)}"]`)) return;
    const li = document.createElement("li");
    li.dataset.roomId = room.id;
    li.dataset.testid = "room-item";
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = room.name;
    button.title = "room " + room.id;
    button.addEventListener("click", () => openRoom(room));
    li.append(button);
    list.append(li);
  }

  async function createRoom(ev) {
    ev.preventDefault();
    showError(null);
    try {
      const room = await api("POST", "/rooms", { name: $("room-name").value.trim() });
      $("room-name").value = "";
      addRoomToList(room);
      openRoom(room);
    } catch (e) {
      showError("Could not create the room: " + e.message);
    }
  }

  async function joinRoom(ev) {
    ev.preventDefault();
    showError(null);
    const id = $("join-room-id").value.trim();
    try {
      const room = await api("POST", `/rooms/${encodeURIComponent(id)}/join`);
      $("join-room-id").value = "";
      addRoomToList(room);
      openRoom(room);
    } catch (e) {
      showError("Could not join the room: " + e.message);
    }
  }

  function openRoom(room) {
    const previous = state.room;
    if (previous && previous.id === room.id) return;
    if (previous) hub.unsubscribe("room:" + previous.id);
    state.room = { id: room.id, name: room.name };
    state.messageIds = new Set();
    state.presence = new Map();
    for (const t of state.typing.values()) clearTimeout(t);
    state.typing = new Map();
    $("messages").replaceChildren();
    $("presence").replaceChildren();
    $("typing").textContent = "";
    $("room-title").textContent = room.name;
    $("room-id").textContent = room.id;
    $("chat").hidden = false;
    $("chat").dataset.roomId = room.id;
    for (const li of $("rooms-list").children) {
      li.classList.toggle("current", li.dataset.roomId === room.id);
    }
    loadHistory();
    hub.subscribe("room:" + room.id);
  }

  // ---------- messages ----------

  async function loadHistory() {
    const room = state.room;
    if (!room) return;
    try {
      const page = await api("GET", `/rooms/${encodeURIComponent(room.id)}/messages?limit=50`);
      if (state.room !== room) return; // switched rooms meanwhile
      for (const m of page.items) renderMessage(m, "http");
    } catch (e) {
      showError("Could not load the messages: " + e.message);
    }
  }

  function renderMessage(m, source) {
    if (!m || m.id === undefined || m.id === null || typeof m.body !== "string") return;
    const id = String(m.id);
    if (state.messageIds.has(id)) return; // already shown (HTTP and live overlap)
    state.messageIds.add(id);
    const li = document.createElement("li");
    li.className = "message";
    li.dataset.testid = "message";
    li.dataset.messageId = id;
    li.dataset.source = source;
    if (m.author === state.username) li.classList.add("mine");
    const author = document.createElement("span");
    author.className = "author";
    author.textContent = m.author || "?";
    const time = document.createElement("time");
    if (typeof m.created_at === "number") {
      const d = new Date(m.created_at * 1000);
      time.dateTime = d.toISOString();
      time.textContent = d.toLocaleTimeString();
    }
    const body = document.createElement("span");
    body.className = "body";
    body.textContent = m.body;
    li.append(author, time, body);
    // Keep the list in id order (ids grow with time); live messages usually go last.
    const list = $("messages");
    let before = null;
    for (let node = list.lastElementChild; node; node = node.previousElementSibling) {
      if (compareIds(node.dataset.messageId, id) < 0) break;
      before = node;
    }
    list.insertBefore(li, before);
    if (!before) list.scrollTop = list.scrollHeight;
  }

  async function sendMessage(ev) {
    ev.preventDefault();
    showError(null);
    const room = state.room;
    const input = $("message-input");
    const body = input.value;
    if (!room || !body) return;
    const key = newKey(); // the same key on a retry: the server answers with the original
    input.value = "";
    for (let attempt = 0; ; attempt++) {
      try {
        const m = await api("POST", `/rooms/${encodeURIComponent(room.id)}/messages`, { body }, {
          "Idempotency-Key": key,
        });
        if (state.room === room) renderMessage(m, "sent");
        return;
      } catch (e) {
        const transient = !(e instanceof ApiError) || e.status === 503 || e.status === 429;
        if (!transient || attempt >= 3) {
          if (!input.value) input.value = body;
          showError("Could not send: " + e.message);
          return;
        }
        await sleep(300 * 2 ** attempt);
      }
    }
  }

  // ---------- presence and typing ----------

  function renderPresence() {
    const list = $("presence");
    list.replaceChildren();
    const entries = [...state.presence.entries()].sort((a, b) => a[1].localeCompare(b[1]));
    for (const [user, name] of entries) {
      const li = document.createElement("li");
      li.dataset.testid = "presence-member";
      li.dataset.user = user;
      li.dataset.name = name;
      li.textContent = name;
      if (user === state.userId) li.classList.add("me");
      list.append(li);
    }
  }

  function renderTyping() {
    const names = [...state.typing.keys()];
    $("typing").textContent = names.length
      ? names.join(", ") + (names.length === 1 ? " is typing…" : " are typing…")
      : "";
  }

  function someoneTyping(name) {
    if (!name || name === state.username) return;
    clearTimeout(state.typing.get(name));
    state.typing.set(
      name,
      setTimeout(() => {
        state.typing.delete(name);
        renderTyping();
      }, TYPING_SHOWN_MS)
    );
    renderTyping();
  }

  function onInput() {
    const now = Date.now();
    if (!state.room || now - state.lastTypingSent < TYPING_EVERY_MS) return;
    state.lastTypingSent = now;
    hub.send({
      op: "pub",
      ch: "room:" + state.room.id,
      data: { type: "typing", name: state.username, user: state.userId },
      ephemeral: true,
    });
  }

  // ---------- the WebSocket hub ----------

  const hub = (() => {
    let ws = null;
    let wanted = false; // reconnect after a drop while true
    let authed = false;
    let attempts = 0;
    let nextRef = 1;
    let pinger = null;
    let retryTimer = null;
    const pending = new Map(); // ref -> handler(frame)
    const positions = new Map(); // channel -> {epoch, offset} (recovery positions)
    let channel = null; // the one channel this page wants

    function setStatus(s) {
      const el = $("ws-status");
      el.dataset.state = s;
      el.textContent = {
        connecting: "connecting…",
        open: "online",
        subscribed: "live",
        closed: "offline",
      }[s] || s;
    }

    function send(frame, onAnswer) {
      if (!ws || ws.readyState !== WebSocket.OPEN || (!authed && frame.op !== "auth")) return false;
      if (onAnswer) {
        frame.ref = nextRef++;
        pending.set(frame.ref, onAnswer);
      }
      ws.send(JSON.stringify(frame));
      return true;
    }

    function start() {
      wanted = true;
      if (!ws) connect();
    }

    function stop() {
      wanted = false;
      clearTimeout(retryTimer);
      if (ws) ws.close(1000, "bye");
      ws = null;
      channel = null;
      setStatus("closed");
    }

    // Drop the connection and stay offline until resume() (tests use it to miss messages).
    function pause() {
      wanted = false;
      clearTimeout(retryTimer);
      if (ws) ws.close(1000, "paused");
    }

    function resume() {
      wanted = true;
      attempts = 0;
      if (!ws) connect();
    }

    function connect() {
      clearTimeout(retryTimer);
      if (!state.access) return;
      setStatus("connecting");
      const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws";
      const sock = new WebSocket(url);
      ws = sock;
      authed = false;
      pending.clear();
      sock.addEventListener("open", () => {
        send({ op: "auth", token: state.access }, (f) => {
          if (f.op !== "ok") return;
          authed = true;
          attempts = 0;
          setStatus("open");
          if (channel) doSubscribe(channel);
        });
      });
      sock.addEventListener("message", (ev) => {
        let frame;
        try {
          frame = JSON.parse(ev.data);
        } catch (e) {
          return;
        }
        onFrame(frame);
      });
      sock.addEventListener("close", (ev) => {
        if (ws !== sock) return;
        ws = null;
        authed = false;
        clearInterval(pinger);
        setStatus("closed");
        if (!wanted) return;
        if (ev.code === 4001) {
          // Not authenticated: most likely an expired access token.
          refreshTokens().then((ok) => (ok ? scheduleReconnect() : logout()));
          return;
        }
        scheduleReconnect();
      });
      clearInterval(pinger);
      pinger = setInterval(() => send({ op: "ping" }, () => {}), PING_EVERY_MS);
    }

    function scheduleReconnect() {
      const ceiling = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** attempts);
      attempts++;
      const delay = ceiling / 2 + Math.random() * (ceiling / 2); // jittered
      clearTimeout(retryTimer);
      retryTimer = setTimeout(() => {
        if (wanted && !ws) connect();
      }, delay);
    }

    function subscribe(ch) {
      channel = ch;
      if (authed) doSubscribe(ch);
    }

    function unsubscribe(ch) {
      if (channel === ch) channel = null;
      positions.delete(ch);
      send({ op: "unsub", ch }, () => {});
      setStatus(ws && authed ? "open" : "closed");
    }

    function doSubscribe(ch) {
      const since = positions.get(ch);
      const frame = { op: "sub", ch, join_leave: true };
      if (since) frame.since = { epoch: since.epoch, offset: since.offset };
      send(frame, (f) => {
        if (ch !== channel) return;
        if (f.op === "error") {
          showError(`Live updates unavailable (${f.code}): ${f.message || ""}`);
          return;
        }
        positions.set(ch, { epoch: f.epoch, offset: f.offset });
        setStatus("subscribed");
        $("chat").dataset.subscribed = ch;
        $("chat").dataset.recovered = since ? String(f.recovered === true) : "";
        // Without a recovery, messages may have been missed: resync over HTTP.
        if (!(since && f.recovered === true)) loadHistory();
        requestPresence(ch);
      });
    }

    function requestPresence(ch) {
      send({ op: "presence", ch }, (p) => {
        if (ch !== channel || p.op !== "presence") return;
        state.presence = new Map();
        for (const m of p.members || []) state.presence.set(String(m.user), m.name || String(m.user));
        renderPresence();
      });
    }

    function onFrame(f) {
      if (f.ref !== undefined && pending.has(f.ref)) {
        const handler = pending.get(f.ref);
        pending.delete(f.ref);
        handler(f);
        return;
      }
      if (f.op === "error") {
        showError(`Realtime error (${f.code}): ${f.message || ""}`);
        return;
      }
      if (!f.ch || f.ch !== channel) return;
      if (f.op === "msg") {
        const data = f.data || {};
        if (!f.ephemeral && typeof f.offset === "number") {
          const pos = positions.get(f.ch);
          if (pos && (pos.epoch === f.epoch || !pos.epoch)) {
            pos.offset = Math.max(pos.offset || 0, f.offset);
          } else {
            positions.set(f.ch, { epoch: f.epoch, offset: f.offset });
          }
        }
        if (data.type === "typing") {
          someoneTyping(data.name || data.user);
          return;
        }
        renderMessage(data.message || data, "live");
        if (data.author) {
          // Whoever spoke is no longer typing.
          clearTimeout(state.typing.get(data.author));
          state.typing.delete(data.author);
          renderTyping();
        }
      } else if (f.op === "join") {
        for (const u of f.users || []) state.presence.set(String(u.user), u.name || String(u.user));
        renderPresence();
      } else if (f.op === "leave") {
        // A leave means the user's last connection to the room went away.
        for (const u of f.users || []) state.presence.delete(String(u.user));
        renderPresence();
      }
    }

    return { start, stop, send, subscribe, unsubscribe, pause, resume };
  })();

  // ---------- wiring ----------

  // For tests and the console: drop the live connection, then reconnect from the last position.
  window.arenaChat = Object.freeze({ pause: hub.pause, resume: hub.resume });

  document.addEventListener("DOMContentLoaded", () => {
    $("auth-form").addEventListener("submit", login);
    $("register-btn").addEventListener("click", register);
    $("logout-btn").addEventListener("click", logout);
    $("create-room-form").addEventListener("submit", createRoom);
    $("join-room-form").addEventListener("submit", joinRoom);
    $("refresh-rooms-btn").addEventListener("click", loadRooms);
    $("send-form").addEventListener("submit", sendMessage);
    $("message-input").addEventListener("input", onInput);
    $("reload-history-btn").addEventListener("click", loadHistory);
    document.body.dataset.ready = "true";
    if (loadTokens()) enterApp();
  });
})();
