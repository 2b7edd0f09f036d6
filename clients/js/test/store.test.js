// The event-sourced store: typed results, the 409 conflict as its own error,
// and every write seen as an event on pubsub_store.
import { test } from "node:test";
import assert from "node:assert/strict";
import { connect, ConflictError, RefusedError, AuthError } from "../src/client.js";
import { scratchDb, serve, unique, until, sign, nowS, bounded } from "./support/helpers.js";

test("put with an expected version, get, remove, history; a conflict is a ConflictError", async (t) => {
  const db = await scratchDb(t);
  const server = await serve(t, db, { channels: "pubsub_store" });
  const client = connect(server.url);
  t.after(() => client.close());
  const changes = [];
  const sub = client.subscribe({ channels: ["pubsub_store"] }, (e) => changes.push(e));
  await bounded(sub.ready, "subscribed");

  const todos = client.store("todos");
  const id = unique("todo");
  assert.deepEqual(await todos.put(id, { title: "write docs" }, { expected: 0 }), { version: 1 });
  assert.deepEqual(await todos.put(id, { title: "write more docs" }), { version: 2 });
  const stale = await todos.put(id, { title: "stale" }, { expected: 1 }).catch((e) => e);
  assert.ok(stale instanceof ConflictError, String(stale));
  assert.equal(stale.status, 409);
  await assert.rejects(todos.put(id, { title: "new" }, { expected: 0 }), ConflictError);
  assert.deepEqual(await todos.get(id), { version: 2, val: { title: "write more docs" } });
  assert.deepEqual(await todos.put(id, { title: "done" }, { expected: 2 }), { version: 3 });
  assert.deepEqual(await todos.remove(id), { version: 4 });
  assert.equal(await todos.get(id), null);
  assert.equal(await todos.remove(id), null);
  const history = await todos.history(id);
  assert.deepEqual(
    history.map((h) => [h.version, h.kind, h.val]),
    [
      [1, "put", { title: "write docs" }],
      [2, "put", { title: "write more docs" }],
      [3, "put", { title: "done" }],
      [4, "delete", null],
    ],
  );
  assert.ok(history.every((h) => typeof h.ts === "string"));
  // Names that need escaping in a URL.
  const odd = client.store("a bucket/with slash");
  assert.deepEqual(await odd.put("id?#%", [1, 2, 3]), { version: 1 });
  assert.deepEqual(await odd.get("id?#%"), { version: 1, val: [1, 2, 3] });

  await until(() => changes.length === 5, "the store's writes as events");
  assert.deepEqual(
    changes.map((e) => e.op),
    ["INSERT", "UPDATE", "UPDATE", "DELETE", "INSERT"],
  );
});

test("the store asks for the pubsub_store claims", async (t) => {
  const db = await scratchDb(t);
  const secret = "a-test-secret-of-at-least-32-bytes!!";
  const server = await serve(t, db, { channels: "pubsub_store", env: { PGPUBSUB_JWT_SECRET: secret } });
  const reader = connect(server.url, { token: sign(secret, { exp: nowS() + 60, read: ["pubsub_store"] }) });
  const writer = connect(server.url, {
    token: () => sign(secret, { exp: nowS() + 60, read: ["pubsub_store"], write: ["pubsub_store"] }),
  });
  const anonymous = connect(server.url);
  await assert.rejects(anonymous.store("b").get("x"), AuthError);
  await assert.rejects(reader.store("b").put("x", 1), RefusedError);
  assert.deepEqual(await writer.store("b").put("x", 1), { version: 1 });
  assert.deepEqual(await reader.store("b").get("x"), { version: 1, val: 1 });
});
