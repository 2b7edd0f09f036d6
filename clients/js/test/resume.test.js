// Exactly once per subscription: across server restarts with writes during
// the downtime, after a lag close, and a resync that reaches the application.
import { describe, test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { connect, compareCursors } from "../src/client.js";
import {
  TRANSPORTS,
  scratchDb,
  serve,
  sql,
  unique,
  until,
  sleep,
  freePort,
  publishSql,
  bounded,
} from "./support/helpers.js";

/** A transaction that holds a txid until `commit()`. */
async function openTransaction(t, db) {
  const psql = spawn("psql", ["-X", "-qAt", "-v", "ON_ERROR_STOP=1", db], { stdio: ["pipe", "pipe", "inherit"] });
  const exited = new Promise((resolve) => psql.once("exit", resolve));
  t.after(() => psql.kill());
  psql.stdin.write("BEGIN;\nSELECT pg_current_xact_id();\n");
  await bounded(new Promise((resolve) => psql.stdout.once("data", resolve)), "the open transaction");
  return {
    async commit() {
      psql.stdin.end("COMMIT;\n");
      await bounded(exited, "psql to exit");
    },
  };
}

/** Deliveries the server dropped for lagging subscribers (its /metrics). */
async function dropped(server) {
  const text = await (await fetch(`${server.url}/metrics`)).text();
  return Number(/^pgpubsub_dropped_total (\d+)/m.exec(text)?.[1] ?? 0);
}
const fast = { backoffMin: 50, backoffMax: 400 };

for (const [name, options] of TRANSPORTS) {
  describe(`over ${name}`, () => {
    test("exactly once, in order, across two server kills with a writer running throughout", async (t) => {
      const db = await scratchDb(t);
      const ch = unique("restart");
      const port = await freePort();
      let server = await serve(t, db, { channels: ch, port });
      const client = connect(server.url, { ...options, ...fast });
      t.after(() => client.close());
      const got = [];
      const states = [];
      const sub = client.subscribe({ channels: [ch] }, (e) => got.push(e.payload), {
        onState: (s) => states.push(s),
      });
      await bounded(sub.ready, "subscribed");

      // One writer, one event per transaction: commit order is write order.
      const written = [];
      let writing = true;
      const writer = (async () => {
        for (let i = 0; writing; i++) {
          await publishSql(db, ch, [`w ${i}`]);
          written.push(`w ${i}`);
        }
      })();
      for (let round = 0; round < 2; round++) {
        const before = written.length;
        await until(() => written.length >= before + 10 && got.length >= before + 5, "events flowing");
        await server.stop("SIGKILL");
        await until(() => sub.state === "reconnecting", "the drop noticed");
        const during = written.length;
        await until(() => written.length >= during + 10, "writes during the downtime");
        server = await serve(t, db, { channels: ch, port });
        await until(() => sub.state === "open", "reconnected");
      }
      const after = written.length;
      await until(() => written.length >= after + 10, "writes after the last restart");
      writing = false;
      await writer;
      await until(() => got.length >= written.length, `all ${written.length} events (got ${got.length})`);
      await sleep(300); // nothing more comes
      assert.deepEqual(got, written);
      assert.ok(sub.stats.reconnects >= 2);
      assert.deepEqual(
        states.filter((s, i) => s !== states[i - 1]),
        ["open", "reconnecting", "open", "reconnecting", "open"],
      );
    });

    test("what a resume repeats (a long transaction held the position back) is dropped", async (t) => {
      const db = await scratchDb(t);
      const ch = unique("held");
      const port = await freePort();
      let server = await serve(t, db, { channels: ch, port });
      const client = connect(server.url, { ...options, ...fast });
      t.after(() => client.close());
      const got = [];
      const sub = client.subscribe({ channels: [ch] }, (e) => got.push(e.payload));
      await bounded(sub.ready, "subscribed");
      // A transaction with a txid stays open: no position can pass it.
      const open = await openTransaction(t, db);
      await publishSql(db, ch, ["a", "b", "c"]);
      await until(() => got.length === 3, "the events, live");
      await server.stop("SIGKILL");
      server = await serve(t, db, { channels: ch, port });
      await until(() => sub.state === "open", "reconnected");
      await client.publish(ch, "d");
      await until(() => got.length >= 4, "the event after the restart");
      await open.commit();
      await client.publish(ch, "e");
      await until(() => got.length >= 5, "the event after the commit");
      await sleep(300);
      assert.deepEqual(got, ["a", "b", "c", "d", "e"]);
      // The server replayed a, b and c from the log; the client had them.
      assert.equal(sub.stats.duplicates, 3);
    });

    test("a subscriber that got nothing before a restart still gets what was written while the server was down", async (t) => {
      const db = await scratchDb(t);
      const ch = unique("quiet");
      const port = await freePort();
      let server = await serve(t, db, { channels: ch, port });
      const client = connect(server.url, { ...options, ...fast });
      t.after(() => client.close());
      const got = [];
      const sub = client.subscribe({ channels: [ch] }, (e) => got.push(e.payload));
      await bounded(sub.ready, "subscribed");
      const start = sub.position;
      assert.ok(start, "the gateway said where the subscription starts");
      await server.stop("SIGTERM");
      await publishSql(db, ch, ["while down"]);
      server = await serve(t, db, { channels: ch, port });
      await until(() => got.length === 1, "the event written while down");
      assert.deepEqual(got, ["while down"]);

      // `since`: a new subscription from a known position gets what came after it.
      const again = [];
      const from = client.subscribe({ channels: [ch], since: start }, (e) => again.push(e.payload));
      await until(() => again.length === 1, "the replay from since");
      await client.publish(ch, "live");
      await until(() => again.length === 2 && got.length === 2, "the live event on both");
      assert.deepEqual(again, ["while down", "live"]);
      assert.equal(compareCursors(from.position, "0:0") > 0, true);
    });

    test("a lagged subscriber is closed by the server, resumes, and misses nothing", async (t) => {
      const db = await scratchDb(t);
      const ch = unique("lag");
      const server = await serve(t, db, { channels: ch, args: ["--queue", "4"] });
      const client = connect(server.url, { ...options, ...fast });
      t.after(() => client.close());
      const got = [];
      const lags = [];
      let stalled = false;
      const sub = client.subscribe(
        { channels: [ch] },
        async (e) => {
          // The first event takes long: the socket fills, the server's queue
          // for this subscriber fills, and it drops for it (and will say so).
          if (!stalled) {
            stalled = true;
            await until(async () => (await dropped(server)) > 0, "the server dropping for the stalled subscriber");
          }
          got.push(Number(e.payload.split(":")[0]));
        },
        { onLagged: (info) => lags.push(info) },
      );
      await bounded(sub.ready, "subscribed");
      const n = 600;
      await sql(db, `SELECT pubsub.publish('${ch}', i || ':' || repeat('x', 32768)) FROM generate_series(1, ${n}) i`);
      await until(() => got.length >= n, `all ${n} events (got ${got.length})`, 60_000);
      await sleep(300);
      assert.equal(got.length, n);
      assert.deepEqual(
        got,
        Array.from({ length: n }, (_, i) => i + 1),
      );
      assert.ok(lags.length >= 1, "told it lagged");
      assert.ok(lags[0].missed > 0 && /^\d+:\d+$/.test(lags[0].resume), JSON.stringify(lags[0]));
      assert.equal(sub.stats.lags, lags.length);
    });

    test("events pruned while the client was away reach onResync, then delivery goes on", async (t) => {
      const db = await scratchDb(t);
      const ch = unique("resync");
      const port = await freePort();
      let server = await serve(t, db, { channels: ch, port });
      const client = connect(server.url, { ...options, ...fast });
      t.after(() => client.close());
      const got = [];
      const resyncs = [];
      const sub = client.subscribe({ channels: [ch] }, (e) => got.push(e.payload), {
        onResync: (info) => resyncs.push({ ...info, seen: got.length }),
      });
      await bounded(sub.ready, "subscribed");
      await client.publish(ch, "kept");
      await until(() => got.length === 1, "the first event");
      await server.stop("SIGKILL");
      await publishSql(db, ch, ["lost 1", "lost 2", "lost 3"]);
      assert.equal(await sql(db, "SELECT pubsub.prune(NULL, 0)"), "4");
      server = await serve(t, db, { channels: ch, port });
      await until(() => resyncs.length === 1, "the resync callback");
      await client.publish(ch, "after");
      await until(() => got.length === 2, "the event after the resync");
      assert.deepEqual(got, ["kept", "after"]);
      assert.equal(resyncs[0].seen, 1, "the resync came in order, before later events");
      assert.match(resyncs[0].cursor, /^\d+:\d+$/);
      assert.ok(compareCursors(resyncs[0].pruned, resyncs[0].cursor) > 0);
      assert.ok(compareCursors(sub.position, resyncs[0].pruned) >= 0, "the position moved past what was pruned");
      assert.equal(sub.stats.resyncs, 1);
    });
  });
}
