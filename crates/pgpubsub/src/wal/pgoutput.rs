//! The row messages of `pgoutput` (protocol version 1, text format), and
//! rows rendered as JSON the way `row_to_json` types them.
//!
//! Hand-written: pgwire-replication carries the replication protocol and
//! decodes transaction boundaries and logical messages, and leaves row
//! decoding to its users ("Full pgoutput decoding into rows" is one of its
//! non-goals). The format is in PostgreSQL's "Logical Replication Message
//! Formats" chapter; every length is checked, so a malformed message is an
//! error, never a panic or an out-of-bounds read.

use super::types::{parse_array, parse_record, Item, Shape, Types};

/// A column of a published table.
#[derive(Debug, Clone)]
pub(crate) struct Column {
    pub(crate) name: String,
    pub(crate) type_oid: u32,
    /// Part of the replica identity (the primary key, by default).
    pub(crate) key: bool,
}

/// A published table as the stream describes it (sent before its first
/// change in a session, and again after its definition changes).
#[derive(Debug, Clone)]
pub(crate) struct Relation {
    pub(crate) id: u32,
    pub(crate) schema: String,
    pub(crate) name: String,
    pub(crate) columns: Vec<Column>,
}

/// A column value in a row message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Value<'a> {
    Null,
    /// A TOASTed value the change did not touch: not sent.
    Unchanged,
    Text(&'a [u8]),
}

/// A row message. Transaction boundaries and logical messages are decoded
/// by pgwire-replication; anything else (types, origins) is `Other`.
#[derive(Debug)]
pub(crate) enum Msg<'a> {
    Relation(Relation),
    Insert {
        rel: u32,
        new: Vec<Value<'a>>,
    },
    /// `old` is the whole old row with REPLICA IDENTITY FULL, else its key
    /// columns only, and only when the key changed.
    Update {
        rel: u32,
        old: Option<Old<'a>>,
        new: Vec<Value<'a>>,
    },
    Delete {
        rel: u32,
        old: Old<'a>,
    },
    Truncate {
        rels: Vec<u32>,
    },
    Other,
}

/// The old row of an update or delete.
#[derive(Debug)]
pub(crate) struct Old<'a> {
    pub(crate) values: Vec<Value<'a>>,
    /// The whole row (`O`), not only the replica identity's columns (`K`).
    pub(crate) full: bool,
}

/// Why a message could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed pgoutput message: {0}")]
pub(crate) struct Malformed(pub(crate) &'static str);

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        if self.0.len() < n {
            return Err(Malformed("truncated"));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, Malformed> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, Malformed> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, Malformed> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn cstr(&mut self) -> Result<String, Malformed> {
        let end = self.0.iter().position(|&b| b == 0).ok_or(Malformed("unterminated string"))?;
        let s = std::str::from_utf8(&self.0[..end]).map_err(|_| Malformed("a name that is not UTF-8"))?.to_string();
        self.0 = &self.0[end + 1..];
        Ok(s)
    }
    fn tuple(&mut self) -> Result<Vec<Value<'a>>, Malformed> {
        let n = self.u16()? as usize;
        // Each column takes at least one byte: a count beyond the message is a lie.
        if n > self.0.len() {
            return Err(Malformed("more columns than bytes"));
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(match self.u8()? {
                b'n' => Value::Null,
                b'u' => Value::Unchanged,
                b't' => {
                    let len = self.u32()? as usize;
                    Value::Text(self.take(len)?)
                }
                b'b' => return Err(Malformed("binary column values (pgpubsub asks for text)")),
                _ => return Err(Malformed("unknown column kind")),
            });
        }
        Ok(out)
    }
}

/// Parses one message of the stream.
pub(crate) fn parse(data: &[u8]) -> Result<Msg<'_>, Malformed> {
    let mut r = Reader(data);
    Ok(match r.u8()? {
        b'R' => {
            let id = r.u32()?;
            let schema = r.cstr()?;
            let name = r.cstr()?;
            let _replica_identity = r.u8()?;
            let n = r.u16()? as usize;
            let mut columns = Vec::with_capacity(n.min(1600));
            for _ in 0..n {
                let flags = r.u8()?;
                let name = r.cstr()?;
                let type_oid = r.u32()?;
                let _typmod = r.u32()?;
                columns.push(Column { name, type_oid, key: flags & 1 == 1 });
            }
            Msg::Relation(Relation { id, schema, name, columns })
        }
        b'I' => {
            let rel = r.u32()?;
            if r.u8()? != b'N' {
                return Err(Malformed("an insert without its new row"));
            }
            Msg::Insert { rel, new: r.tuple()? }
        }
        b'U' => {
            let rel = r.u32()?;
            let mut kind = r.u8()?;
            let mut old = None;
            if kind == b'K' || kind == b'O' {
                old = Some(Old { values: r.tuple()?, full: kind == b'O' });
                kind = r.u8()?;
            }
            if kind != b'N' {
                return Err(Malformed("an update without its new row"));
            }
            Msg::Update { rel, old, new: r.tuple()? }
        }
        b'D' => {
            let rel = r.u32()?;
            let kind = r.u8()?;
            if !matches!(kind, b'K' | b'O') {
                return Err(Malformed("a delete without its old row or key"));
            }
            Msg::Delete { rel, old: Old { values: r.tuple()?, full: kind == b'O' } }
        }
        b'T' => {
            let n = r.u32()? as usize;
            let _options = r.u8()?;
            if n > r.0.len() / 4 {
                return Err(Malformed("more truncated tables than bytes"));
            }
            let rels = (0..n).map(|_| r.u32()).collect::<Result<_, _>>()?;
            Msg::Truncate { rels }
        }
        _ => Msg::Other,
    })
}

/// Type OIDs whose text is a JSON number as it stands (when it is finite):
/// int2, int4, int8, float4, float8, numeric (oid is a string in
/// `row_to_json`).
const NUMBERS: [u32; 6] = [20, 21, 23, 700, 701, 1700];
const BOOL: u32 = 16;
const JSON_TYPES: [u32; 2] = [114, 3802];
const TIMESTAMP: u32 = 1114;
const TIMESTAMPTZ: u32 = 1184;

/// Appends `text`, a value of type `type_oid`, as `row_to_json` would:
/// a domain as its base type, arrays and composites nested (their shapes
/// from `types`), and scalars by [`push_scalar`].
fn push_value(out: &mut String, types: &Types, type_oid: u32, text: &str) {
    match types.shape(type_oid) {
        Some(Shape::Domain(base)) => push_value(out, types, *base, text),
        Some(Shape::Array { elem, delim }) => match parse_array(text, *delim) {
            Some(items) => push_items(out, types, *elem, &items),
            None => crate::event_log::json_string::write(out, text),
        },
        Some(Shape::Composite(attrs)) => match parse_record(text) {
            Some(fields) => {
                out.push('{');
                for (i, (name, oid)) in attrs.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    crate::event_log::json_string::write(out, name);
                    out.push(':');
                    match fields.get(i) {
                        Some(Item::Text(t)) => push_value(out, types, *oid, t),
                        _ => out.push_str("null"),
                    }
                }
                out.push('}');
            }
            None => crate::event_log::json_string::write(out, text),
        },
        None => push_scalar(out, type_oid, text),
    }
}

/// The elements of an array (of `elem`), as a JSON array.
fn push_items(out: &mut String, types: &Types, elem: u32, items: &[Item]) {
    out.push('[');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        match item {
            Item::Null => out.push_str("null"),
            Item::Text(t) => push_value(out, types, elem, t),
            Item::Array(inner) => push_items(out, types, elem, inner),
        }
    }
    out.push(']');
}

/// Appends `text`, a value of a scalar type `type_oid`, as JSON: numbers
/// and booleans as such, json and jsonb as they are, anything else a string
/// (the text form PostgreSQL gives it).
fn push_scalar(out: &mut String, type_oid: u32, text: &str) {
    let finite = || !text.is_empty() && text.bytes().all(|c| c.is_ascii_digit() || b"-+.eE".contains(&c));
    if NUMBERS.contains(&type_oid) && finite() {
        out.push_str(text);
    } else if type_oid == BOOL {
        out.push_str(if text == "t" { "true" } else { "false" });
    } else if JSON_TYPES.contains(&type_oid) {
        out.push_str(text);
    } else if (type_oid == TIMESTAMP || type_oid == TIMESTAMPTZ) && text.as_bytes().get(10) == Some(&b' ') {
        // ISO 8601 as row_to_json writes it: a `T`, and a whole `+hh:mm`
        // offset (the stream's DateStyle is ISO, its TimeZone UTC).
        let mut iso = text.replacen(' ', "T", 1);
        let offset = iso.get(iso.len().saturating_sub(3)..).unwrap_or("");
        if type_oid == TIMESTAMPTZ && offset.starts_with(['+', '-']) && !offset.contains(':') {
            iso.push_str(":00");
        }
        crate::event_log::json_string::write(out, &iso);
    } else {
        crate::event_log::json_string::write(out, text);
    }
}

/// A row as a JSON object in column order. `only_keys` keeps the replica
/// identity's columns. A column the message left out (an unchanged TOASTed
/// value) is taken from `fallback` (the old row, with REPLICA IDENTITY
/// FULL) or else omitted. A value that is not UTF-8 (only possible in a
/// `SQL_ASCII` database) is rendered with U+FFFD in place of its bad bytes:
/// [`invalid_utf8`] tells the caller, who counts it.
pub(crate) fn row_json(
    rel: &Relation,
    types: &Types,
    values: &[Value<'_>],
    fallback: Option<&[Value<'_>]>,
    only_keys: bool,
) -> Option<String> {
    let mut out = String::with_capacity(16 + values.len() * 16);
    out.push('{');
    let mut first = true;
    for (i, (col, v)) in rel.columns.iter().zip(values).enumerate() {
        if only_keys && !col.key {
            continue;
        }
        let v = match v {
            Value::Unchanged => match fallback.and_then(|f| f.get(i)) {
                Some(v @ (Value::Text(_) | Value::Null)) => *v,
                _ => continue,
            },
            v => *v,
        };
        if !first {
            out.push(',');
        }
        first = false;
        crate::event_log::json_string::write(&mut out, &col.name);
        out.push(':');
        match v {
            Value::Text(b) => push_value(&mut out, types, col.type_oid, &String::from_utf8_lossy(b)),
            _ => out.push_str("null"),
        }
    }
    out.push('}');
    Some(out)
}

/// Whether a value of `values` is not UTF-8.
pub(crate) fn invalid_utf8(values: &[Value<'_>]) -> bool {
    values.iter().any(|v| matches!(v, Value::Text(b) if std::str::from_utf8(b).is_err()))
}

/// The text of column `name` in `values`, if it is there and not null.
pub(crate) fn text<'a>(rel: &Relation, values: &[Value<'a>], name: &str) -> Option<&'a str> {
    let i = rel.columns.iter().position(|c| c.name == name)?;
    match values.get(i)? {
        Value::Text(b) => std::str::from_utf8(b).ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relation_bytes() -> Vec<u8> {
        let mut b = vec![b'R'];
        b.extend(16384u32.to_be_bytes());
        b.extend(b"public\0t\0");
        b.push(b'd');
        b.extend(3u16.to_be_bytes());
        for (flags, name, oid) in [(1u8, "id", 23u32), (0, "name", 25), (0, "doc", 3802)] {
            b.push(flags);
            b.extend(name.as_bytes());
            b.push(0);
            b.extend(oid.to_be_bytes());
            b.extend((-1i32).to_be_bytes());
        }
        b
    }

    fn tuple(values: &[Option<&str>]) -> Vec<u8> {
        let mut b = (values.len() as u16).to_be_bytes().to_vec();
        for v in values {
            match v {
                None => b.push(b'n'),
                Some("\u{0}u") => b.push(b'u'),
                Some(t) => {
                    b.push(b't');
                    b.extend((t.len() as u32).to_be_bytes());
                    b.extend(t.as_bytes());
                }
            }
        }
        b
    }

    #[test]
    fn reads_a_relation_and_renders_rows_typed() {
        let Msg::Relation(rel) = parse(&relation_bytes()).unwrap() else { panic!() };
        assert_eq!((rel.id, rel.schema.as_str(), rel.name.as_str(), rel.columns.len()), (16384, "public", "t", 3));
        let mut insert = vec![b'I'];
        insert.extend(16384u32.to_be_bytes());
        insert.push(b'N');
        insert.extend(tuple(&[Some("7"), Some("a \"q\"\n"), Some(r#"{"k": [1, 2]}"#)]));
        let Msg::Insert { rel: id, new } = parse(&insert).unwrap() else { panic!() };
        assert_eq!(id, 16384);
        let json = row_json(&rel, &Types::default(), &new, None, false).unwrap();
        assert_eq!(json, r#"{"id":7,"name":"a \"q\"\n","doc":{"k": [1, 2]}}"#);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["doc"]["k"][1], 2);
        assert_eq!(row_json(&rel, &Types::default(), &new, None, true).unwrap(), r#"{"id":7}"#);
        assert_eq!(text(&rel, &new, "name"), Some("a \"q\"\n"));
    }

    #[test]
    fn an_unchanged_toasted_value_comes_from_the_old_row_or_is_left_out() {
        let Msg::Relation(rel) = parse(&relation_bytes()).unwrap() else { panic!() };
        let mut update = vec![b'U'];
        update.extend(16384u32.to_be_bytes());
        update.push(b'O');
        update.extend(tuple(&[Some("1"), Some("old"), Some("[]")]));
        update.push(b'N');
        update.extend(tuple(&[Some("1"), Some("new"), Some("\u{0}u")]));
        let Msg::Update { old, new, .. } = parse(&update).unwrap() else { panic!() };
        let old = old.unwrap();
        assert!(old.full);
        let old = old.values;
        assert_eq!(
            row_json(&rel, &Types::default(), &new, Some(&old), false).unwrap(),
            r#"{"id":1,"name":"new","doc":[]}"#
        );
        assert_eq!(row_json(&rel, &Types::default(), &new, None, false).unwrap(), r#"{"id":1,"name":"new"}"#);
    }

    #[test]
    fn a_value_that_is_not_utf8_is_rendered_lossily_and_told() {
        let Msg::Relation(rel) = parse(&relation_bytes()).unwrap() else { panic!() };
        let bad = [b'a', 0xff, b'b'];
        let values = [Value::Text(b"1"), Value::Text(&bad), Value::Null];
        assert!(invalid_utf8(&values));
        assert!(!invalid_utf8(&values[..1]));
        let json = row_json(&rel, &Types::default(), &values, None, false).unwrap();
        assert_eq!(json, "{\"id\":1,\"name\":\"a\u{fffd}b\",\"doc\":null}");
    }

    #[test]
    fn numbers_that_json_cannot_hold_become_strings() {
        let mut s = String::new();
        push_scalar(&mut s, 1700, "NaN");
        push_scalar(&mut s, 701, "-Infinity");
        push_scalar(&mut s, 16, "t");
        push_scalar(&mut s, 1700, "12.50");
        push_scalar(&mut s, 26, "16384");
        assert_eq!(s, r#""NaN""-Infinity"true12.50"16384""#);
    }

    #[test]
    fn arrays_composites_and_domains_nest_as_row_to_json_nests_them() {
        let types = Types::with([
            (1007, Shape::Array { elem: 23, delim: b',' }),
            (1009, Shape::Array { elem: 25, delim: b',' }),
            (70000, Shape::Domain(23)),
            (70001, Shape::Composite(vec![("n".into(), 70000), ("tags".into(), 1009)])),
            (70002, Shape::Array { elem: 70001, delim: b',' }),
        ]);
        let mut s = String::new();
        push_value(&mut s, &types, 1007, "{{1,2},{NULL,4}}");
        push_value(&mut s, &types, 70000, "5");
        push_value(&mut s, &types, 70001, r#"(7,"{a,""b c""}")"#);
        push_value(&mut s, &types, 70002, r#"{"(1,{x})","(,)"}"#);
        push_value(&mut s, &types, 1007, "not an array");
        assert_eq!(
            s,
            r#"[[1,2],[null,4]]5{"n":7,"tags":["a","b c"]}[{"n":1,"tags":["x"]},{"n":null,"tags":null}]"not an array""#
        );
    }

    #[test]
    fn timestamps_are_iso_8601_as_row_to_json_writes_them() {
        let mut s = String::new();
        push_scalar(&mut s, 1114, "2026-11-30 09:17:56.629682");
        push_scalar(&mut s, 1184, "2026-11-30 09:17:56.629682+00");
        push_scalar(&mut s, 1184, "2026-11-30 09:17:56+05:30");
        push_scalar(&mut s, 1184, "infinity");
        assert_eq!(
            s,
            r#""2026-11-30T09:17:56.629682""2026-11-30T09:17:56.629682+00:00""2026-11-30T09:17:56+05:30""infinity""#
        );
    }

    #[test]
    fn malformed_messages_are_errors_not_panics() {
        let good = relation_bytes();
        for cut in 0..good.len() {
            assert!(parse(&good[..cut]).is_err() || cut == 0 && parse(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut lying = vec![b'I'];
        lying.extend(1u32.to_be_bytes());
        lying.push(b'N');
        lying.extend(u16::MAX.to_be_bytes());
        assert_eq!(parse(&lying).unwrap_err(), Malformed("more columns than bytes"));
        let mut long = vec![b'I'];
        long.extend(1u32.to_be_bytes());
        long.push(b'N');
        long.extend(1u16.to_be_bytes());
        long.push(b't');
        long.extend(u32::MAX.to_be_bytes());
        assert_eq!(parse(&long).unwrap_err(), Malformed("truncated"));
        assert!(matches!(parse(b"Yanything"), Ok(Msg::Other)));
    }
}
