//! Shapes: a table's rows that a subscriber wants, then every change to
//! them ([`Shape`]: a table, a filter, some columns; its snapshot and the
//! exact hand-over to the log, [`handover`]).
//!
//! The filter is a predicate over a row's columns in a small grammar of
//! pgpubsub's own (never SQL text from a client), with two evaluators that
//! agree row for row.
//!
//! A [`Filter`] is read from the text form ([`Filter::parse`]):
//!
//! ```text
//! status = 'paid' and (qty >= 2 or note is null) and not sku like 'TEST\_%'
//! ```
//!
//! or from the JSON form ([`Filter::from_json`]):
//!
//! ```json
//! {"and": [{"col": "status", "op": "=", "value": "paid"},
//!          {"or": [{"col": "qty", "op": ">=", "value": 2}, {"col": "note", "op": "is null"}]}]}
//! ```
//!
//! (the grammars: [`parse`](mod@parse) and [`json`]). [`Filter::bind`]
//! checks it against the table's columns ([`ColumnType`] lists the types
//! supported) and types its values, giving a [`BoundFilter`], which renders
//! as a parameterized SQL predicate ([`BoundFilter::to_sql`], for the
//! snapshot) and evaluates on an event's row ([`BoundFilter::matches`], for
//! the live events). Both follow SQL's three-valued logic: a comparison with
//! NULL is unknown, `not unknown` is unknown, and a row matches only when
//! the filter is TRUE. The property test `tests/db/shape_filter.rs` holds
//! the two equal on random rows and filters.
//!
//! ```
//! use pgpubsub::shape::Filter;
//! let filter = Filter::parse("status = 'paid' and (qty >= 2 or note is null)")?;
//! let bound = filter.bind(&[("status", "text"), ("qty", "integer"), ("note", "text")])?;
//! let (sql, params) = bound.to_sql(1);
//! assert_eq!(sql, r#"(("status" = $1::text COLLATE "C") AND (("qty" >= $2::int4) OR ("note" IS NULL)))"#);
//! assert_eq!(params.len(), 2);
//! assert!(bound.matches(&serde_json::json!({"status": "paid", "qty": 1, "note": null})));
//! assert!(!bound.matches(&serde_json::json!({"status": "paid", "qty": null, "note": "x"})));
//! # Ok::<(), pgpubsub::shape::FilterError>(())
//! ```
//!
//! Bounds: [`MAX_DEPTH`] nesting levels, [`MAX_TERMS`] predicates,
//! [`MAX_VALUES`] values, [`MAX_BYTES`] of text; past them a filter is
//! refused, never half-read.

mod bind;
mod decimal;
mod eval;
mod filter;
#[cfg(test)]
mod fuzz;
pub mod handover;
pub mod json;
mod lex;
mod live;
pub mod parse;
mod sql;
#[cfg(test)]
mod tests;
mod time;
mod types;
mod words;

pub use bind::BoundFilter;
pub use filter::{CompareOp, Filter, FilterError, Literal, MAX_BYTES, MAX_DEPTH, MAX_TERMS, MAX_VALUES};
pub use handover::{Handover, Position, Snapshot};
pub use live::{Seen, Shape, ShapeError, SnapshotPart, Snapshotting, CAPTURE_WAIT, SNAPSHOT_BATCH};
pub use sql::Param;
pub use types::{ColumnType, TypeRef, SUPPORTED};

pub(crate) use crate::channel::quote_ident;
