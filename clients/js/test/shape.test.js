// Live shapes converge: while 8 writers insert, update, delete and move rows
// in and out of filters, and the gateway is killed and restarted twice,
// clients each hold a shape (opened while the writers run, so the
// snapshot's hand-over to the log is exercised); at the end each client's
// rows equal a SELECT of its shape, row for row. Trigger capture always;
// capture from the WAL too when PGPUBSUB_LOGICAL_URL names a server with
// wal_level = logical. PGPUBSUB_SHAPE_SECONDS sets how long the writers
// run (CI: the default, 6; the long run: 60).
import { describe, test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { connect } from "../src/client.js";
import { ADMIN_URL } from "./support/env.js";
import { TRANSPORTS, scratchDb, serve, sql, unique, until, freePort, bounded, sleep, sign, nowS } from "./support/helpers.js";

const SECONDS = Number(process.env.PGPUBSUB_SHAPE_SECONDS ?? 6);
const LOGICAL = process.env.PGPUBSUB_LOGICAL_URL;
const fast = { backoffMin: 50, backoffMax: 400 };

// Each shape, and the SQL that selects the same rows.
const SHAPES = [
  { request: { where: "status = 'paid'" }, sql: "SELECT * FROM items WHERE status = 'paid'" },
  {
    request: { where: "qty >= 50 and not status = 'void'", columns: ["qty"] },
    sql: "SELECT id, qty FROM items WHERE qty >= 50 AND NOT status = 'void'",
  },
  {
    request: { where: { or: [{ col: "status", op: "in", value: ["new", "paid"] }, { col: "qty", op: "is null" }] } },
    sql: "SELECT * FROM items WHERE status IN ('new', 'paid') OR qty IS NULL",
  },
  { request: { columns: ["status"] }, sql: "SELECT id, status FROM items" },
  // Under row-level authorization: the token names a role whose policy
  // reads a claim; the shape holds what that role's SELECT shows.
  { request: { where: "status <> 'void'" }, sql: "SELECT * FROM items WHERE status <> 'void'", role: true },
];
const SECRET = "a-test-secret-of-at-least-32-bytes!!";
const PARITY = 1;

const STATUSES = ["new", "paid", "void", "shipped"];
const pick = (xs) => xs[Math.floor(Math.random() * xs.length)];
const value = () => (Math.random() < 0.1 ? "NULL" : String(Math.floor(Math.random() * 100)));

/** One random write: insert, update (moving rows in and out of the filters), delete, or several in one transaction. */
function write(nextId) {
  const id = () => 1 + Math.floor(Math.random() * nextId());
  const one = () => {
    const r = Math.random();
    if (r < 0.3) return `INSERT INTO items VALUES (${nextId(1)}, '${pick(STATUSES)}', ${value()}) ON CONFLICT DO NOTHING;`;
    if (r < 0.55) return `UPDATE items SET status = '${pick(STATUSES)}' WHERE id = ${id()};`;
    if (r < 0.8) return `UPDATE items SET qty = ${value()} WHERE id = ${id()};`;
    if (r < 0.9) return `DELETE FROM items WHERE id = ${id()};`;
    const from = id();
    return `UPDATE items SET status = '${pick(STATUSES)}', qty = ${value()} WHERE id BETWEEN ${from} AND ${from + 5};`;
  };
  if (Math.random() < 0.3) return `BEGIN; ${one()} ${one()} ${one()} COMMIT;`;
  return one();
}

/**
 * A transaction held open (a row written, not committed) while the shapes
 * are opened: their snapshots' xmin stays behind it, so every write
 * committed meanwhile lies in the hand-over window (in the snapshot, and
 * after where the log is read from), and its own row comes after.
 */
function holdOpen(db, id) {
  const psql = spawn("psql", ["-X", "-qAt", "-v", "ON_ERROR_STOP=1", db], { stdio: ["pipe", "pipe", "inherit"] });
  const out = [];
  psql.stdout.on("data", (d) => out.push(String(d)));
  psql.stdin.write(`BEGIN; INSERT INTO items VALUES (${id}, 'paid', 77); SELECT 'held';\n`);
  return {
    held: () => out.join("").includes("held"),
    commit: () =>
      new Promise((resolve, reject) => {
        psql.on("exit", (code) => (code === 0 ? resolve() : reject(new Error(`psql exited ${code}`))));
        psql.stdin.end("COMMIT;\n");
      }),
  };
}

async function expected(db, text, role) {
  const select = `SELECT coalesce(json_agg(row_to_json(t) ORDER BY t.id), '[]') FROM (${text}) t`;
  const as = role ? `SET LOCAL ROLE ${role}; SET LOCAL request.jwt.claims = '{"parity": ${PARITY}}';` : "";
  return JSON.parse(await sql(db, `BEGIN; ${as} ${select}; COMMIT;`));
}

const held = (shape) => [...shape.rows.values()].sort((a, b) => a.id - b.id);

const MODES = [
  ["trigger capture", { skip: false, admin: undefined, wal: false }],
  [
    "capture from the WAL",
    { skip: LOGICAL ? false : "PGPUBSUB_LOGICAL_URL is not set (wal_level = logical; CI sets it)", admin: LOGICAL, wal: true },
  ],
];

for (const [mode, { skip, admin, wal }] of MODES) {
  for (const [name, options] of TRANSPORTS) {
    describe(`${mode}, over ${name}`, () => {
      test("each client's shape equals its SELECT after writers and two gateway kills", { skip }, async (t) => {
        const db = await scratchDb(t, admin);
        await sql(db, "CREATE TABLE items (id int PRIMARY KEY, status text, qty int)");
        await sql(db, "INSERT INTO items SELECT g, (ARRAY['new','paid','void','shipped'])[1 + g % 4], g % 100 FROM generate_series(1, 300) g");
        if (wal) await sql(db, "ALTER TABLE items REPLICA IDENTITY FULL; SELECT pubsub.watch_wal('items')");
        else await sql(db, "SELECT pubsub.watch('items')");
        // Roles are the cluster's: a name of this test's own.
        const role = unique("shape_reader").toLowerCase();
        await sql(
          db,
          `CREATE ROLE ${role} NOLOGIN; GRANT SELECT ON items TO ${role}; ALTER TABLE items ENABLE ROW LEVEL SECURITY;
           CREATE POLICY parity ON items FOR SELECT TO ${role}
             USING (qty % 2 = (current_setting('request.jwt.claims', true)::json ->> 'parity')::int)`,
        );
        t.after(() => sql(admin ?? ADMIN_URL, `DROP ROLE IF EXISTS ${role}`).catch(() => {}));
        const token = (withRole) =>
          sign(SECRET, { exp: nowS() + 3600, read: ["items"], ...(withRole ? { role, parity: PARITY } : {}) });
        const env = wal ? { PGPUBSUB_CAPTURE_NAME: unique("shape").toLowerCase().replace(/[^a-z0-9_]/g, "_").slice(0, 40) } : {};
        const args = [...(wal ? ["--capture"] : []), "--jwt-secret", SECRET];
        const port = await freePort();
        const start = () => serve(t, db, { channels: "items", args, env, port });
        let server = await start();
        let writing = true;
        const clients = [];
        try {
          let top = 300;
          const nextId = (grow = 0) => (top += grow);
          let writes = 0;
          const writers = Array.from({ length: 8 }, async () => {
            while (writing) {
              await sql(db, write(nextId)).catch(() => {}); // a deadlock between writers is fine: it rolls back
              writes += 1;
            }
          });
          const open = holdOpen(db, 100000);
          await until(open.held, "a transaction held open");
          await until(() => writes >= 100, "writers running past the open transaction");
          // Opened while the writers write: the snapshot's hand-over is exact or this fails.
          const readies = SHAPES.map(() => 0);
          const shapes = SHAPES.map(({ request, role: withRole }, i) => {
            const client = connect(server.url, { ...options, ...fast, token: token(withRole) });
            clients.push(client);
            return client.shape({ table: "items", ...request }, { onReady: () => (readies[i] += 1) });
          });
          await bounded(Promise.all(shapes.map((s) => s.ready)), "every snapshot in");
          await open.commit();
          const began = Date.now();
          for (const round of [1, 2]) {
            await sleep((SECONDS * 1000) / 3); // the writers' run: what is tested comes after
            await server.stop("SIGKILL");
            await until(() => shapes.every((s) => s.subscription.state === "reconnecting"), `drop ${round} noticed`);
            server = await start();
            await until(() => shapes.every((s) => s.subscription.state === "open"), `reconnected ${round}`);
          }
          await sleep(Math.max(0, SECONDS * 1000 - (Date.now() - began)));
          writing = false;
          await Promise.all(writers);
          // The fence: a row in every shape, written last, must arrive; then all is in.
          await sql(db, "INSERT INTO items VALUES (0, 'paid', 99)");
          // (qty 99 is odd: the role's policy shows it too.)
          await until(() => shapes.every((s) => s.rows.has("[0]")), "the fence row in every shape");
          for (const [i, shape] of shapes.entries()) {
            const want = await expected(db, SHAPES[i].sql, SHAPES[i].role ? role : null);
            assert.deepEqual(held(shape), want, `shape ${i} (${JSON.stringify(SHAPES[i].request)})`);
            // Exactly once: no change met a row it did not fit (a change the
            // snapshot held, applied again, or one missed).
            assert.equal(shape.stats.inconsistent, 0, `shape ${i}: changes that did not fit (${shape.stats.changes} applied)`);
            assert.ok(shape.stats.changes > 10, `shape ${i} saw changes`);
            assert.ok(want.length > 10, `shape ${i} holds rows`);
          }
          assert.ok(writes > 100, `writers wrote (${writes})`);
          assert.ok(shapes[0].rows.has("[100000]"), "the row of the transaction held open came after the snapshot");
          // No snapshot read again on resume: one per shape.
          assert.deepEqual(readies, SHAPES.map(() => 1));
          for (const shape of shapes) assert.equal(shape.subscription.stats.resyncs, 0);
        } finally {
          writing = false;
          for (const c of clients) c.close();
          await server.stop();
        }
      });
    });
  }
}
