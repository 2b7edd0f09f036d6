// Types of pgpubsub-client (src/client.js).

/** A resume position, `"txid:seq"`. Order positions with {@link compareCursors}, never as strings. */
export type Position = string;

/** The fields every pgpubsub event has (docs/protocol.md). */
interface EventBase {
  /** Position in the log; the event's id. */
  seq: number;
  /** The writing transaction. */
  txid: number;
  channel: string;
  /** When it was written, ISO 8601. */
  time: string;
}

/** A row change of a watched table. */
export interface ChangeEvent<Row = Record<string, unknown>> extends EventBase {
  kind: "change";
  op: "INSERT" | "UPDATE" | "DELETE" | "TRUNCATE";
  schema: string;
  table: string;
  /** Primary-key columns and values; null without a primary key and for TRUNCATE. */
  key: Record<string, unknown> | null;
  /** The row after (INSERT, UPDATE). */
  new: Row | null;
  /** The row before (UPDATE, DELETE). */
  old: Row | null;
  /**
   * Under row-level authorization (a token with a `role` claim): the UPDATE
   * moved the row into what this subscriber may see (`new` is the row, `old`
   * is null) or out of it (only `key`). Absent for a change within it.
   */
  view?: "enter" | "leave";
}

/** A published message: the text exactly as published. */
export interface MessageEvent extends EventBase {
  kind: "message";
  payload: string;
}

/**
 * Anything else sent with `pg_notify` on a served channel: the JSON as sent.
 * Not in the log: no seq, live only, never deduplicated or replayed.
 */
export type ForeignEvent = { kind?: undefined; seq?: undefined } & Record<string, unknown>;

export type PubSubEvent<Row = Record<string, unknown>> = ChangeEvent<Row> | MessageEvent | ForeignEvent;

/** What to subscribe to. Every field is optional. */
export interface SubscribeRequest {
  /** Channels (default: every served channel the token may read). */
  channels?: string | string[];
  /** Only changes of this table (`"orders"` or `"public.orders"`). */
  table?: string;
  /** Only these operations. */
  ops?: string | Array<"INSERT" | "UPDATE" | "DELETE" | "TRUNCATE" | Lowercase<"INSERT" | "UPDATE" | "DELETE" | "TRUNCATE">>;
  /** Only changes whose row has these column values (compared as JSON). */
  where?: Record<string, unknown>;
  /** Start after this position (a `position` saved earlier) instead of now. */
  since?: Position | null;
}

/** A shape: a table's rows that match a filter, with some columns. */
export interface ShapeRequest {
  /** The table (`"orders"` or `"public.orders"`): watched, with a primary key. */
  table: string;
  /** The filter: text (`"status = 'paid' and qty >= 2"`) or its JSON form. */
  where?: string | Record<string, unknown>;
  /** The same as `where`. */
  filter?: string | Record<string, unknown>;
  /** Only these columns (the key's always). */
  columns?: string | string[];
}

/** What a shape calls back. */
export interface ShapeHandlers<Row = Record<string, unknown>> {
  /** The snapshot is in (the first time, and after each resync). */
  onReady?: (shape: Shape<Row>, info: { id: Position; rows: number; key: string[] }) => void | Promise<void>;
  /** A change, once applied to `shape.rows`. */
  onChange?: (event: ChangeEvent<Row>, shape: Shape<Row>) => void | Promise<void>;
  /** The log lost events the shape needed; with `snapshot`, its rows come again. */
  onResync?: (info: Resync & { snapshot: boolean }) => void | Promise<void>;
  onState?: (state: State, detail: StateDetail) => void;
  onError?: (error: PgPubSubError) => void;
}

/** A live collection of a table's rows (`client.shape()`). */
export declare class Shape<Row = Record<string, unknown>> {
  /** The rows, by the JSON array of their key's values (`"[42]"`). */
  readonly rows: Map<string, Row>;
  /** Changes applied, and those that did not fit what was held (0 when each came once). */
  readonly stats: { changes: number; inconsistent: number };
  /** Resolves with the shape once its first snapshot is in. */
  readonly ready: Promise<Shape<Row>>;
  /** The subscription underneath. */
  readonly subscription: Subscription;
  close(): void;
}

/** Where an event sits, handed with it. */
export interface Delivery {
  /** The event's resume id as the server sent it. */
  id: Position;
  /** `subscription.position` once this event is handled. */
  position: Position | null;
}

/** Events after `cursor` were pruned from the log (up to `pruned`) before this subscriber could read them. */
export interface Resync {
  cursor: Position;
  pruned: Position;
}

/** The server dropped `missed` events for this slow subscriber and closed; the client resumed from `resume`. */
export interface Lagged {
  missed: number;
  resume: Position;
}

export type State = "connecting" | "open" | "reconnecting" | "closed" | "failed";

export interface StateDetail {
  /** Why it reconnects: "ended", "error", "idle" (nothing heard for idleTimeout), "lagged", "expired", "unauthorized". */
  reason?: string;
  error?: unknown;
  /** ms until the next attempt. */
  delay?: number;
}

export interface SubscribeHandlers {
  /** The events this subscriber missed were pruned: rebuild what depends on them. Without it, onError (or the console) hears of it. */
  onResync?(info: Resync): void | Promise<void>;
  /** The server closed a slow subscriber; the client has already resumed. */
  onLagged?(info: Lagged): void | Promise<void>;
  onState?(state: State, detail: StateDetail): void;
  /** The subscription gave up (AuthError, RefusedError), or a handler threw. */
  onError?(error: unknown): void;
}

/** The token: a string, or a function called at each (re)connect and request; `refresh` after a refusal or expiry. */
export type TokenSource = string | ((context: { refresh: boolean }) => string | undefined | Promise<string | undefined>);

export interface ConnectOptions {
  token?: TokenSource;
  /** "auto" (default): WebSocket where there is one, else Server-Sent Events over fetch. */
  transport?: "auto" | "websocket" | "sse";
  /** A WebSocket constructor where there is no global one (Node 20: `import { WebSocket } from "ws"`). */
  WebSocket?: unknown;
  /** A fetch to use instead of the global one. */
  fetch?: typeof fetch;
  /** ms before the first retry; doubled each time, with jitter (default 250). */
  backoffMin?: number;
  /** ms, the longest wait between retries (default 10000). */
  backoffMax?: number;
  /** ms for a connection to be subscribed (default 10000). */
  connectTimeout?: number;
  /**
   * ms without a byte, on either transport, before the connection is taken as dead and replaced, resuming from
   * the position (default 45000: the server sends a heartbeat every 15 s, `serve --heartbeat`). Keep it above
   * twice the server's heartbeat.
   */
  idleTimeout?: number;
  /** Delivered events remembered above the position to drop repeats (default 100000). */
  maxRemembered?: number;
}

export declare class Subscription {
  /** The resume position of the last event (or resync) handed over; null before the server said where it starts. */
  readonly position: Position | null;
  readonly state: State;
  /** Resolves once subscribed the first time; rejects if it fails or is closed first. */
  readonly ready: Promise<void>;
  /** Resolves when closed with close(); rejects with the error it gave up on. */
  readonly done: Promise<void>;
  readonly stats: { events: number; duplicates: number; reconnects: number; lags: number; resyncs: number };
  /** Returns the function that stops it. */
  onState(fn: (state: State, detail: StateDetail) => void): () => void;
  /** No callback after this returns. */
  close(): void;
}

export interface Version {
  version: number;
}

export interface Snapshot<T = unknown> extends Version {
  val: T;
}

export interface HistoryEntry<T = unknown> extends Version {
  /** "put" (or the writer's own kind) or "delete". */
  kind: string;
  /** null for a delete. */
  val: T | null;
  /** When, ISO 8601. */
  ts: string;
}

export declare class Store<T = unknown> {
  /** A new version; with `expected`, only if that is the current version (0: only if new), else ConflictError. */
  put(id: string, value: T, options?: { expected?: number }): Promise<Version>;
  /** The current version, or null. */
  get(id: string): Promise<Snapshot<T> | null>;
  /** The deleting version, or null when there was nothing. */
  remove(id: string): Promise<Version | null>;
  /** Every version, oldest first. */
  history(id: string): Promise<Array<HistoryEntry<T>>>;
}

export declare class Client {
  /** The gateway's URL. */
  readonly url: string;
  /** `onEvent` gets each event once, in order; if it returns a promise, the next waits for it. */
  subscribe<Row = Record<string, unknown>>(
    request: SubscribeRequest,
    onEvent: (event: PubSubEvent<Row>, delivery: Delivery) => void | Promise<void>,
    handlers?: SubscribeHandlers,
  ): Subscription;
  /** Every subscription's state changes. Returns the function that stops it. */
  onState(fn: (state: State, subscription: Subscription, detail: StateDetail) => void): () => void;
  /** A string as it is, anything else as JSON text. */
  publish(channel: string, message: unknown): Promise<{ seq: number }>;
  store<T = unknown>(bucket: string): Store<T>;
  /** A live collection of a table's rows: its snapshot, then every change, kept in `rows`. */
  shape<Row = Record<string, unknown>>(request: ShapeRequest, handlers?: ShapeHandlers<Row>): Shape<Row>;
  /** Closes every subscription. */
  close(): void;
}

/** A client of the gateway at `url` (in a page: the page's origin when omitted). */
export declare function connect(url?: string, options?: ConnectOptions): Client;

/** Orders two positions: negative, zero or positive. */
export declare function compareCursors(a: Position, b: Position): number;

export declare class PgPubSubError extends Error {
  /** The HTTP status or WebSocket close code, when there was one. */
  readonly status?: number;
  /** On the error reported for a resync when there is no onResync. */
  readonly resync?: Resync;
}
/** No valid token (401, close 4401), after one refresh. */
export declare class AuthError extends PgPubSubError {}
/** The request was refused (400, 403, close 4400): retrying cannot help. */
export declare class RefusedError extends PgPubSubError {}
/** A store write's expected version was not the current one (409). */
export declare class ConflictError extends PgPubSubError {}
