// pgpubsub-client: the JavaScript client of `pgpubsub serve`.
//
// One file, no dependencies, an ES module: browsers import it from the
// gateway itself (`import { connect } from "/client.js"`), Node >= 20 from
// npm. Types: client.d.ts beside it. The wire protocol it speaks is the
// gateway's (README "Over HTTP"); this file adds what every application
// would otherwise write again: resume from the last position after any
// drop, drop the events a resume repeats, backoff with jitter, token
// refresh, typed errors, and the store's routes as functions.

const DEFAULTS = {
  backoffMin: 250, // ms before the first retry (then doubling, with jitter)
  backoffMax: 10_000, // ms, the longest wait between two attempts
  connectTimeout: 10_000, // ms for a connection to be subscribed
  idleTimeout: 45_000, // ms without a byte, either transport, before the connection is taken as dead (the server sends a heartbeat every 15 s)
  maxRemembered: 100_000, // delivered events remembered above the position, for duplicate detection
};

// ---------------------------------------------------------------- errors

/** Every error this client raises. `status`: the HTTP status or WebSocket close code, when there was one. */
export class PgPubSubError extends Error {
  constructor(message, { status, cause } = {}) {
    super(message, cause === undefined ? undefined : { cause });
    this.name = new.target.name;
    this.status = status;
  }
}

/** No valid token: HTTP 401, WebSocket close 4401 (refused or expired, after one refresh). */
export class AuthError extends PgPubSubError {}

/** The request itself was refused (HTTP 400 or 403, WebSocket close 4400): retrying cannot help. */
export class RefusedError extends PgPubSubError {}

/** A store write's expected version was not the current one (HTTP 409). */
export class ConflictError extends PgPubSubError {}

// --------------------------------------------------------------- cursors

/**
 * `"txid:seq"` as two BigInts, or null. After a shape's snapshot a position
 * may carry its hand-over (`"txid:seq~xmin:xmax:xip~until"`): ordered by
 * its `txid:seq`, sent back whole.
 */
function parseCursor(text) {
  const m = typeof text === "string" ? /^(\d+):(\d+)(?:~\d+:\d+:[\d,]*~\d+)?$/.exec(text) : null;
  return m ? [BigInt(m[1]), BigInt(m[2])] : null;
}

function cmp(a, b) {
  if (a[0] !== b[0]) return a[0] < b[0] ? -1 : 1;
  if (a[1] !== b[1]) return a[1] < b[1] ? -1 : 1;
  return 0;
}

/**
 * Orders two resume positions (`"txid:seq"`): negative, zero or positive.
 * @param {string} a @param {string} b
 */
export function compareCursors(a, b) {
  const x = parseCursor(a), y = parseCursor(b);
  if (!x || !y) throw new TypeError(`not a position: ${!x ? a : b}`);
  return cmp(x, y);
}

// ----------------------------------------------------------------- client

/**
 * A client of the gateway at `url` (in a page, the page's own origin when omitted).
 * @param {string} [url]
 * @param {import("./client.js").ConnectOptions} [options]
 */
export function connect(url, options = {}) {
  return new Client(url, options);
}

export class Client {
  #base;
  #options;
  #subs = new Set();
  #stateListeners = new Set();

  constructor(url, options = {}) {
    const origin = url ?? globalThis.location?.origin;
    if (!origin) throw new TypeError("connect(url): the gateway's URL, e.g. http://127.0.0.1:8080");
    const base = new URL(origin, globalThis.location?.href);
    this.#base = base.origin + base.pathname.replace(/\/+$/, "");
    this.#options = { ...DEFAULTS, ...options };
    const fetch = this.#options.fetch ?? globalThis.fetch;
    if (typeof fetch !== "function") throw new TypeError("no fetch: Node >= 20 or a browser, or pass options.fetch");
    this.#options.fetch = fetch.bind(globalThis);
    if (this.#options.transport === "websocket" && !(this.#options.WebSocket ?? globalThis.WebSocket)) {
      throw new TypeError("transport websocket: no WebSocket here; pass options.WebSocket (the ws package)");
    }
  }

  /** The gateway's URL, without a trailing slash. */
  get url() {
    return this.#base;
  }

  /**
   * Subscribes: `onEvent(event, { id, position })` gets each event once, in order.
   * @param {import("./client.js").SubscribeRequest} request
   */
  subscribe(request, onEvent, handlers = {}) {
    if (typeof onEvent !== "function") throw new TypeError("subscribe(request, onEvent): onEvent must be a function");
    const sub = new Subscription(this, this.#options, request ?? {}, onEvent, handlers, {
      state: (state, detail) => {
        for (const fn of this.#stateListeners) safely(fn, state, sub, detail);
      },
      gone: () => this.#subs.delete(sub),
    });
    this.#subs.add(sub);
    return sub;
  }

  /** Every subscription's state changes: `fn(state, subscription, detail)`. Returns the function that stops it. */
  onState(fn) {
    this.#stateListeners.add(fn);
    return () => this.#stateListeners.delete(fn);
  }

  /**
   * Publishes a message: a string as it is, anything else as JSON text.
   * @returns {Promise<{seq: number}>}
   */
  async publish(channel, message) {
    const text = typeof message === "string" ? message : JSON.stringify(message);
    if (text === undefined) throw new TypeError("publish: nothing to send");
    const type = typeof message === "string" ? "text/plain; charset=utf-8" : "application/json";
    const res = await this.request("POST", `/publish/${encodeURIComponent(channel)}`, { body: text, type });
    return expectOk(res);
  }

  /**
   * A live collection of a table's rows: `shape.rows` (a Map of key → row)
   * holds the rows that match `where` (a filter, text or JSON form), with
   * `columns`, first from a snapshot, then kept in step by every change,
   * with none missed or applied twice, across reconnects.
   * @param {import("./client.js").ShapeRequest} request
   * @param {import("./client.js").ShapeHandlers} [handlers]
   */
  shape(request, handlers = {}) {
    return new Shape(this, request, handlers);
  }

  /** The event-sourced store's bucket `bucket`. */
  store(bucket) {
    return new Store(this, bucket);
  }

  /** Closes every subscription. */
  close() {
    for (const sub of [...this.#subs]) sub.close();
  }

  /** @internal The token for a (re)connect or request; `refresh` after a refusal or expiry. */
  async token(refresh) {
    const t = this.#options.token;
    const value = typeof t === "function" ? await t({ refresh }) : t;
    if (value != null && typeof value !== "string") throw new TypeError("the token must be a string");
    return value ?? undefined;
  }

  /** @internal A request to the gateway, with the token; a 401 asks the token function once more. */
  async request(method, path, { body, type, headers: extra } = {}) {
    const refreshable = typeof this.#options.token === "function";
    for (let attempt = 0; ; attempt++) {
      const token = await this.token(attempt > 0);
      const headers = { accept: "application/json", ...extra };
      if (type) headers["content-type"] = type;
      if (token) headers.authorization = `Bearer ${token}`;
      let res;
      try {
        res = await this.#options.fetch(this.#base + path, { method, headers, body });
      } catch (e) {
        throw new PgPubSubError(`${method} ${path}: ${e.message}`, { cause: e });
      }
      if (res.status === 401 && refreshable && attempt === 0) continue;
      return res;
    }
  }

  /** @internal */
  wsUrl() {
    return this.#base.replace(/^http/, "ws") + "/ws";
  }

  /** @internal */
  sseUrl(query) {
    return `${this.#base}/events?${query}`;
  }
}

/** The JSON of a 2xx response, or the error its status means. */
async function expectOk(res) {
  if (res.ok) return res.json();
  throw await failure(res);
}

async function failure(res) {
  let message = `${res.status} ${res.statusText}`;
  try {
    const body = await res.json();
    if (body && typeof body.error === "string") message = body.error;
  } catch {
    // not JSON: the status says it
  }
  const Kind =
    res.status === 401
      ? AuthError
      : res.status === 400 || res.status === 403
        ? RefusedError
        : res.status === 409
          ? ConflictError
          : PgPubSubError;
  return new Kind(message, { status: res.status });
}

/** Calls a listener; what it throws is logged, never thrown into the client's own loop. */
function safely(fn, ...args) {
  try {
    fn(...args);
  } catch (e) {
    console.error("pgpubsub-client: a listener threw", e);
  }
}

// ------------------------------------------------------------------ store

/** One bucket of the event-sourced store (`/store/{bucket}/{id}`). */
export class Store {
  #client;
  #bucket;

  constructor(client, bucket) {
    this.#client = client;
    this.#bucket = bucket;
  }

  #path(id, tail = "") {
    return `/store/${encodeURIComponent(this.#bucket)}/${encodeURIComponent(id)}${tail}`;
  }

  /**
   * Writes a new version. With `expected`, only if that is the current
   * version (0: only if it does not exist); ConflictError otherwise.
   * @returns {Promise<{version: number}>}
   */
  async put(id, value, { expected } = {}) {
    const body = JSON.stringify(value);
    if (body === undefined) throw new TypeError("put: the value must be JSON");
    const headers = {};
    if (expected !== undefined) {
      if (!Number.isInteger(expected) || expected < 0) throw new TypeError("expected: a version number (0: new)");
      headers["if-match"] = String(expected);
    }
    const res = await this.#client.request("PUT", this.#path(id), { body, type: "application/json", headers });
    return expectOk(res);
  }

  /** The current version and value, or null when there is none. @returns {Promise<{version: number, val: any} | null>} */
  async get(id) {
    const res = await this.#client.request("GET", this.#path(id));
    if (res.status === 404) return null;
    return expectOk(res);
  }

  /** Deletes; the deleting version, or null when there was nothing. @returns {Promise<{version: number} | null>} */
  async remove(id) {
    const res = await this.#client.request("DELETE", this.#path(id));
    if (res.status === 404) return null;
    return expectOk(res);
  }

  /** Every version, oldest first. @returns {Promise<Array<{version: number, kind: string, val: any, ts: string}>>} */
  async history(id) {
    return expectOk(await this.#client.request("GET", this.#path(id, "/history")));
  }
}

// ----------------------------------------------------------- subscription

/** One subscription: its own connection, resumed from its position after every drop. */
export class Shape {
  /** The rows, by key (the JSON array of the key's values, in key order). */
  rows = new Map();
  /**
   * Changes applied, and those that did not fit what was held (an INSERT or
   * a row entering for a key held already; an UPDATE, a row leaving or a
   * DELETE for a key not held). Always 0 when every change comes exactly
   * once; a table captured from the WAL without REPLICA IDENTITY FULL can
   * make some (its old rows are keys only).
   */
  stats = { changes: 0, inconsistent: 0 };
  #key = null; // the key's columns
  #sub;
  #handlers;

  constructor(client, request, handlers = {}) {
    if (!request?.table) throw new TypeError("shape({ table, where, columns }): table is required");
    const filter = request.filter ?? request.where;
    this.#handlers = handlers ?? {};
    let ready;
    /** Resolves once the first snapshot is in (`rows` holds it). */
    this.ready = new Promise((resolve, reject) => (ready = { resolve, reject }));
    this.ready.catch(() => {});
    const req = { table: request.table, snapshot: true };
    if (filter != null) req.filter = filter;
    if (request.columns != null) req.columns = request.columns;
    this.#sub = client.subscribe(req, (event) => this.#apply(event), {
      onSnapshotBegin: () => this.rows.clear(),
      onSnapshot: (rows, key) => {
        this.#key = key ?? this.#key;
        for (const row of rows) this.rows.set(this.#keyOf(row), row);
      },
      onReady: async (info) => {
        this.#key = info.key ?? this.#key;
        ready.resolve(this);
        if (this.#handlers.onReady) await this.#handlers.onReady(this, info);
      },
      onResync: async (info) => {
        // With a snapshot to follow: what is held is replaced by it.
        if (info.snapshot) this.rows.clear();
        if (this.#handlers.onResync) await this.#handlers.onResync(info);
      },
      onError: (e) => this.#handlers.onError?.(e),
      onState: (state, detail) => this.#handlers.onState?.(state, detail),
    });
    this.#sub.done.catch((e) => ready.reject(e));
  }

  /** The subscription underneath (state, position, stats). */
  get subscription() {
    return this.#sub;
  }

  /** Stops. */
  close() {
    this.#sub.close();
  }

  #keyOf(row) {
    if (!this.#key || !row) return JSON.stringify(row ?? null);
    return JSON.stringify(this.#key.map((c) => row[c] ?? null));
  }

  async #apply(event) {
    if (event?.kind !== "change") return;
    const rows = this.rows;
    const fits = (ok) => ok || (this.stats.inconsistent += 1);
    switch (event.op) {
      case "TRUNCATE":
        rows.clear();
        break;
      case "INSERT":
        fits(!rows.has(this.#keyOf(event.new)));
        rows.set(this.#keyOf(event.new), event.new);
        break;
      case "UPDATE":
        if (event.view === "leave") {
          fits(rows.delete(this.#keyOf(event.key)));
          break;
        }
        if (event.view === "enter") fits(!rows.has(this.#keyOf(event.new)));
        // The key may have changed: the row moves.
        else if (event.old) fits(rows.delete(this.#keyOf(event.old)));
        rows.set(this.#keyOf(event.new), event.new);
        break;
      case "DELETE":
        fits(rows.delete(this.#keyOf(event.old ?? event.key)));
        break;
      default:
        return;
    }
    this.stats.changes += 1;
    if (this.#handlers.onChange) await this.#handlers.onChange(event, this);
  }
}

export class Subscription {
  #client;
  #options;
  #request;
  #onEvent;
  #handlers;
  #hooks;
  #settle; // the resolve and reject of ready and done

  #position = null; // string, the resume position of the last item handed over
  #pos = null; // the same as [txid, seq]
  #delivered = new Map(); // "txid:seq" -> [txid, seq] of events handed over above #pos

  #queue = [];
  #pumping = false;
  #drainWaiters = [];

  #state = "connecting";
  #stateListeners = new Set();
  #closed = false;
  #conn = null; // { close() } of the live connection
  #wake = null; // cuts a backoff wait short on close()
  #everOpen = false;
  #refusedOnce = false; // a refused token was already refreshed once since the last success

  /** Counters: events handed over, duplicates dropped, reconnects, lag closes, resyncs. */
  stats = { events: 0, duplicates: 0, reconnects: 0, lags: 0, resyncs: 0 };

  constructor(client, options, request, onEvent, handlers, hooks) {
    this.#client = client;
    this.#options = options;
    this.#request = normalize(request);
    this.#onEvent = onEvent;
    this.#handlers = handlers ?? {};
    this.#hooks = hooks;
    if (request.since != null) {
      if (!parseCursor(request.since)) throw new TypeError(`since: not a position: ${request.since}`);
      this.#advance(request.since);
    }
    let ready, done;
    /** Resolves once subscribed the first time; rejects if the subscription fails or is closed first. */
    this.ready = new Promise((resolve, reject) => (ready = { resolve, reject }));
    /** Resolves when closed by `close()`; rejects with the error when it gave up. */
    this.done = new Promise((resolve, reject) => (done = { resolve, reject }));
    // Handled here so that an application that awaits neither gets no unhandled rejection.
    this.ready.catch(() => {});
    this.done.catch(() => {});
    this.#settle = { ready, done };
    if (handlers?.onState) this.onState(handlers.onState);
    queueMicrotask(() => this.#run());
  }

  /** The resume position of the last event (or resync) handed over: `"txid:seq"`, or null before any. */
  get position() {
    return this.#position;
  }

  /** "connecting" | "open" | "reconnecting" | "closed" | "failed". */
  get state() {
    return this.#state;
  }

  /** `fn(state, detail)` on every state change. Returns the function that stops it. */
  onState(fn) {
    this.#stateListeners.add(fn);
    return () => this.#stateListeners.delete(fn);
  }

  /** Stops: no callback after this returns. */
  close() {
    if (this.#closed) return;
    this.#closed = true;
    this.#queue.length = 0;
    this.#conn?.close();
    this.#wake?.();
    this.#setState("closed");
    this.#settle.ready.reject(new PgPubSubError("closed before it was subscribed"));
    this.#settle.done.resolve();
    this.#hooks.gone();
  }

  #setState(state, detail = {}) {
    if (this.#state === state && state !== "reconnecting") return;
    this.#state = state;
    for (const fn of this.#stateListeners) safely(fn, state, detail);
    this.#hooks.state(state, detail);
  }

  #fail(error) {
    if (this.#closed) return;
    this.#closed = true;
    this.#queue.length = 0;
    this.#conn?.close();
    this.#setState("failed", { error });
    if (this.#handlers.onError) safely(this.#handlers.onError, error);
    this.#settle.ready.reject(error);
    this.#settle.done.reject(error);
    this.#hooks.gone();
  }

  // The connection loop: connect, run until the connection ends, decide.
  async #run() {
    let refresh = false;
    let attempt = 0;
    while (!this.#closed) {
      let outcome;
      try {
        const token = await this.#client.token(refresh);
        if (this.#closed) return;
        outcome = await (this.#useWebSocket() ? this.#viaWebSocket(token) : this.#viaEventStream(token));
      } catch (error) {
        outcome = { kind: "error", error };
      }
      if (this.#closed) return;
      if (outcome.opened) {
        attempt = 0;
        refresh = false;
        this.#refusedOnce = false;
      }
      // What the last connection delivered is handled before resuming, so the
      // resume starts from the latest position.
      await this.#drained();
      if (this.#closed) return;
      let delay = 0;
      switch (outcome.kind) {
        case "unauthorized":
          if (this.#refusedOnce || typeof this.#options.token !== "function") {
            this.#fail(outcome.error ?? new AuthError("token refused"));
            return;
          }
          this.#refusedOnce = true;
          refresh = true;
          break;
        case "expired":
          refresh = true;
          break;
        case "refused":
          this.#fail(outcome.error);
          return;
        case "lagged":
          break;
        default:
          delay = backoff(attempt++, this.#options);
      }
      this.stats.reconnects += 1;
      this.#setState("reconnecting", { reason: outcome.kind, error: outcome.error, delay });
      if (delay > 0) await this.#sleep(delay);
    }
  }

  #sleep(ms) {
    return new Promise((resolve) => {
      const t = setTimeout(resolve, ms);
      this.#wake = () => {
        clearTimeout(t);
        resolve();
      };
    }).finally(() => (this.#wake = null));
  }

  #useWebSocket() {
    const t = this.#options.transport ?? "auto";
    if (t === "sse") return false;
    return Boolean(this.#options.WebSocket ?? globalThis.WebSocket);
  }

  #opened(id) {
    this.#everOpen = true;
    if (id) this.#enqueue({ position: id });
    this.#setState("open");
    this.#settle.ready.resolve();
  }

  // ------------------------------------------------------------ WebSocket

  #viaWebSocket(token) {
    const WS = this.#options.WebSocket ?? globalThis.WebSocket;
    return new Promise((resolve) => {
      let ws;
      try {
        ws = new WS(this.#client.wsUrl());
      } catch (error) {
        resolve({ kind: "error", error });
        return;
      }
      let opened = false;
      let paused = false;
      let settled = false;
      let said = null; // what the server said before closing
      let idle = null;
      const timer = setTimeout(() => {
        said ??= { kind: "error", error: new PgPubSubError("timed out subscribing") };
        ws.close();
      }, this.#options.connectTimeout);
      const conn = { close: () => ws.close(1000) };
      this.#conn = conn;
      const settle = (outcome) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        clearTimeout(idle);
        if (this.#conn === conn) this.#conn = null;
        resolve({ ...outcome, opened });
      };
      // Silence for idleTimeout (the server sends a heartbeat every 15 s):
      // the connection is dead without a word (a NAT timeout, a sleeping
      // laptop, a network hand-over). Give it up at once, without waiting
      // for a closing handshake that cannot happen, and resume.
      const alive = () => {
        clearTimeout(idle);
        if (settled || paused) return;
        idle = setTimeout(() => {
          const ms = this.#options.idleTimeout;
          settle({ kind: "idle", error: new PgPubSubError(`nothing heard for ${ms} ms: the connection is taken as dead`) });
          if (typeof ws.terminate === "function") ws.terminate();
          else ws.close();
        }, this.#options.idleTimeout);
      };
      if (typeof ws.on === "function") ws.on("ping", alive); // the ws package shows pings; browsers do not
      ws.onopen = () => {
        alive();
        const first = { ...this.#request, ack: true };
        // Resuming, a shape's rows are not sent again (unless the log lost
        // events: then a resync, and the rows again).
        if (this.#position) first.since = this.#position;
        else if (first.snapshot) this.#enqueue({ reset: true });
        if (token) first.token = token;
        ws.send(JSON.stringify(first));
      };
      ws.onmessage = (m) => {
        if (settled) return;
        alive();
        let msg;
        try {
          msg = JSON.parse(typeof m.data === "string" ? m.data : new TextDecoder().decode(m.data));
        } catch {
          return;
        }
        switch (msg.type) {
          case "subscribed":
            clearTimeout(timer);
            opened = true;
            this.#opened(msg.id);
            break;
          case "event":
            this.#enqueue({ id: msg.id, event: msg.event });
            // The ws package can stop reading (and so let the server see a
            // slow reader); a browser's WebSocket cannot. No idle timer
            // while paused: the silence is ours.
            if (!paused && this.#queue.length > 256 && typeof ws.pause === "function") {
              paused = true;
              clearTimeout(idle);
              ws.pause();
              this.#drained().then(() => {
                paused = false;
                ws.resume();
                alive();
              });
            }
            break;
          case "resync":
            this.#enqueue({ resync: { cursor: msg.cursor, pruned: msg.pruned, snapshot: Boolean(msg.snapshot) } });
            break;
          case "snapshot":
            this.#enqueue({ rows: { key: msg.key, rows: msg.rows } });
            break;
          case "ready":
            this.#enqueue({ ready: { id: msg.id, rows: msg.rows, key: msg.key } });
            break;
          case "lagged":
            said = { kind: "lagged" };
            this.#enqueue({ lagged: { missed: msg.missed, resume: msg.resume } });
            break;
          case "expired":
            said = { kind: "expired", error: new AuthError(msg.error ?? "the token expired", { status: 4401 }) };
            break;
          case "error":
            said = { kind: "error", error: new PgPubSubError(msg.error ?? "error") };
            break;
          default:
          // "heartbeat" (proof of life, handled above), "closing" and anything
          // newer: the close says the rest
        }
      };
      ws.onerror = () => {}; // the close follows
      ws.onclose = (e) => {
        const reason = said?.error?.message || e.reason || `closed (${e.code})`;
        let outcome;
        if (e.code === 4000) outcome = { kind: "lagged" };
        else if (e.code === 4401)
          outcome =
            said?.kind === "expired" ? said : { kind: "unauthorized", error: new AuthError(reason, { status: 4401 }) };
        else if (e.code === 4400) outcome = { kind: "refused", error: new RefusedError(reason, { status: 4400 }) };
        else outcome = { kind: said?.kind === "error" ? "error" : "ended", error: said?.error };
        settle(outcome);
      };
    });
  }

  // ------------------------------------------------- Server-Sent Events over fetch

  async #viaEventStream(token) {
    const q = new URLSearchParams();
    const r = this.#request;
    for (const c of r.channels ?? []) q.append("channel", c);
    if (r.table != null) q.set("table", r.table);
    for (const op of r.ops ?? []) q.append("op", op);
    // The server reads the value as JSON when it parses as JSON: always send JSON.
    for (const [col, val] of Object.entries(r.where ?? {})) q.append("where", `${col}:${JSON.stringify(val)}`);
    if (r.filter != null) q.set("filter", typeof r.filter === "string" ? r.filter : JSON.stringify(r.filter));
    if (r.columns != null) q.set("columns", r.columns.join(","));
    if (this.#position) q.set("since", this.#position);
    if (r.snapshot) q.set("snapshot", "true");
    const headers = { accept: "text/event-stream" };
    if (token) headers.authorization = `Bearer ${token}`;

    const abort = new AbortController();
    const conn = { close: () => abort.abort() };
    this.#conn = conn;
    let timer = setTimeout(() => abort.abort(), this.#options.connectTimeout);
    let res;
    try {
      res = await this.#options.fetch(this.#client.sseUrl(q), { headers, signal: abort.signal, cache: "no-store" });
    } catch (error) {
      clearTimeout(timer);
      return { kind: "error", error };
    }
    clearTimeout(timer);
    if (!res.ok) {
      const error = await failure(res);
      if (res.status === 401) return { kind: "unauthorized", error };
      if (res.status === 400 || res.status === 403) return { kind: "refused", error };
      return { kind: "error", error };
    }
    this.#opened(null);
    if (!this.#position && r.snapshot) this.#enqueue({ reset: true });
    let said = null;
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let record = { id: null, event: "", data: [] };
    const dispatch = () => {
      const { id, event, data } = record;
      record = { id: null, event: "", data: [] };
      if (data.length === 0) {
        if (id) this.#enqueue({ position: id }); // the hello: where this subscriber stands
        return;
      }
      const text = data.join("\n");
      let body;
      try {
        body = JSON.parse(text);
      } catch {
        body = text;
      }
      switch (event) {
        case "lagged":
          said = { kind: "lagged" };
          this.#enqueue({ lagged: { missed: body.missed, resume: body.resume ?? id } });
          break;
        case "resync":
          this.#enqueue({ resync: { cursor: body.cursor, pruned: body.pruned, snapshot: Boolean(body.snapshot) } });
          break;
        case "snapshot":
          this.#enqueue({ rows: { key: body.key, rows: body.rows } });
          break;
        case "ready":
          this.#enqueue({ ready: { id: body.id ?? id, rows: body.rows, key: body.key } });
          break;
        case "expired":
          said = { kind: "expired", error: new AuthError(body.error ?? "the token expired", { status: 401 }) };
          break;
        case "error":
          said = { kind: "error", error: new PgPubSubError(body.error ?? String(body)) };
          break;
        default:
          this.#enqueue({ id, event: body });
      }
    };
    let silent = false;
    try {
      for (;;) {
        // Silence for idleTimeout (the server sends a keep-alive every 15 s):
        // the stream is dead without a word; give it up and resume.
        timer = setTimeout(() => {
          silent = true;
          abort.abort();
        }, this.#options.idleTimeout);
        const { value, done } = await reader.read();
        clearTimeout(timer);
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let nl;
        while ((nl = buffer.search(/\r\n|\r|\n/)) >= 0) {
          const line = buffer.slice(0, nl);
          buffer = buffer.slice(nl + (buffer[nl] === "\r" && buffer[nl + 1] === "\n" ? 2 : 1));
          if (line === "") dispatch();
          else if (line[0] === ":") continue;
          else {
            const colon = line.indexOf(":");
            const field = colon < 0 ? line : line.slice(0, colon);
            let value = colon < 0 ? "" : line.slice(colon + 1);
            if (value[0] === " ") value = value.slice(1);
            if (field === "id") record.id = value;
            else if (field === "event") record.event = value;
            else if (field === "data") record.data.push(value);
          }
        }
        // Read on only once what came is handled: a slow handler slows the
        // stream, and the server tells a subscriber that falls too far behind.
        await this.#drained();
        if (this.#closed) break;
      }
    } catch (error) {
      if (silent) {
        const ms = this.#options.idleTimeout;
        said ??= { kind: "idle", error: new PgPubSubError(`nothing heard for ${ms} ms: the stream is taken as dead`) };
      }
      said ??= { kind: "error", error };
    } finally {
      clearTimeout(timer);
      abort.abort();
      if (this.#conn === conn) this.#conn = null;
    }
    return { ...(said ?? { kind: "ended" }), opened: true };
  }

  // -------------------------------------------------------------- delivery

  #enqueue(item) {
    if (this.#closed) return;
    this.#queue.push(item);
    if (!this.#pumping) this.#pump();
  }

  #drained() {
    if (!this.#pumping && this.#queue.length === 0) return Promise.resolve();
    return new Promise((resolve) => this.#drainWaiters.push(resolve));
  }

  // Hands the queued items over one at a time, waiting for an async handler.
  async #pump() {
    this.#pumping = true;
    try {
      while (this.#queue.length > 0 && !this.#closed) {
        const item = this.#queue.shift();
        if (item.event !== undefined) await this.#deliver(item.id, item.event);
        else if (item.resync) await this.#resync(item.resync);
        else if (item.reset) await this.#call(this.#handlers.onSnapshotBegin);
        else if (item.rows) await this.#call(this.#handlers.onSnapshot, item.rows.rows, item.rows.key);
        else if (item.ready) {
          this.#advance(item.ready.id);
          await this.#call(this.#handlers.onReady, item.ready);
        }
        else if (item.lagged) {
          this.stats.lags += 1;
          this.#advance(item.lagged.resume);
          await this.#call(this.#handlers.onLagged, item.lagged);
        } else if (item.position) this.#advance(item.position);
      }
    } finally {
      this.#pumping = false;
      for (const resolve of this.#drainWaiters.splice(0)) resolve();
    }
  }

  async #deliver(id, event) {
    const at = event && event.seq != null && event.txid != null ? [BigInt(event.txid), BigInt(event.seq)] : null;
    if (at) {
      const key = `${at[0]}:${at[1]}`;
      if ((this.#pos && cmp(at, this.#pos) <= 0) || this.#delivered.has(key)) {
        // Replayed by a resume: handed over already.
        this.stats.duplicates += 1;
        this.#advance(id);
        return;
      }
      this.#delivered.set(key, at);
      if (this.#delivered.size > this.#options.maxRemembered) {
        this.#delivered.delete(this.#delivered.keys().next().value);
      }
    }
    this.stats.events += 1;
    const position = this.#after(id);
    await this.#call(this.#onEvent, event, { id, position });
    this.#advance(id);
  }

  async #resync(info) {
    this.stats.resyncs += 1;
    if (!info.snapshot) this.#advance(info.pruned);
    if (this.#handlers.onResync) {
      await this.#call(this.#handlers.onResync, info);
    } else {
      const error = new PgPubSubError(
        `events after ${info.cursor} were pruned (up to ${info.pruned}) before this subscriber read them: resync`,
      );
      error.resync = info;
      if (this.#handlers.onError) safely(this.#handlers.onError, error);
      else console.warn(`pgpubsub-client: ${error.message} (pass onResync to handle it)`);
    }
  }

  async #call(fn, ...args) {
    if (!fn) return;
    try {
      const r = fn(...args);
      if (r && typeof r.then === "function") await r;
    } catch (error) {
      if (this.#handlers.onError && fn !== this.#handlers.onError) safely(this.#handlers.onError, error);
      else console.error("pgpubsub-client: a handler threw", error);
    }
  }

  /** The position once `id` is handled. */
  #after(id) {
    const at = parseCursor(id);
    return at && (!this.#pos || cmp(at, this.#pos) > 0) ? id : this.#position;
  }

  #advance(id) {
    const at = parseCursor(id);
    if (!at || (this.#pos && cmp(at, this.#pos) <= 0)) return;
    this.#pos = at;
    this.#position = id;
    // A resume never repeats an event at or below the position.
    for (const [key, c] of this.#delivered) if (cmp(c, at) <= 0) this.#delivered.delete(key);
  }
}

/** The request as the gateway reads it. */
function normalize(r) {
  const out = {};
  const channels = r.channels ?? r.channel;
  if (channels != null) out.channels = Array.isArray(channels) ? channels.map(String) : [String(channels)];
  if (r.table != null) out.table = String(r.table);
  const ops = r.ops ?? r.op;
  if (ops != null) out.ops = (Array.isArray(ops) ? ops : [ops]).map((o) => String(o).toUpperCase());
  if (r.where != null) out.where = { ...r.where };
  if (r.filter != null) out.filter = r.filter;
  if (r.columns != null) out.columns = (Array.isArray(r.columns) ? r.columns : [r.columns]).map(String);
  if (r.snapshot) out.snapshot = true;
  return out;
}

/** Exponential backoff with jitter: between half and all of min * 2^attempt, capped. */
function backoff(attempt, { backoffMin, backoffMax }) {
  const ceiling = Math.min(backoffMax, backoffMin * 2 ** Math.min(attempt, 20));
  return Math.round(ceiling / 2 + (Math.random() * ceiling) / 2);
}
