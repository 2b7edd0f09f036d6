// JWT: a refused token is refreshed once (4401 / 401), an expired one is
// refreshed and nothing is lost, a token refused twice is an AuthError.
import { describe, test } from "node:test";
import assert from "node:assert/strict";
import { connect, AuthError, RefusedError } from "../src/client.js";
import { TRANSPORTS, scratchDb, serve, unique, until, sleep, sign, nowS, bounded } from "./support/helpers.js";

const SECRET = "a-test-secret-of-at-least-32-bytes!!";
const OTHER = "another-secret-of-at-least-32-bytes!";
const fast = { backoffMin: 50, backoffMax: 400 };

async function secured(t, ch) {
  const db = await scratchDb(t);
  return serve(t, db, { channels: ch, env: { PGPUBSUB_JWT_SECRET: SECRET } });
}

const claims = (ch, exp = nowS() + 3600) => ({ exp, read: [ch], write: [ch] });

for (const [name, options] of TRANSPORTS) {
  describe(`over ${name}`, () => {
    test("a refused token calls the token function again once, then the subscription works", async (t) => {
      const ch = unique("auth");
      const server = await secured(t, ch);
      const calls = [];
      const client = connect(server.url, {
        ...options,
        ...fast,
        token: async ({ refresh }) => {
          calls.push(refresh);
          // The first one is signed with a secret the server does not know.
          return sign(calls.length === 1 ? OTHER : SECRET, claims(ch));
        },
      });
      t.after(() => client.close());
      const got = [];
      const sub = client.subscribe({ channels: [ch] }, (e) => got.push(e.payload));
      await bounded(sub.ready, "subscribed after the refresh");
      assert.deepEqual(calls, [false, true]);
      await client.publish(ch, "authorized");
      await until(() => got.length === 1, "the event");
      assert.deepEqual(got, ["authorized"]);
    });

    test("a token refused twice gives up with AuthError; a fixed token gives up at once", async (t) => {
      const ch = unique("denied");
      const server = await secured(t, ch);
      let calls = 0;
      const client = connect(server.url, {
        ...options,
        ...fast,
        token: () => {
          calls += 1;
          return sign(OTHER, claims(ch));
        },
      });
      t.after(() => client.close());
      const errors = [];
      const states = [];
      const sub = client.subscribe({ channels: [ch] }, () => {}, {
        onError: (e) => errors.push(e),
        onState: (s) => states.push(s),
      });
      await assert.rejects(bounded(sub.done, "giving up"), AuthError);
      assert.equal(calls, 2);
      assert.equal(sub.state, "failed");
      assert.equal(states.at(-1), "failed");
      assert.ok(errors.length === 1 && errors[0] instanceof AuthError);

      const fixed = connect(server.url, { ...options, ...fast, token: sign(OTHER, claims(ch)) });
      const once = fixed.subscribe({ channels: [ch] }, () => {});
      await assert.rejects(bounded(once.done, "giving up"), AuthError);
      const none = connect(server.url, { ...options, ...fast });
      await assert.rejects(none.publish(ch, "x"), (e) => e instanceof AuthError && e.status === 401);
      // Allowed to read, not to write this channel: refused, not unauthorized.
      const reader = connect(server.url, { ...options, token: sign(SECRET, { exp: nowS() + 60, read: [ch] }) });
      await assert.rejects(reader.publish(ch, "x"), (e) => e instanceof RefusedError && e.status === 403);
    });

    test("an expiring token is refreshed when the server closes the stream; nothing is lost", async (t) => {
      const ch = unique("expiry");
      const server = await secured(t, ch);
      const calls = [];
      const client = connect(server.url, {
        ...options,
        ...fast,
        token: ({ refresh }) => {
          calls.push(refresh);
          // The first token expires in 2 s; later ones in an hour.
          return sign(SECRET, claims(ch, nowS() + (calls.length === 1 ? 2 : 3600)));
        },
      });
      t.after(() => client.close());
      const got = [];
      const states = [];
      const sub = client.subscribe({ channels: [ch] }, (e) => got.push(e.payload), {
        onState: (s) => states.push(s),
      });
      await bounded(sub.ready, "subscribed");
      const sent = [];
      const until4s = Date.now() + 4000;
      for (let i = 0; Date.now() < until4s; i++) {
        await client.publish(ch, `e ${i}`);
        sent.push(`e ${i}`);
        await sleep(50);
      }
      await until(() => got.length >= sent.length, `all ${sent.length} events`);
      await sleep(200);
      assert.deepEqual(got, sent);
      assert.equal(calls[0], false);
      assert.ok(calls.includes(true), `refreshed: ${JSON.stringify(calls)}`);
      assert.ok(states.includes("reconnecting") && states.at(-1) === "open", states.join(","));
    });
  });
}

test("HTTP calls refresh a refused token once too", async (t) => {
  const ch = unique("httpauth");
  const server = await secured(t, ch);
  const calls = [];
  const client = connect(server.url, {
    token: async ({ refresh }) => {
      calls.push(refresh);
      return sign(calls.length === 1 ? OTHER : SECRET, claims(ch));
    },
  });
  const { seq } = await client.publish(ch, "after one refusal");
  assert.ok(seq > 0);
  assert.deepEqual(calls, [false, true]);
});
