// Delivery, filters and publish, over each transport, against a real gateway.
import { describe, test } from "node:test";
import assert from "node:assert/strict";
import { connect, RefusedError, compareCursors } from "../src/client.js";
import { TRANSPORTS, scratchDb, serve, sql, unique, until, bounded, sleep } from "./support/helpers.js";

for (const [name, options] of TRANSPORTS) {
  describe(`over ${name}`, () => {
    test("changes and messages arrive in order, filtered, with positions; publish takes text and objects", async (t) => {
      const db = await scratchDb(t);
      const ch = unique("orders");
      await sql(db, `CREATE TABLE t (id int PRIMARY KEY, item text, qty int); SELECT pubsub.watch('t', '${ch}')`);
      const server = await serve(t, db, { channels: ch });
      const client = connect(server.url, options);
      t.after(() => client.close());

      const states = [];
      const all = [];
      const sub = client.subscribe({ channels: [ch] }, (e) => all.push(e), {
        onState: (s) => states.push(s),
      });
      const updates = [];
      const filtered = client.subscribe(
        { channels: [ch], table: "t", ops: ["update"], where: { item: "tea" } },
        (e) => updates.push(e),
      );
      const numeric = [];
      client.subscribe({ channels: ch, where: { qty: 2 } }, (e) => numeric.push(e));
      await bounded(Promise.all([sub.ready, filtered.ready]), "subscribed");
      assert.equal(sub.state, "open");
      assert.match(sub.position, /^\d+:\d+$/, "a position before any event");

      await sql(
        db,
        `INSERT INTO t VALUES (1, 'tea', 2);
         UPDATE t SET qty = 3 WHERE id = 1;
         INSERT INTO t VALUES (2, 'jam', 2);
         UPDATE t SET qty = 4 WHERE id = 2;
         DELETE FROM t WHERE id = 1;`,
      );
      const text = await client.publish(ch, "restock soon");
      assert.ok(Number.isInteger(text.seq) && text.seq > 0);
      const obj = await client.publish(ch, { restock: ["tea"], urgent: true });

      await until(() => all.length === 7, "7 events");
      assert.deepEqual(
        all.map((e) => [e.kind, e.op ?? null]),
        [
          ["change", "INSERT"],
          ["change", "UPDATE"],
          ["change", "INSERT"],
          ["change", "UPDATE"],
          ["change", "DELETE"],
          ["message", null],
          ["message", null],
        ],
      );
      const seqs = all.map((e) => e.seq);
      assert.deepEqual(seqs, [...seqs].sort((a, b) => a - b));
      assert.equal(all[0].table, "t");
      assert.deepEqual(all[0].new, { id: 1, item: "tea", qty: 2 });
      assert.deepEqual(all[4].old, { id: 1, item: "tea", qty: 3 });
      assert.equal(all[5].payload, "restock soon");
      assert.equal(all[5].seq, text.seq);
      assert.deepEqual(JSON.parse(all[6].payload), { restock: ["tea"], urgent: true });
      assert.equal(all[6].seq, obj.seq);

      await until(() => updates.length === 1 && numeric.length === 2, "the filtered events");
      assert.deepEqual(updates[0].new, { id: 1, item: "tea", qty: 3 });
      assert.deepEqual(
        numeric.map((e) => [e.op, e.new.id]),
        [
          ["INSERT", 1],
          ["INSERT", 2],
        ],
      );
      // The position moved with the events handed over.
      assert.ok(compareCursors(sub.position, "0:0") > 0);
      assert.equal(sub.stats.events, 7);
      assert.equal(sub.stats.duplicates, 0);

      sub.close();
      await bounded(sub.done, "done after close");
      assert.equal(sub.state, "closed");
      assert.deepEqual(states, ["open", "closed"]);
      await client.publish(ch, "after close");
      await sleep(300);
      assert.equal(all.length, 7, "no callback after close");
    });

    test("a request the server refuses fails the subscription with RefusedError", async (t) => {
      const db = await scratchDb(t);
      const ch = unique("served");
      const server = await serve(t, db, { channels: ch });
      const client = connect(server.url, options);
      t.after(() => client.close());
      assert.throws(() => client.subscribe({ since: "yesterday" }, () => {}), TypeError);
      const states = [];
      const sub = client.subscribe({ channels: ["not_served_here"] }, () => {}, { onState: (s) => states.push(s) });
      await assert.rejects(bounded(sub.done, "refusal"), RefusedError);
      await assert.rejects(sub.ready, RefusedError);
      assert.equal(sub.state, "failed");
      assert.deepEqual(states, ["failed"]);
      await assert.rejects(client.publish("not_served_here", "x"), (e) => e instanceof RefusedError && e.status === 403);
    });
  });
}

test("the gateway serves this very file at /client.js", async (t) => {
  const db = await scratchDb(t);
  const server = await serve(t, db, { channels: unique("js") });
  const res = await fetch(`${server.url}/client.js`);
  assert.equal(res.status, 200);
  assert.match(res.headers.get("content-type"), /^text\/javascript/);
  const { readFile } = await import("node:fs/promises");
  const source = await readFile(new URL("../src/client.js", import.meta.url), "utf8");
  const served = await res.text();
  assert.ok(served === source, "the binary serves another version of src/client.js: rebuild it (cargo build)");
});
