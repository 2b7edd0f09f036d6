//! The JSON form of a filter, for clients that build filters as data:
//!
//! ```json
//! {"and": [{"col": "status", "op": "=", "value": "paid"},
//!          {"or": [{"col": "qty", "op": ">=", "value": 2},
//!                  {"col": "note", "op": "is null"}]}]}
//! ```
//!
//! A node is `{"and": [node, ...]}`, `{"or": [node, ...]}`, `{"not": node}`,
//! or a predicate `{"col": name, "op": op, "value": v}` where `op` is one of
//! `=`, `<>`, `!=`, `<`, `<=`, `>`, `>=`, `like`, `not like` (with a string
//! value), `in`, `not in` (with an array value), `is null`, `is not null`
//! (without a value). Values are strings, numbers or booleans; numbers keep
//! the digits as written (read through `RawValue`, never through `f64`).
//! The column name is exact (no case folding). Nesting is bounded as in the
//! text form; serde_json's own recursion limit (128) guards the reading.

use std::collections::BTreeMap;

use serde_json::value::RawValue;

use super::filter::{CompareOp, Filter, FilterError, Literal, MAX_BYTES, MAX_DEPTH, MAX_TERMS, MAX_VALUES};

#[derive(Default)]
struct Counts {
    terms: usize,
    values: usize,
}

impl Filter {
    /// Parses the JSON form (see the module docs of [`crate::shape`]).
    ///
    /// # Errors
    /// [`FilterError::Syntax`] naming the path of the bad node (`$.and[1].op`)
    /// and what was expected; [`FilterError::TooDeep`] or
    /// [`FilterError::TooLarge`] past the bounds.
    pub fn from_json(text: &str) -> Result<Filter, FilterError> {
        if text.len() > MAX_BYTES {
            return Err(FilterError::TooLarge("65536 bytes"));
        }
        let raw: &RawValue = serde_json::from_str(text).map_err(|e| FilterError::Syntax {
            position: if e.line() == 1 { e.column().saturating_sub(1) } else { 0 },
            expected: "JSON".into(),
            found: e.to_string(),
        })?;
        node(raw, 0, "$", &mut Counts::default())
    }
}

fn syntax(path: &str, expected: &str, raw: Option<&RawValue>) -> FilterError {
    let found = match raw {
        Some(raw) => {
            let text = raw.get();
            let cut = text.char_indices().nth(40).map_or(text.len(), |(i, _)| i);
            format!("{}{} at {path}", &text[..cut], if cut < text.len() { "…" } else { "" })
        }
        None => format!("nothing at {path}"),
    };
    FilterError::Syntax { position: 0, expected: expected.into(), found }
}

fn node(raw: &RawValue, depth: usize, path: &str, counts: &mut Counts) -> Result<Filter, FilterError> {
    let expected_node =
        "an object: {\"and\": [...]}, {\"or\": [...]}, {\"not\": {...}} or {\"col\", \"op\", \"value\"}";
    let map: BTreeMap<String, &RawValue> =
        serde_json::from_str(raw.get()).map_err(|_| syntax(path, expected_node, Some(raw)))?;
    let keys: Vec<&str> = map.keys().map(String::as_str).collect();
    match keys.as_slice() {
        [word @ ("and" | "or")] => {
            if depth >= MAX_DEPTH {
                return Err(FilterError::TooDeep);
            }
            let list = map[*word];
            let items: Vec<&RawValue> =
                serde_json::from_str(list.get()).map_err(|_| syntax(path, "an array of filters", Some(list)))?;
            if items.is_empty() {
                return Err(syntax(&format!("{path}.{word}"), "a non-empty array", Some(list)));
            }
            let parts = items
                .iter()
                .enumerate()
                .map(|(i, item)| node(item, depth + 1, &format!("{path}.{word}[{i}]"), counts))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(if *word == "and" { Filter::And(parts) } else { Filter::Or(parts) })
        }
        ["not"] => {
            if depth >= MAX_DEPTH {
                return Err(FilterError::TooDeep);
            }
            Ok(Filter::Not(Box::new(node(map["not"], depth + 1, &format!("{path}.not"), counts)?)))
        }
        _ => predicate(&map, path, counts).map_err(|e| match e {
            FilterError::Syntax { .. } if !map.contains_key("col") => syntax(path, expected_node, Some(raw)),
            e => e,
        }),
    }
}

fn predicate(map: &BTreeMap<String, &RawValue>, path: &str, counts: &mut Counts) -> Result<Filter, FilterError> {
    if let Some(extra) = map.keys().find(|k| !["col", "op", "value"].contains(&k.as_str())) {
        return Err(syntax(&format!("{path}.{extra}"), "only \"col\", \"op\" and \"value\"", map.get(extra).copied()));
    }
    let string = |key: &str, expected: &str| -> Result<String, FilterError> {
        let raw = map.get(key).copied();
        raw.and_then(|r| serde_json::from_str::<String>(r.get()).ok())
            .ok_or_else(|| syntax(&format!("{path}.{key}"), expected, raw))
    };
    let column = string("col", "a column name (a string)")?;
    let op = string("op", "an operator: = <> != < <= > >= in, not in, like, not like, is null, is not null")?;
    counts.terms += 1;
    if counts.terms > MAX_TERMS {
        return Err(FilterError::TooLarge("256 predicates"));
    }
    let value_path = format!("{path}.value");
    let value = map.get("value").copied();
    let (negated, base) = match op.strip_prefix("not ") {
        Some(base) if base == "in" || base == "like" => (true, base),
        _ => (false, op.as_str()),
    };
    let filter = match base {
        "is null" | "is not null" => {
            if value.is_some() {
                return Err(syntax(&value_path, "no value after `is null`", value));
            }
            Filter::IsNull { column, negated: base == "is not null" }
        }
        "in" => {
            let list = value.ok_or_else(|| syntax(&value_path, "an array of values", None))?;
            let items: Vec<&RawValue> =
                serde_json::from_str(list.get()).map_err(|_| syntax(&value_path, "an array of values", Some(list)))?;
            if items.is_empty() {
                return Err(syntax(&value_path, "a non-empty array", Some(list)));
            }
            let values = items
                .iter()
                .enumerate()
                .map(|(i, v)| literal(v, &format!("{value_path}[{i}]"), counts))
                .collect::<Result<Vec<_>, _>>()?;
            Filter::In { column, values }
        }
        "like" => match value.map(|v| literal(v, &value_path, counts)).transpose()? {
            Some(Literal::Text(pattern)) => Filter::Like { column, pattern },
            _ => return Err(syntax(&value_path, "a string pattern", value)),
        },
        _ => {
            let Some(op) = CompareOp::from_symbol(base) else {
                return Err(syntax(&format!("{path}.op"), "an operator", map.get("op").copied()));
            };
            let value = value.ok_or_else(|| syntax(&value_path, "a value", None))?;
            Filter::Compare { column, op, value: literal(value, &value_path, counts)? }
        }
    };
    Ok(if negated { Filter::Not(Box::new(filter)) } else { filter })
}

fn literal(raw: &RawValue, path: &str, counts: &mut Counts) -> Result<Literal, FilterError> {
    counts.values += 1;
    if counts.values > MAX_VALUES {
        return Err(FilterError::TooLarge("1024 values"));
    }
    let text = raw.get().trim();
    match text.as_bytes().first() {
        Some(b'"') => serde_json::from_str(text).map(Literal::Text).map_err(|_| syntax(path, "a string", Some(raw))),
        Some(b't') if text == "true" => Ok(Literal::Bool(true)),
        Some(b'f') if text == "false" => Ok(Literal::Bool(false)),
        Some(b'-' | b'0'..=b'9') => Ok(Literal::Number(text.to_string())),
        Some(b'n') => Err(syntax(path, "a value (a comparison with null is never true: use \"is null\")", Some(raw))),
        _ => Err(syntax(path, "a string, a number or a boolean", Some(raw))),
    }
}
