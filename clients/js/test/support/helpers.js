// Test support: a scratch database per test, `pgpubsub serve` as a process
// of its own, unique names, HS256 tokens, and waits that always end.
import { spawn, execFile } from "node:child_process";
import { createHmac } from "node:crypto";
import { createServer } from "node:net";
import { promisify } from "node:util";
import { WebSocket } from "ws";
import { BIN, ADMIN_URL } from "./env.js";

const run = promisify(execFile);

/** The longest any test waits for one thing. */
export const WAIT = 20_000;

/** The transports every subscription test runs over: WebSocket (the ws package; browsers and Node >= 22 have their own) and SSE over fetch (Node 20's default). */
export const TRANSPORTS = [
  ["websocket", { transport: "websocket", WebSocket }],
  ["sse", { transport: "sse" }],
];

let counter = 0;
/** A name no other test (or run) uses: a valid channel or database name. */
export function unique(prefix) {
  return `${prefix}_${process.pid}_${counter++}_${Date.now() % 1e8}`;
}

function withDb(url, name) {
  const u = new URL(url);
  u.pathname = `/${name}`;
  return u.toString();
}

/** psql on `url`: the output, tuples only. */
export async function sql(url, text) {
  const { stdout } = await run("psql", ["-X", "-qAt", "-v", "ON_ERROR_STOP=1", url, "-c", text]);
  return stdout.trim();
}

/**
 * A migrated database of the test's own, dropped when the test ends, on the
 * server `admin` names (by default the one the Rust tests use). Its
 * replication slots (a capturer's) are dropped first: a database that has
 * one cannot be dropped.
 */
export async function scratchDb(t, admin = ADMIN_URL) {
  const name = unique("pgps_js");
  await sql(admin, `CREATE DATABASE ${name}`);
  const url = withDb(admin, name);
  t.after(async () => {
    await sql(
      admin,
      `SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE database = '${name}' AND active`,
    ).catch(() => {});
    await until(
      async () =>
        (await sql(admin, `SELECT count(*) FROM pg_replication_slots WHERE database = '${name}' AND active`)) === "0",
      "the test's slots to be let go",
    ).catch(() => {});
    await sql(admin, `SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = '${name}'`).catch(
      () => {},
    );
    await sql(admin, `DROP DATABASE IF EXISTS ${name} WITH (FORCE)`).catch(() => {});
  });
  await run(BIN, ["migrate"], { env: { ...process.env, DATABASE_URL: url, RUST_LOG: "warn" } });
  return url;
}

/** A free TCP port (for a server that must come back on the same address). */
export function freePort() {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.on("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

/**
 * `pgpubsub serve` on `db`, once it says where it listens; killed when the
 * test ends. `port` 0: any free one.
 */
export async function serve(t, db, { channels, args = [], env = {}, port = 0 }) {
  const vars = { ...process.env, DATABASE_URL: db, RUST_LOG: "warn,pgpubsub=info", ...env };
  delete vars.PUB_SUB_CHANNEL;
  const child = spawn(BIN, ["serve", "--bind", `127.0.0.1:${port}`, "--channel", channels, ...args], {
    env: vars,
    stdio: ["ignore", "ignore", "pipe"],
  });
  let log = "";
  const addr = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`the server did not start in time:\n${log}`)), WAIT);
    child.stderr.setEncoding("utf8");
    child.stderr.on("data", (chunk) => {
      log += chunk;
      const m = /serving on http:\/\/(\S+)/.exec(log);
      if (m) {
        clearTimeout(timer);
        resolve(m[1]);
      }
    });
    child.on("exit", (code) => {
      clearTimeout(timer);
      reject(new Error(`the server exited (${code}):\n${log}`));
    });
  });
  const exited = new Promise((resolve) => child.once("exit", resolve));
  const server = {
    url: `http://${addr}`,
    port: Number(addr.split(":").pop()),
    get log() {
      return log;
    },
    /** Stops it (SIGKILL by default: no close frames, no goodbye) and waits for the exit. */
    async stop(signal = "SIGKILL") {
      if (child.exitCode === null && child.signalCode === null) child.kill(signal);
      await bounded(exited, "the server to exit");
    },
  };
  t.after(() => server.stop());
  return server;
}

/** Rejects if `promise` takes longer than `ms`. */
export function bounded(promise, what, ms = WAIT) {
  let timer;
  return Promise.race([
    promise,
    new Promise((_, reject) => (timer = setTimeout(() => reject(new Error(`timed out waiting for ${what}`)), ms))),
  ]).finally(() => clearTimeout(timer));
}

/** Waits until `check()` is true (or returns a truthy value, which it returns). */
export async function until(check, what, ms = WAIT) {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = await check();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(20);
  }
}

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Publishes `payload` on `channel` straight in the database (the gateway need not be up). */
export function publishSql(db, channel, payloads) {
  const values = payloads.map((p) => `pubsub.publish('${channel}', '${p.replaceAll("'", "''")}')`);
  return sql(db, values.map((v) => `SELECT ${v};`).join("\n"));
}

/** An HS256 JSON Web Token, by hand. */
export function sign(secret, claims) {
  const part = (v) => Buffer.from(JSON.stringify(v)).toString("base64url");
  const head = `${part({ alg: "HS256", typ: "JWT" })}.${part(claims)}`;
  return `${head}.${createHmac("sha256", secret).update(head).digest("base64url")}`;
}

export const nowS = () => Math.floor(Date.now() / 1000);
