// Compiled (not run) by `npm test`: the types describe the API as the README uses it.
import { connect, compareCursors, ConflictError, AuthError, type PubSubEvent, type Position } from "pgpubsub-client";

interface Order {
  id: number;
  item: string;
  qty: number;
}

export async function example(): Promise<void> {
  const client = connect("http://127.0.0.1:8080", {
    token: async ({ refresh }) => (refresh ? "fresh" : "cached"),
    WebSocket: globalThis.WebSocket,
    backoffMax: 5000,
  });
  let saved: Position | null = null;
  const sub = client.subscribe<Order>(
    { channels: ["orders"], table: "orders", ops: ["INSERT", "update"], where: { item: "tea" }, since: saved },
    async (event: PubSubEvent<Order>, { position }) => {
      if (event.kind === "change") {
        const qty: number | undefined = event.new?.qty;
        void qty;
      } else if (event.kind === "message") {
        const text: string = event.payload;
        void text;
      }
      saved = position;
    },
    {
      onResync: ({ cursor, pruned }) => console.log(cursor, pruned),
      onLagged: ({ missed }) => console.log(missed),
      onState: (state) => console.log(state satisfies "connecting" | "open" | "reconnecting" | "closed" | "failed"),
      onError: (e) => {
        if (e instanceof AuthError) console.log(e.status);
      },
    },
  );
  await sub.ready;
  const stop = sub.onState((s, d) => console.log(s, d.delay));
  stop();
  const p: string | null = sub.position;
  if (p) compareCursors(p, "0:0");
  const { seq }: { seq: number } = await client.publish("orders", { any: "json" });
  void seq;

  const todos = client.store<{ title: string }>("todos");
  const { version } = await todos.put("1", { title: "write docs" }, { expected: 0 });
  try {
    await todos.put("1", { title: "again" }, { expected: version - 1 });
  } catch (e) {
    if (!(e instanceof ConflictError)) throw e;
  }
  const current = await todos.get("1");
  const title: string | undefined = current?.val.title;
  void title;
  const removed = await todos.remove("1");
  void removed?.version;
  for (const h of await todos.history("1")) console.log(h.kind, h.val?.title, h.ts);
  client.onState((state, subscription) => console.log(state, subscription.stats.duplicates));
  type Order = { id: number; item: string; qty: number };
  const paid = client.shape<Order>(
    { table: "orders", where: "status = 'paid'", columns: ["item", "qty"] },
    { onChange: (event, shape) => console.log(event.op, event.view, shape.rows.size), onReady: (shape) => void shape },
  );
  const ready = await paid.ready;
  for (const order of ready.rows.values()) console.log(order.item.length + order.qty);
  console.log(paid.stats.inconsistent, paid.subscription.position);
  paid.close();
  sub.close();
  await sub.done;
  client.close();
}
