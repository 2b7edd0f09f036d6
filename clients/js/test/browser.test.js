// In a real browser: headless Chromium (Debian's package, driven by
// playwright-core; nothing is downloaded) loads a page that imports
// /client.js from the gateway and receives events across a server restart.
import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { chromium } from "playwright-core";
import { scratchDb, serve, unique, freePort, publishSql, WAIT } from "./support/helpers.js";
import { freezingProxy } from "./support/proxy.js";

const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";
const missing = !existsSync(CHROMIUM);
if (missing && process.env.CI) throw new Error(`no Chromium at ${CHROMIUM}: apt-get install chromium`);

// Added to the gateway's own page (same origin, so `import "/client.js"`
// is a same-origin module import; Chromium's local network access checks
// would block a page from elsewhere reaching 127.0.0.1).
const SCRIPT = (channel, options = {}) => `
import { connect } from "/client.js";
window.got = []; window.states = [];
const client = connect(undefined, ${JSON.stringify(options)});
window.sub = client.subscribe({ channels: [${JSON.stringify(channel)}] }, (e) => window.got.push(e.payload), {
  onState: (s) => window.states.push(s),
});`;

test("a page importing /client.js receives events across a server restart", { skip: missing && "no Chromium" }, async (t) => {
  const db = await scratchDb(t);
  const ch = unique("browser");
  const port = await freePort();
  let server = await serve(t, db, { channels: ch, port });
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
  });
  t.after(() => browser.close());
  const page = await browser.newPage();
  page.setDefaultTimeout(WAIT);
  const errors = [];
  page.on("pageerror", (e) => errors.push(e));
  const sockets = [];
  page.on("websocket", (ws) => sockets.push(ws.url()));
  await page.goto(`${server.url}/`);
  await page.addScriptTag({ type: "module", content: SCRIPT(ch) });
  const state = () => page.evaluate(() => window.sub?.state);
  await page.waitForFunction(() => window.sub?.state === "open");

  await publishSql(db, ch, ["hello browser"]);
  await page.waitForFunction(() => window.got.length === 1);

  await server.stop("SIGKILL");
  await page.waitForFunction(() => window.sub.state !== "open");
  await publishSql(db, ch, ["while the server was down"]);
  server = await serve(t, db, { channels: ch, port });
  await page.waitForFunction(() => window.sub.state === "open");
  await publishSql(db, ch, ["after the restart"]);
  await page.waitForFunction(() => window.got.length >= 3);
  await page.waitForTimeout(300);

  const got = await page.evaluate(() => window.got);
  assert.deepEqual(got, ["hello browser", "while the server was down", "after the restart"]);
  assert.equal(await state(), "open");
  assert.deepEqual(errors, []);
  // The browser's own WebSocket, once per connection.
  assert.ok(sockets.length >= 2 && sockets.every((u) => u === `ws://127.0.0.1:${port}/ws`), sockets.join(" "));
});

test("a page whose WebSocket goes silent notices within idleTimeout and resumes, each event once", { skip: missing && "no Chromium" }, async (t) => {
  const db = await scratchDb(t);
  const ch = unique("browser_silent");
  const server = await serve(t, db, { channels: ch, args: ["--heartbeat", "1s", "--heartbeat-timeout", "3s"] });
  // The page, its module and its WebSocket all go through the proxy.
  const proxy = await freezingProxy(t, server.url);
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
  });
  t.after(() => browser.close());
  const page = await browser.newPage();
  page.setDefaultTimeout(WAIT);
  const errors = [];
  page.on("pageerror", (e) => errors.push(e));
  await page.goto(`${proxy.url}/`);
  await page.addScriptTag({ type: "module", content: SCRIPT(ch, { idleTimeout: 3000, backoffMin: 50, backoffMax: 400 }) });
  await page.waitForFunction(() => window.sub?.state === "open");
  await publishSql(db, ch, ["before"]);
  await page.waitForFunction(() => window.got.length === 1);

  assert.ok(proxy.freeze() >= 1);
  await publishSql(db, ch, ["during"]);
  await page.waitForFunction(() => window.states.includes("reconnecting"), null, { timeout: 3000 + WAIT });
  await page.waitForFunction(() => window.sub.state === "open");
  await publishSql(db, ch, ["after"]);
  await page.waitForFunction(() => window.got.length >= 3);
  // A fence: the last event written is the last one received.
  await publishSql(db, ch, ["fence"]);
  await page.waitForFunction(() => window.got.includes("fence"));
  assert.deepEqual(await page.evaluate(() => window.got), ["before", "during", "after", "fence"]);
  assert.deepEqual(errors, []);
});
