//! Column types beyond the built-in scalars, so values render as
//! `row_to_json` renders them: a domain as its base type, an array as a
//! JSON array (nested for more dimensions), a composite as a JSON object.
//! pgoutput sends every value as its text; the structure of a type comes
//! from the catalog, asked once per type by the capturer ([`Types::learn`]).
//!
//! The array and record literal parsers are ours: they read PostgreSQL's
//! output format (`array_out`, `record_out`), which no crate we use parses.

use std::collections::HashMap;

use tokio_postgres::Client;

/// What the catalog says of a type that needs more than its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Shape {
    /// A domain: rendered as its base type.
    Domain(u32),
    /// An array of this element type, with its delimiter (`,`, or `;` for box).
    Array { elem: u32, delim: u8 },
    /// A composite: its attributes, in order.
    Composite(Vec<(String, u32)>),
}

/// The shapes known so far; any other type renders as a scalar.
#[derive(Debug, Default, Clone)]
pub(crate) struct Types {
    shapes: HashMap<u32, Shape>,
    /// Types asked about (shaped or not), so each is asked once.
    asked: std::collections::HashSet<u32>,
}

/// The highest oid of a built-in type: these are never domains or
/// composites, and their arrays are known by `typelem` like any other.
const FIRST_USER_OID: u32 = 16384;

impl Types {
    pub(crate) fn shape(&self, oid: u32) -> Option<&Shape> {
        self.shapes.get(&oid)
    }

    /// Forgets what is known of `oids` (and not of the types they are made
    /// of), so the next [`Types::learn`] asks again.
    pub(crate) fn forget(&mut self, oids: &[u32]) {
        for oid in oids {
            self.asked.remove(oid);
            self.shapes.remove(oid);
        }
    }

    /// Which of `oids` have not been asked about yet.
    pub(crate) fn unknown(&self, oids: impl IntoIterator<Item = u32>) -> Vec<u32> {
        let mut out: Vec<u32> = oids.into_iter().filter(|o| !self.asked.contains(o)).collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Asks the catalog about `oids` and every type they are made of.
    ///
    /// # Errors
    /// When the catalog cannot be read (the caller starts its session again).
    pub(crate) async fn learn(&mut self, side: &Client, oids: Vec<u32>) -> crate::Result<()> {
        let mut todo = self.unknown(oids);
        while !todo.is_empty() {
            let rows = side
                .query(
                    "SELECT t.oid, t.typtype::text, t.typcategory::text, t.typelem, t.typbasetype, t.typdelim::text,
                            (SELECT array_agg(a.attname::text ORDER BY a.attnum) FROM pg_attribute a
                              WHERE a.attrelid = t.typrelid AND a.attnum > 0 AND NOT a.attisdropped),
                            (SELECT array_agg(a.atttypid ORDER BY a.attnum) FROM pg_attribute a
                              WHERE a.attrelid = t.typrelid AND a.attnum > 0 AND NOT a.attisdropped)
                     FROM pg_type t WHERE t.oid = ANY($1)",
                    &[&todo],
                )
                .await
                .map_err(|e| crate::Error::db("reading column types", e))?;
            self.asked.extend(todo.iter().copied());
            let mut next = Vec::new();
            for r in rows {
                let oid: u32 = r.get(0);
                let (typtype, category): (String, String) = (r.get(1), r.get(2));
                let (elem, base): (u32, u32) = (r.get(3), r.get(4));
                let shape = if typtype == "d" && base != 0 {
                    next.push(base);
                    Some(Shape::Domain(base))
                } else if category == "A" && elem != 0 {
                    next.push(elem);
                    let delim = r.get::<_, String>(5).bytes().next().unwrap_or(b',');
                    Some(Shape::Array { elem, delim })
                } else if typtype == "c" && oid >= FIRST_USER_OID {
                    let names: Vec<String> = r.get::<_, Option<Vec<String>>>(6).unwrap_or_default();
                    let types: Vec<u32> = r.get::<_, Option<Vec<u32>>>(7).unwrap_or_default();
                    next.extend(types.iter().copied());
                    Some(Shape::Composite(names.into_iter().zip(types).collect()))
                } else {
                    None
                };
                if let Some(s) = shape {
                    self.shapes.insert(oid, s);
                }
            }
            todo = self.unknown(next);
        }
        Ok(())
    }

    #[cfg(test)]
    pub(crate) fn with(shapes: impl IntoIterator<Item = (u32, Shape)>) -> Types {
        let shapes: HashMap<u32, Shape> = shapes.into_iter().collect();
        Types { asked: shapes.keys().copied().collect(), shapes }
    }
}

/// One element of an array or record literal: its text, or NULL.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Item {
    Null,
    Text(String),
    /// A nested array (a further dimension).
    Array(Vec<Item>),
}

/// Parses an array literal (`{1,2}`, `{{1,2},{3,4}}`, `[0:1]={1,2}`,
/// quoted elements with backslash escapes, unquoted `NULL`). `None` when it
/// is not one.
pub(crate) fn parse_array(text: &str, delim: u8) -> Option<Vec<Item>> {
    // Explicit bounds come first: `[1:2]={...}`.
    let text = if text.starts_with('[') { &text[text.find('=')? + 1..] } else { text };
    let bytes = text.as_bytes();
    let (items, end) = array_at(bytes, 0, delim)?;
    (end == bytes.len()).then_some(items)
}

fn array_at(b: &[u8], mut i: usize, delim: u8) -> Option<(Vec<Item>, usize)> {
    if b.get(i) != Some(&b'{') {
        return None;
    }
    i += 1;
    let mut items = Vec::new();
    if b.get(i) == Some(&b'}') {
        return Some((items, i + 1));
    }
    loop {
        match b.get(i)? {
            b'{' => {
                let (inner, next) = array_at(b, i, delim)?;
                items.push(Item::Array(inner));
                i = next;
            }
            b'"' => {
                let (s, next) = quoted(b, i)?;
                items.push(Item::Text(s));
                i = next;
            }
            _ => {
                let start = i;
                while !matches!(b.get(i), Some(&c) if c == delim || c == b'}') {
                    b.get(i)?;
                    i += 1;
                }
                let raw = std::str::from_utf8(&b[start..i]).ok()?.trim();
                items.push(if raw.eq_ignore_ascii_case("NULL") { Item::Null } else { Item::Text(raw.to_string()) });
            }
        }
        match b.get(i)? {
            &c if c == delim => i += 1,
            b'}' => return Some((items, i + 1)),
            _ => return None,
        }
    }
}

/// A double-quoted element at `i`: backslash escapes any byte; in records
/// a doubled quote is a quote too.
fn quoted(b: &[u8], mut i: usize) -> Option<(String, usize)> {
    i += 1;
    let mut out = Vec::new();
    loop {
        match *b.get(i)? {
            b'\\' => {
                out.push(*b.get(i + 1)?);
                i += 2;
            }
            b'"' if b.get(i + 1) == Some(&b'"') => {
                out.push(b'"');
                i += 2;
            }
            b'"' => return Some((String::from_utf8(out).ok()?, i + 1)),
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
}

/// Parses a record literal (`(1,"a b",)`: an empty unquoted field is
/// NULL). `None` when it is not one.
pub(crate) fn parse_record(text: &str) -> Option<Vec<Item>> {
    let b = text.as_bytes();
    if b.first() != Some(&b'(') || b.last() != Some(&b')') {
        return None;
    }
    let mut i = 1;
    let mut items = Vec::new();
    if b.len() == 2 {
        return Some(items);
    }
    loop {
        let mut field: Option<Vec<u8>> = None;
        while !matches!(b.get(i), Some(b',') | Some(b')')) {
            match *b.get(i)? {
                b'"' => {
                    let (s, next) = quoted(b, i)?;
                    field.get_or_insert_with(Vec::new).extend(s.into_bytes());
                    i = next;
                }
                b'\\' => {
                    field.get_or_insert_with(Vec::new).push(*b.get(i + 1)?);
                    i += 2;
                }
                c => {
                    field.get_or_insert_with(Vec::new).push(c);
                    i += 1;
                }
            }
        }
        items.push(match field {
            None => Item::Null,
            Some(f) => Item::Text(String::from_utf8(f).ok()?),
        });
        if b[i] == b')' {
            return (i + 1 == b.len()).then_some(items);
        }
        i += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Item {
        Item::Text(s.to_string())
    }

    #[test]
    fn arrays_parse_as_array_out_writes_them() {
        assert_eq!(parse_array("{}", b','), Some(vec![]));
        assert_eq!(parse_array("{1,2,NULL}", b','), Some(vec![t("1"), t("2"), Item::Null]));
        assert_eq!(parse_array(r#"{"a b","q\"x","NULL"}"#, b','), Some(vec![t("a b"), t("q\"x"), t("NULL")]));
        assert_eq!(
            parse_array("{{1,2},{3,4}}", b','),
            Some(vec![Item::Array(vec![t("1"), t("2")]), Item::Array(vec![t("3"), t("4")])])
        );
        assert_eq!(parse_array("[0:1]={7,8}", b','), Some(vec![t("7"), t("8")]));
        assert_eq!(parse_array("{(0,0),(1,1);(2,2),(3,3)}", b';'), Some(vec![t("(0,0),(1,1)"), t("(2,2),(3,3)")]));
        for bad in ["", "{", "{1", "1,2", "{1}x", "{\"a}", "[1:2]"] {
            assert_eq!(parse_array(bad, b','), None, "{bad}");
        }
    }

    #[test]
    fn records_parse_as_record_out_writes_them() {
        assert_eq!(parse_record("(1,\"a b\",)"), Some(vec![t("1"), t("a b"), Item::Null]));
        assert_eq!(parse_record(r#"("q""x",,"")"#), Some(vec![t("q\"x"), Item::Null, t("")]));
        assert_eq!(parse_record("()"), Some(vec![]));
        for bad in ["", "(", "1,2", "(1,\"x)", "(1))"] {
            assert_eq!(parse_record(bad), None, "{bad}");
        }
    }
}
