// A TCP proxy that can freeze: `freeze()` makes every connection open now go
// silent, both ways, for good. Nothing is forwarded, nothing is closed: no
// FIN, no RST, and the proxy stops reading, so the sender's writes back up
// as they would into a dead network path. It is what a NAT timeout, a
// sleeping laptop or a mobile hand-over looks like to both ends. Connections
// made after a freeze are forwarded normally.
import { createServer, connect } from "node:net";
import { bounded } from "./helpers.js";

/**
 * A proxy on 127.0.0.1 to `target` ("host:port" or a URL), closed when the
 * test ends. `url`: its address as an http URL.
 */
export async function freezingProxy(t, target) {
  const { hostname, port } = new URL(target.includes("://") ? target : `http://${target}`);
  const live = new Set(); // pairs still forwarding
  const frozen = []; // pairs kept open, silent, until the end
  const server = createServer({ pauseOnConnect: true }, (client) => {
    const upstream = connect({ host: hostname, port: Number(port) });
    const pair = { client, upstream };
    live.add(pair);
    const forward = (from, to) => {
      from.on("data", (chunk) => {
        if (live.has(pair)) to.write(chunk);
      });
      // An end or error of one side ends the other, unless frozen: then
      // nothing gets through, not even that.
      from.on("end", () => live.has(pair) && to.end());
      from.on("error", () => live.has(pair) && to.destroy());
      from.on("close", () => live.has(pair) && to.destroy());
    };
    forward(client, upstream);
    forward(upstream, client);
    upstream.once("connect", () => client.resume());
  });
  await new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen(0, "127.0.0.1", resolve);
  });
  const address = server.address();
  t.after(async () => {
    for (const { client, upstream } of [...live, ...frozen]) {
      client.destroy();
      upstream.destroy();
    }
    await bounded(new Promise((resolve) => server.close(resolve)), "the proxy to close");
  });
  return {
    url: `http://127.0.0.1:${address.port}`,
    port: address.port,
    /** Connections forwarding now. */
    get open() {
      return live.size;
    },
    /** Silences every connection open now; returns how many. */
    freeze() {
      const n = live.size;
      for (const pair of live) {
        pair.client.pause();
        pair.upstream.pause();
        frozen.push(pair);
      }
      live.clear();
      return n;
    },
  };
}
