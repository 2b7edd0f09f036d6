//! The listener's hot pieces, per event: classifying a payload, decoding an
//! event, and chunking then reassembling a large one. Each beside a bare
//! `serde_json::Value` parse of the same text, the baseline's one piece of
//! work, so results read as ratios on whatever machine runs them.
//!
//! `cargo bench -p pgpubsub --bench decode`

#![allow(missing_docs, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Instant;

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use pgpubsub::internals::{json_string, Logged};
use pgpubsub::reassembly::{Limits, Reassembler};
use pgpubsub::wire::{self, Frame, CHUNK_DATA_BYTES};
use pgpubsub::{Event, Stats};

/// A change event as the trigger writes it, with a row of `pad` bytes.
fn change(pad: usize) -> String {
    format!(
        r#"{{"seq":123456,"txid":987654,"kind":"change","channel":"orders","time":"2026-11-21T19:10:15.719946+00:00","op":"INSERT","schema":"public","table":"orders","key":{{"id":42}},"new":{{"id":42,"writer":3,"n":1234,"t":1763752215719946,"pad":"{}"}},"old":null}}"#,
        "x".repeat(pad)
    )
}

fn decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode");
    for pad in [100usize, 2_000] {
        let text = change(pad);
        g.throughput(Throughput::Elements(1));
        g.bench_with_input(BenchmarkId::new("baseline serde_json::Value", pad), &text, |b, t| {
            b.iter(|| black_box(serde_json::from_str::<serde_json::Value>(black_box(t)).unwrap()))
        });
        g.bench_with_input(BenchmarkId::new("wire::parse + Event::decode", pad), &text, |b, t| {
            b.iter(|| {
                let Ok(Frame::Whole(w)) = wire::parse(black_box(t)) else { unreachable!() };
                black_box(Event::decode("orders", w.to_string()).unwrap())
            })
        });
    }
    g.finish();
}

fn chunks(c: &mut Criterion) {
    let mut g = c.benchmark_group("chunks");
    for size in [64usize << 10, 1 << 20] {
        let text = change(size);
        g.throughput(Throughput::Bytes(text.len() as u64));
        g.bench_with_input(BenchmarkId::new("encode", size), &text, |b, t| {
            b.iter(|| black_box(wire::encode_chunks(1, black_box(t), CHUNK_DATA_BYTES)))
        });
        let frames = wire::encode_chunks(1, &text, CHUNK_DATA_BYTES);
        g.bench_with_input(BenchmarkId::new("parse + reassemble", size), &frames, |b, frames| {
            b.iter(|| {
                let mut r = Reassembler::new(Limits::default(), Arc::new(Stats::default()));
                let now = Instant::now();
                let mut out = None;
                for f in frames {
                    let Ok(Frame::Chunk(ch)) = wire::parse(f) else { unreachable!() };
                    out = r.push_chunk("orders", &ch, now).or(out);
                }
                black_box(out.unwrap())
            })
        });
        g.bench_with_input(BenchmarkId::new("baseline serde_json::Value", size), &text, |b, t| {
            b.iter(|| black_box(serde_json::from_str::<serde_json::Value>(black_box(t)).unwrap()))
        });
    }
    g.finish();
}

/// A message logged with its payload apart, rendered to the JSON delivered
/// (count, escape, build the event), beside serde_json escaping the same
/// payload and parsing the rendered JSON back: the two steps it replaces.
fn logged_apart(c: &mut Criterion) {
    let mut g = c.benchmark_group("logged_apart");
    let head =
        r#"{"seq":123456,"txid":987654,"kind":"message","channel":"orders","time":"2026-11-21T19:10:15.719946+00:00"}"#;
    for (name, payload) in [("plain 1 MiB", "x".repeat(1 << 20)), ("json 1 MiB", r#"{"k":"v\n"},"#.repeat(1 << 16))] {
        g.throughput(Throughput::Bytes(payload.len() as u64));
        let logged = Logged::new(head.to_string(), Some(payload.clone()));
        g.bench_with_input(BenchmarkId::new("Logged::into_event", name), &logged, |b, l| {
            b.iter(|| black_box(l.clone().into_event("orders", u64::MAX).unwrap()))
        });
        g.bench_with_input(BenchmarkId::new("json_string::len", name), &payload, |b, p| {
            b.iter(|| black_box(json_string::len(black_box(p.as_bytes()))))
        });
        g.bench_with_input(BenchmarkId::new("json_string::write", name), &payload, |b, p| {
            b.iter(|| {
                let mut out = String::with_capacity(p.len() * 2);
                json_string::write(&mut out, black_box(p));
                black_box(out)
            })
        });
        g.bench_with_input(BenchmarkId::new("baseline serde_json::to_string", name), &payload, |b, p| {
            b.iter(|| black_box(serde_json::to_string(black_box(p)).unwrap()))
        });
        let json = logged.clone().into_json().unwrap();
        g.bench_with_input(BenchmarkId::new("baseline clone + Event::decode", name), &json, |b, j| {
            b.iter(|| black_box(Event::decode("orders", j.clone()).unwrap()))
        });
    }
    g.finish();
}

criterion_group!(benches, decode, chunks, logged_apart);
criterion_main!(benches);
