//! Fan-out through the hub: one event to N subscribers on one channel, the
//! subscribers' queues drained after each batch (as their tasks would).
//! Measures the hub itself (filter, one `Arc` per delivery, a queue push),
//! not any network: deliveries per second is N × events per second.
//!
//! `cargo bench -p pgpubsub --bench fanout`

#![allow(missing_docs, clippy::unwrap_used)]

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use pgpubsub::{Event, Filter, Hub};

fn event(seq: i64) -> Event {
    let text = format!(
        r#"{{"seq":{seq},"txid":1,"kind":"change","channel":"orders","op":"INSERT","schema":"public","table":"orders","key":{{"id":{seq}}},"new":{{"id":{seq},"item":"tea","qty":2}},"old":null}}"#
    );
    Event::decode("orders", text).unwrap()
}

fn fanout(c: &mut Criterion) {
    let mut g = c.benchmark_group("fanout");
    const BATCH: usize = 64;
    for subscribers in [10usize, 1_000] {
        let hub = Hub::new(BATCH);
        let mut subs: Vec<_> = (0..subscribers).map(|_| hub.subscribe(Filter::channels(["orders"]))).collect();
        let events: Vec<Event> = (0..BATCH as i64).map(event).collect();
        g.throughput(Throughput::Elements((subscribers * BATCH) as u64));
        g.bench_with_input(BenchmarkId::new("deliveries", subscribers), &subscribers, |b, _| {
            b.iter(|| {
                for e in &events {
                    black_box(hub.publish(e.clone()));
                }
                for s in subs.iter_mut() {
                    while let Some(d) = s.try_recv() {
                        black_box(d);
                    }
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, fanout);
criterion_main!(benches);
