// Events captured from the WAL (`watch --wal`, appended to the log by the
// gateway's own capturer, `serve --capture`) reach the client exactly once
// and in order, across two gateway kills with a writer running throughout.
// Needs a server with wal_level = logical: PGPUBSUB_LOGICAL_URL (CI starts
// one with scripts/logical-cluster); without it the test says so and skips.
import { describe, test } from "node:test";
import assert from "node:assert/strict";
import { connect } from "../src/client.js";
import { TRANSPORTS, scratchDb, serve, sql, unique, until, freePort, bounded } from "./support/helpers.js";

const LOGICAL = process.env.PGPUBSUB_LOGICAL_URL;
const skip = LOGICAL ? false : "PGPUBSUB_LOGICAL_URL is not set (a server with wal_level = logical; CI sets it)";
const fast = { backoffMin: 50, backoffMax: 400 };

for (const [name, options] of TRANSPORTS) {
  describe(`over ${name}`, () => {
    test("captured rows arrive once each, in order, across two gateway kills", { skip }, async (t) => {
      const db = await scratchDb(t, LOGICAL);
      await sql(db, "CREATE TABLE orders (id int PRIMARY KEY, item text)");
      await sql(db, "SELECT pubsub.watch_wal('orders')");
      // Slots are per cluster: each test's capturer a slot of its own.
      const env = { PGPUBSUB_CAPTURE_NAME: unique("js").toLowerCase().replace(/[^a-z0-9_]/g, "_").slice(0, 40) };
      const port = await freePort();
      const start = () => serve(t, db, { channels: "orders", args: ["--capture"], env, port });
      let server = await start();
      const client = connect(server.url, { ...options, ...fast });
      t.after(() => client.close());
      // Stopped before the database goes, pass or fail: the hooks drop the
      // database first, and a running capturer would keep its slot (and the
      // database) alive.
      let writing = true;
      try {
        const got = [];
        const sub = client.subscribe({ channels: ["orders"], table: "orders" }, (e) => got.push(e.new.id));
        await bounded(sub.ready, "subscribed");

        const written = [];
        const writer = (async () => {
          for (let i = 1; writing; i++) {
            await sql(db, `INSERT INTO orders VALUES (${i}, 'x')`);
            written.push(i);
          }
        })();
        for (let round = 0; round < 2; round++) {
          const before = written.length;
          await until(() => written.length >= before + 10 && got.length >= before + 5, "captured rows flowing");
          await server.stop("SIGKILL");
          await until(() => sub.state === "reconnecting", "the drop noticed");
          const during = written.length;
          await until(() => written.length >= during + 10, "rows written while the gateway is down");
          server = await start();
          await until(() => sub.state === "open", "reconnected");
        }
        const after = written.length;
        await until(() => written.length >= after + 10, "rows after the last restart");
        writing = false;
        await writer;
        await until(() => got.length >= written.length, `all ${written.length} rows`).catch(async (e) => {
          // What a failure needs to be understood: which rows, whether the
          // capturer put them in the log, and what the gateway said.
          const missing = written.filter((id) => !got.includes(id));
          const logged = await sql(
            db,
            `SELECT string_agg(format('%s:%s %s', txid, seq, body::json->'new'->>'id'), ', ' ORDER BY txid, seq)
             FROM pubsub.events WHERE channel = 'orders'`,
          ).catch((err) => String(err));
          e.message += `\ngot ${got.length}: ${got.join(",")}\nmissing: ${missing.join(",")}\nin the log: ${logged}`;
          e.message += `\nstate: ${sub.state}\ngateway log:\n${server.log.slice(-4000)}`;
          throw e;
        });
        // The fence: one more row, which must come right after the last.
        await sql(db, "INSERT INTO orders VALUES (0, 'fence')");
        await until(() => got.includes(0), "the fence row");
        assert.deepEqual(got, [...written, 0]);
      } finally {
        writing = false;
        client.close();
        await server.stop();
      }
    });
  });
}
