//! The second evaluator: a bound filter on a row as an event carries it
//! (`row_to_json`: numbers, strings, booleans, null), in SQL's three-valued
//! logic, so that it agrees with [`BoundFilter::to_sql`] row for row.

use std::cmp::Ordering;
use std::collections::HashMap;

use serde_json::value::RawValue;

use super::bind::{BoundFilter, Column, Node, Value};
use super::decimal::Decimal;
use super::time::Instant;
use super::types::ColumnType;

/// One column's value in a row, as JSON gave it. A number keeps its text.
enum Cell<'a> {
    Null,
    Bool(bool),
    Number(std::borrow::Cow<'a, str>),
    Text(std::borrow::Cow<'a, str>),
    /// An array or object: no filter compares with it (unknown).
    Other,
}

impl BoundFilter {
    /// Whether the row (a JSON object of column → value, as `row_to_json`
    /// writes it) matches: the filter is TRUE for it. Unknown (a comparison
    /// with NULL, a missing column, a value of the wrong JSON kind) does not
    /// match, exactly as in a `WHERE` clause.
    ///
    /// `serde_json::Value` holds numbers beyond `i64`/`u64` as `f64`, so a
    /// `numeric` with more than 15 significant digits may compare inexactly
    /// here; [`BoundFilter::matches_json`] reads the row's text and is exact.
    pub fn matches(&self, row: &serde_json::Value) -> bool {
        let Some(object) = row.as_object() else { return false };
        eval(&self.root, &|name| match object.get(name) {
            None | Some(serde_json::Value::Null) => Cell::Null,
            Some(serde_json::Value::Bool(b)) => Cell::Bool(*b),
            Some(serde_json::Value::Number(n)) => Cell::Number(n.to_string().into()),
            Some(serde_json::Value::String(s)) => Cell::Text(s.as_str().into()),
            Some(_) => Cell::Other,
        }) == Some(true)
    }

    /// [`BoundFilter::matches`] on the row's JSON text (an event's `new` or
    /// `old`), reading numbers as written: exact for `numeric` of any size.
    ///
    /// # Errors
    /// When `row` is not a JSON object.
    pub fn matches_json(&self, row: &str) -> Result<bool, serde_json::Error> {
        let object: HashMap<String, &RawValue> = serde_json::from_str(row)?;
        let cell = |name: &str| -> Cell<'_> {
            let Some(raw) = object.get(name) else { return Cell::Null };
            let text = raw.get();
            match text.as_bytes().first() {
                Some(b'n') => Cell::Null,
                Some(b't') => Cell::Bool(true),
                Some(b'f') => Cell::Bool(false),
                Some(b'"') => serde_json::from_str::<String>(text).map_or(Cell::Other, |s| Cell::Text(s.into())),
                Some(b'-' | b'0'..=b'9') => Cell::Number(text.into()),
                _ => Cell::Other,
            }
        };
        Ok(eval(&self.root, &cell) == Some(true))
    }
}

/// The node's truth for the row: `Some(true)`, `Some(false)` or `None` (unknown).
fn eval<'a>(node: &Node, cell: &dyn Fn(&str) -> Cell<'a>) -> Option<bool> {
    match node {
        // FALSE wins an AND, TRUE an OR, else any unknown makes it unknown.
        Node::And(parts) => parts.iter().try_fold(Some(true), |acc, p| match eval(p, cell) {
            Some(false) => Err(Some(false)),
            Some(true) => Ok(acc),
            None => Ok(None),
        }),
        Node::Or(parts) => parts.iter().try_fold(Some(false), |acc, p| match eval(p, cell) {
            Some(true) => Err(Some(true)),
            Some(false) => Ok(acc),
            None => Ok(None),
        }),
        Node::Not(inner) => return eval(inner, cell).map(|b| !b),
        Node::Compare(c, op, v) => return compare(c, &cell(&c.name), v).map(|o| op.holds(o)),
        Node::In(c, values) => {
            let here = cell(&c.name);
            values.iter().try_fold(Some(false), |acc, v| match compare(c, &here, v) {
                Some(Ordering::Equal) => Err(Some(true)),
                Some(_) => Ok(acc),
                None => Ok(None),
            })
        }
        Node::IsNull(c, negated) => return Some(matches!(cell(&c.name), Cell::Null) != *negated),
        Node::Like(c, pattern) => {
            return match cell(&c.name) {
                Cell::Text(t) => Some(like(&t, pattern)),
                _ => None,
            }
        }
    }
    .unwrap_or_else(|decided| decided)
}

/// The row's value against `v` as PostgreSQL orders the column's type;
/// `None` when the cell is NULL or not of the column's kind.
fn compare(c: &Column, cell: &Cell<'_>, v: &Value) -> Option<Ordering> {
    match (cell, v) {
        (Cell::Number(n), Value::Int(i)) => Some(n.parse::<i64>().ok()?.cmp(i)),
        (Cell::Number(n) | Cell::Text(n), Value::Numeric(d)) => Some(Decimal::parse(n)?.cmp(d)),
        // Non-finite floats arrive as strings ("NaN", "Infinity").
        (Cell::Number(n) | Cell::Text(n), Value::Float(f)) => {
            let here = if c.ty == ColumnType::Float4 { f64::from(n.parse::<f32>().ok()?) } else { n.parse().ok()? };
            Some(float_order(here, *f))
        }
        (Cell::Bool(a), Value::Bool(b)) => Some(a.cmp(b)),
        (Cell::Text(a), Value::Text(b)) => Some(a.as_bytes().cmp(b.as_bytes())),
        (Cell::Text(a), Value::Instant(b)) => Some(Instant::parse(a, c.ty.time_kind()?, false)?.cmp(b)),
        _ => None,
    }
}

/// PostgreSQL's float order: NaN equals NaN and is above everything; -0 = 0.
fn float_order(a: f64, b: f64) -> Ordering {
    match (a.is_nan(), b.is_nan()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        (false, false) => a.partial_cmp(&b).unwrap_or(Ordering::Equal),
    }
}

/// SQL `LIKE`: `%` any run of characters, `_` one, `\` makes the next one
/// literal. Greedy with one backtrack point (the last `%`): O(len × pattern).
pub(crate) fn like(text: &str, pattern: &str) -> bool {
    #[derive(Clone, Copy, PartialEq)]
    enum P {
        Any,
        One,
        Char(char),
    }
    let mut p = Vec::new();
    let mut chars = pattern.chars();
    while let Some(ch) = chars.next() {
        p.push(match ch {
            '%' => P::Any,
            '_' => P::One,
            '\\' => chars.next().map_or(P::Char('\\'), P::Char),
            c => P::Char(c),
        });
    }
    let t: Vec<char> = text.chars().collect();
    let (mut ti, mut pi) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some(P::Any) => {
                star = Some((pi, ti));
                pi += 1;
            }
            Some(P::One) => (ti, pi) = (ti + 1, pi + 1),
            Some(P::Char(c)) if *c == t[ti] => (ti, pi) = (ti + 1, pi + 1),
            _ => match star {
                Some((sp, st)) => {
                    star = Some((sp, st + 1));
                    (ti, pi) = (st + 1, sp + 1);
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|x| *x == P::Any)
}
