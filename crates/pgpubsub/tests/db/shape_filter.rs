//! The two evaluators of a shape's filter agree: on random rows and random
//! filters, `SELECT id FROM t WHERE <to_sql>` in PostgreSQL returns exactly
//! the rows for which `matches` (on the row's `row_to_json`) is true. NULLs,
//! extreme and negative numbers, NaN and infinities, unicode, empty strings
//! and `%`/`_`/`\` in text, BC dates, infinities and timestamps written
//! with a half-hour offset included. Shown able to fail by each of: NaN
//! ordered below every float, decimal fractions ignored, `_` in `like`
//! skipping a pattern character, a timestamp offset added instead of
//! subtracted, fractional seconds not scaled.
//!
//! (That any text or JSON gives the parsers a filter or an error, never a
//! panic, is fuzzed in `src/shape/fuzz.rs`.)

use pgpubsub::shape::{CompareOp, Filter, Literal};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use tokio_postgres::types::ToSql;

use crate::common::TestDb;

/// The table's columns, as `bind` takes them.
const COLUMNS: [(&str, &str); 12] = [
    ("i2", "smallint"),
    ("i4", "integer"),
    ("i8", "bigint"),
    ("n", "numeric"),
    ("s", "text"),
    ("v", "character varying(10)"),
    ("ok", "boolean"),
    ("d", "double precision"),
    ("r", "real"),
    ("dt", "date"),
    ("ts", "timestamp without time zone"),
    ("tz", "timestamp(3) with time zone"),
];

/// One row: every column nullable.
#[derive(Debug, Clone)]
struct Row {
    i2: Option<i16>,
    i4: Option<i32>,
    i8: Option<i64>,
    n: Option<String>,
    s: Option<String>,
    v: Option<String>,
    ok: Option<bool>,
    d: Option<f64>,
    r: Option<f32>,
    dt: Option<String>,
    ts: Option<String>,
    tz: Option<String>,
}

fn i2() -> impl Strategy<Value = i16> {
    prop_oneof![-3i16..3, Just(i16::MIN), Just(i16::MAX), any::<i16>()]
}
fn i4() -> impl Strategy<Value = i32> {
    prop_oneof![-3i32..3, Just(i32::MIN), Just(i32::MAX), any::<i32>()]
}
fn i8() -> impl Strategy<Value = i64> {
    prop_oneof![-3i64..3, Just(i64::MIN), Just(i64::MAX), any::<i64>()]
}
/// Numeric text: small, huge (beyond f64), tiny, and the special values.
fn numeric() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => (-3i32..3).prop_map(|n| n.to_string()),
        4 => ("-?[0-9]{1,3}", "[0-9]{0,3}").prop_map(|(i, f)| if f.is_empty() { i } else { format!("{i}.{f}") }),
        2 => ("-?[1-9][0-9]{15,25}", "[0-9]{1,8}").prop_map(|(i, f)| format!("{i}.{f}")),
        1 => "-?0\\.0{0,10}[1-9]",
        1 => prop::sample::select(vec!["NaN", "Infinity", "-Infinity", "0.0", "-0"]).prop_map(String::from),
    ]
}
/// Text with what `like` treats specially, unicode, and the empty string.
fn text() -> impl Strategy<Value = String> {
    "[ab%_\\\\é😀 ]{0,5}"
}
fn f8() -> impl Strategy<Value = f64> {
    prop_oneof![
        4 => (-3i32..3).prop_map(f64::from),
        2 => any::<f64>().prop_filter("finite", |f| f.is_finite()),
        1 => prop::sample::select(vec![f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -0.0, 0.1, 1e300, f64::MIN_POSITIVE]),
    ]
}
fn f4() -> impl Strategy<Value = f32> {
    prop_oneof![
        4 => (-3i32..3).prop_map(|n| n as f32),
        2 => any::<f32>().prop_filter("finite", |f| f.is_finite()),
        1 => prop::sample::select(vec![f32::NAN, f32::INFINITY, -0.0, 0.1, f32::MAX]),
    ]
}

/// Mostly a value, sometimes NULL.
fn o<S: Strategy>(values: S) -> impl Strategy<Value = Option<S::Value>> {
    prop::option::weighted(0.8, values)
}

/// A date a filter may hold (years 1 to 9999), mostly one of three days so
/// that rows and filters meet, within hours of each other.
fn date() -> impl Strategy<Value = String> {
    let near = (1u32..4).prop_map(|d| format!("2000-01-{d:02}"));
    let far = (1i32..10_000, 1u32..13, 1u32..29).prop_map(|(y, m, d)| format!("{y:04}-{m:02}-{d:02}"));
    prop_oneof![4 => near, 1 => far]
}
/// A time of day, mostly from a few that collide, with 0 to 6 fractional digits.
fn time() -> impl Strategy<Value = String> {
    let near = (
        prop::sample::select(vec![0u32, 23]),
        prop::sample::select(vec![0u32, 45]),
        prop::sample::select(vec![0u32, 59]),
        prop::sample::select(vec!["", ".5", ".50", ".000001", ".999999"]),
    )
        .prop_map(|(h, m, s, f)| format!("{h:02}:{m:02}:{s:02}{f}"));
    let far = (0u32..24, 0u32..60, 0u32..60, "[0-9]{0,6}").prop_map(|(h, m, s, f)| {
        if f.is_empty() {
            format!("{h:02}:{m:02}:{s:02}")
        } else {
            format!("{h:02}:{m:02}:{s:02}.{f}")
        }
    });
    prop_oneof![3 => near, 1 => far]
}
fn timestamp() -> impl Strategy<Value = String> {
    (date(), time()).prop_map(|(d, t)| format!("{d} {t}"))
}
fn timestamptz() -> impl Strategy<Value = String> {
    let offset = prop::sample::select(vec!["Z", "+00", "+05:30", "-08", "+14", "-03:30"]);
    (date(), time(), offset).prop_map(|(d, t, o)| format!("{d}T{t}{o}"))
}
/// Rows also hold what a filter cannot: BC, five-digit years, infinities.
fn or_odd(values: impl Strategy<Value = String>, odd: &'static [&'static str]) -> impl Strategy<Value = String> {
    prop_oneof![8 => values, 1 => prop::sample::select(odd).prop_map(String::from)]
}

fn row() -> impl Strategy<Value = Row> {
    let numbers = (o(i2()), o(i4()), o(i8()), o(numeric()), o(f8()), o(f4()));
    let texts = (o(text()), o(text()), o(any::<bool>()));
    let times = (
        o(or_odd(date(), &["0044-03-15 BC", "12345-01-02", "infinity", "-infinity", "2000-02-29"])),
        o(or_odd(timestamp(), &["0001-01-01 00:00:00 BC", "infinity", "-infinity"])),
        o(or_odd(timestamptz(), &["1900-01-01 00:00:00+00", "0044-03-15 12:00:00+00 BC", "infinity"])),
    );
    (numbers, texts, times).prop_map(|((i2, i4, i8, n, d, r), (s, v, ok), (dt, ts, tz))| Row {
        i2,
        i4,
        i8,
        n,
        s,
        v,
        ok,
        d,
        r,
        dt,
        ts,
        tz,
    })
}

/// A float literal: as a number when finite (Rust writes it in full, and it
/// reads back exactly), as a string otherwise.
fn float_literal(f: f64) -> Literal {
    if f.is_finite() {
        Literal::Number(f.to_string())
    } else {
        Literal::Text(if f.is_nan() {
            "NaN".into()
        } else if f > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        })
    }
}

/// A value for column `i` of [`COLUMNS`], drawn from the rows' own pools so
/// that equality holds often; numbers sometimes written as strings.
fn literal(column: usize) -> BoxedStrategy<Literal> {
    let number = |s: String| prop_oneof![Just(Literal::Number(s.clone())), Just(Literal::Text(s))];
    match column {
        0 => i2().prop_flat_map(move |n| number(n.to_string())).boxed(),
        1 => i4().prop_flat_map(move |n| number(n.to_string())).boxed(),
        2 => i8().prop_flat_map(move |n| number(n.to_string())).boxed(),
        3 => numeric()
            .prop_map(|n| if n.contains(char::is_alphabetic) { Literal::Text(n) } else { Literal::Number(n) })
            .boxed(),
        4 | 5 => text().prop_map(Literal::Text).boxed(),
        6 => any::<bool>().prop_map(Literal::Bool).boxed(),
        7 => f8().prop_map(float_literal).boxed(),
        8 => f4().prop_map(|f| float_literal(f64::from(f))).boxed(),
        9 => or_odd(date(), &["infinity", "-infinity"]).prop_map(Literal::Text).boxed(),
        10 => or_odd(timestamp(), &["infinity", "-infinity"]).prop_map(Literal::Text).boxed(),
        _ => or_odd(timestamptz(), &["infinity", "-infinity"]).prop_map(Literal::Text).boxed(),
    }
}

fn predicate() -> impl Strategy<Value = Filter> {
    let op = prop::sample::select(vec![
        CompareOp::Eq,
        CompareOp::Ne,
        CompareOp::Lt,
        CompareOp::Le,
        CompareOp::Gt,
        CompareOp::Ge,
    ]);
    (0..COLUMNS.len(), op, any::<bool>()).prop_flat_map(|(c, op, negated)| {
        let column = COLUMNS[c].0.to_string();
        let (col1, col2, col3) = (column.clone(), column.clone(), column.clone());
        let like = if c == 4 || c == 5 {
            "([ab%_é]|\\\\[%_\\\\a]){0,4}".prop_map(move |pattern| Filter::Like { column: col3.clone(), pattern }).boxed()
        } else {
            Just(Filter::IsNull { column: column.clone(), negated }).boxed()
        };
        prop_oneof![
            4 => literal(c).prop_map(move |value| Filter::Compare { column: col1.clone(), op, value }),
            1 => prop::collection::vec(literal(c), 1..4).prop_map(move |values| Filter::In { column: col2.clone(), values }),
            1 => Just(Filter::IsNull { column, negated }),
            2 => like,
        ]
    })
}

fn filter() -> impl Strategy<Value = Filter> {
    predicate().prop_recursive(4, 24, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 2..4).prop_map(Filter::And),
            prop::collection::vec(inner.clone(), 2..4).prop_map(Filter::Or),
            inner.prop_map(|f| Filter::Not(Box::new(f))),
        ]
    })
}

/// Significant digits of a JSON number: beyond 15, `serde_json::Value`
/// holds it as an inexact `f64`.
fn significant_digits(number: &str) -> usize {
    number.chars().filter(char::is_ascii_digit).collect::<String>().trim_start_matches('0').len()
}

#[test]
fn sql_and_matches_agree_on_random_rows_and_filters() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let db = rt.block_on(TestDb::new());
    let client = rt.block_on(db.client());
    // An odd time zone: timestamps are written with +05:45 (and, before
    // 1920, +05:41:16), which `matches` must read back as the same instant.
    rt.block_on(client.batch_execute(
        "SET timezone = 'Asia/Kathmandu';
         CREATE TABLE t (id int PRIMARY KEY, i2 smallint, i4 integer, i8 bigint, n numeric, s text,
                         v varchar(10), ok boolean, d double precision, r real,
                         dt date, ts timestamp, tz timestamptz(3))",
    ))
    .unwrap();
    let insert = rt
        .block_on(client.prepare(
            "INSERT INTO t (id, i2, i4, i8, n, s, v, ok, d, r, dt, ts, tz)
             VALUES ($1, $2, $3, $4, $5::text::numeric, $6, $7, $8, $9, $10, $11::text::date, $12::text::timestamp, $13::text::timestamptz)",
        ))
        .unwrap();
    let mut runner = TestRunner::new(Config { cases: 96, failure_persistence: None, ..Config::default() });
    // How many filters selected some rows but not all: the test is only as
    // good as the share of filters that are neither always nor never true.
    let discerning = std::cell::Cell::new(0);
    let case = (prop::collection::vec(row(), 0..24), prop::collection::vec(filter(), 1..12));
    let result = runner.run(&case, |(rows, filters)| {
        rt.block_on(async {
            client.batch_execute("TRUNCATE t").await.unwrap();
            for (id, r) in rows.iter().enumerate() {
                let id = id as i32;
                let params: [&(dyn ToSql + Sync); 13] =
                    [&id, &r.i2, &r.i4, &r.i8, &r.n, &r.s, &r.v, &r.ok, &r.d, &r.r, &r.dt, &r.ts, &r.tz];
                client.execute(&insert, &params).await.unwrap();
            }
            let stored = client.query("SELECT id, row_to_json(t)::text FROM t ORDER BY id", &[]).await.unwrap();
            let stored: Vec<(i32, String)> = stored.iter().map(|r| (r.get(0), r.get(1))).collect();
            for filter in &filters {
                prop_assert_eq!(&Filter::parse(&filter.to_string()).unwrap(), filter, "the text form reads back");
                let bound = filter.bind(&COLUMNS).map_err(|e| TestCaseError::fail(format!("{filter}: {e}")))?;
                let (sql, params) = bound.to_sql(1);
                let params: Vec<&(dyn ToSql + Sync)> =
                    params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync)).collect();
                let selected = client.query(&format!("SELECT id FROM t WHERE {sql} ORDER BY id"), &params).await;
                let selected: Vec<i32> = selected
                    .map_err(|e| TestCaseError::fail(format!("{sql}: {e}")))?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                let matched: Vec<i32> =
                    stored.iter().filter(|(_, json)| bound.matches_json(json).unwrap()).map(|(id, _)| *id).collect();
                prop_assert_eq!(&selected, &matched, "filter {} as {}", filter, sql);
                if !selected.is_empty() && selected.len() < stored.len() {
                    discerning.set(discerning.get() + 1);
                }
                for (id, json) in &stored {
                    let value: serde_json::Value = serde_json::from_str(json).unwrap();
                    let exact = value["n"].as_number().is_none_or(|n| significant_digits(&n.to_string()) <= 15);
                    if exact {
                        prop_assert_eq!(bound.matches(&value), selected.contains(id), "filter {} on {}", filter, json);
                    }
                }
            }
            Ok(())
        })
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    assert!(discerning.get() >= 100, "only {} filters told rows apart", discerning.get());
    eprintln!("{} filters told rows apart", discerning.get());
}
