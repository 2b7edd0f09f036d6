// Silent drops: the connection goes dead without a word (a proxy stops
// forwarding; no FIN, no RST), as after a NAT timeout or a mobile hand-over.
// The client notices the silence (idleTimeout), reconnects and resumes with
// every event exactly once; the server notices too (a WebSocket's missing
// pongs, an SSE stream's stalled writes) and closes its end.
import { describe, test } from "node:test";
import assert from "node:assert/strict";
import { get } from "node:http";
import { connect } from "../src/client.js";
import { TRANSPORTS, scratchDb, serve, unique, until, sql, WAIT } from "./support/helpers.js";
import { freezingProxy } from "./support/proxy.js";

/** The server's heartbeat and timeout, short for the test. */
const HEARTBEAT = ["--heartbeat", "1s", "--heartbeat-timeout", "3s"];
const IDLE = 3_000;

/** A metric of the server, read on a connection of its own that closes after. */
function metric(server, pattern) {
  return new Promise((resolve, reject) => {
    get(`${server.url}/metrics`, { agent: false }, (res) => {
      let text = "";
      res.setEncoding("utf8");
      res.on("data", (c) => (text += c));
      res.on("end", () => resolve(Number(pattern.exec(text)?.[1] ?? NaN)));
    }).on("error", reject);
  });
}
const OPEN = /^pgpubsub_open_connections (\d+)/m;
const SILENT = /^pgpubsub_dead_connections_total\{reason="silent"\} (\d+)/m;

for (const [name, options] of TRANSPORTS) {
  describe(`over ${name}`, () => {
    test("a connection gone silent is replaced within idleTimeout, every event exactly once; the server drops its end", async (t) => {
      const db = await scratchDb(t);
      const ch = unique("silent");
      const server = await serve(t, db, { channels: ch, args: HEARTBEAT });
      const proxy = await freezingProxy(t, server.url);
      const client = connect(proxy.url, { ...options, idleTimeout: IDLE, backoffMin: 50, backoffMax: 400 });
      t.after(() => client.close());
      const got = [];
      const reasons = [];
      const sub = client.subscribe({ channels: [ch] }, (e) => got.push(e.payload), {
        onState: (s, { reason }) => s === "reconnecting" && reasons.push(reason),
      });
      await until(() => sub.state === "open", "subscribed");
      const written = [];
      let batches = 0;
      const write = async (prefix, n, size = 0) => {
        prefix = `${prefix}${batches++}`;
        await sql(
          db,
          `SELECT count(pubsub.publish('${ch}', '${prefix} ' || i || ' ' || repeat('x', ${size})))
           FROM generate_series(0, ${n - 1}) i`,
        );
        written.push(...Array.from({ length: n }, (_, i) => `${prefix} ${i} ${"x".repeat(size)}`));
      };
      await write("before", 20);
      await until(() => got.length === 20, "the events before the freeze");
      // The subscriber's connection (through the proxy) and the scrape's own.
      const before = await until(async () => (await metric(server, OPEN)) || false, "the open connections");
      assert.equal(proxy.freeze(), 1, "the subscriber's connection froze");

      await write("during", 20);
      await until(() => reasons.includes("idle"), "the silence noticed", IDLE + WAIT);
      await until(() => sub.state === "open", "resubscribed");
      await write("after", 20);
      await until(() => got.length >= written.length, `all ${written.length} events (got ${got.length})`);

      // The server's end of the frozen connection: a WebSocket's pongs stop
      // (dropped within timeout + heartbeat); an SSE stream has no upstream,
      // so it is dropped once its writes back up for the timeout: write
      // until they do.
      await until(async () => {
        if ((await metric(server, OPEN)) <= before) return true;
        if (name === "sse") await write("filler", 16, 32_768);
        return false;
      }, "the server to drop the frozen connection");
      if (name === "websocket") assert.ok((await metric(server, SILENT)) >= 1, "counted as silent");

      // Nothing more comes: a fence, written last, is the last event.
      await write("fence", 1);
      await until(() => got.length >= written.length, "the fence");
      assert.deepEqual(got, written);
      assert.deepEqual(reasons, ["idle"], "reconnected once, because of the silence");
    });
  });
}

test("a quiet WebSocket is not taken as dead: heartbeats keep it open past idleTimeout", async (t) => {
  const db = await scratchDb(t);
  const ch = unique("quiet");
  const server = await serve(t, db, { channels: ch, args: HEARTBEAT });
  const client = connect(server.url, { ...TRANSPORTS[0][1], idleTimeout: IDLE });
  t.after(() => client.close());
  const got = [];
  const sub = client.subscribe({ channels: [ch] }, (e) => got.push(e.payload));
  await until(() => sub.state === "open", "subscribed");
  // Quiet for twice idleTimeout, measured by the server's own heartbeats
  // (the fence: a count of them), not by a sleep.
  const beats = await heartbeatsSeen(t, server, ch, 2 * Math.ceil(IDLE / 1000) + 1);
  assert.ok(beats > 6);
  await sql(db, `SELECT pubsub.publish('${ch}', 'still here')`);
  await until(() => got.length === 1, "the event after the quiet");
  assert.equal(sub.stats.reconnects, 0);
  assert.equal(sub.state, "open");
});

/** Waits, on a WebSocket of its own, for `n` heartbeats of the server. */
async function heartbeatsSeen(t, server, ch, n) {
  const { WebSocket } = await import("ws");
  const ws = new WebSocket(server.url.replace("http", "ws") + "/ws");
  t.after(() => ws.terminate());
  let beats = 0;
  ws.on("open", () => ws.send(JSON.stringify({ channels: [ch] })));
  ws.on("message", (m) => {
    if (JSON.parse(m.toString()).type === "heartbeat") beats += 1;
  });
  await until(() => beats >= n, `${n} heartbeats`, n * 1000 + WAIT);
  return beats;
}
