//! How `listen` prints events: one line each (default), pretty multi-line
//! JSON (`DEBUG=true`), or exactly one JSON object per line (`--json`).

use std::io::Write;
use std::time::SystemTime;

use pgpubsub::{Body, Event};

/// The output styles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// One readable line per event, long values shortened.
    Line,
    /// The whole event as indented JSON.
    Pretty,
    /// The whole event as one line of JSON.
    Json,
}

/// Longest value shown in full in `Line` style.
const SHOWN: usize = 400;

/// Writes one event; with `received_at`, stamped with that time (RFC 3339,
/// UTC, microseconds): a `received_at` member first in JSON styles (an event
/// that is not a JSON object is wrapped as `{"received_at":…,"event":…}`),
/// a leading field in the line style.
///
/// # Errors
/// When the output cannot be written (a closed pipe).
pub fn write_event(
    out: &mut impl Write,
    event: &Event,
    style: Style,
    received_at: Option<SystemTime>,
) -> std::io::Result<()> {
    let stamp = received_at.map(humantime::format_rfc3339_micros);
    match style {
        Style::Json => match stamp {
            None => writeln!(out, "{}", event.json()),
            Some(at) => {
                let json = event.json();
                match json.strip_prefix('{').map(str::trim_start) {
                    Some(rest) if rest.starts_with('}') => writeln!(out, r#"{{"received_at":"{at}"{rest}"#),
                    Some(rest) => writeln!(out, r#"{{"received_at":"{at}",{rest}"#),
                    None => writeln!(out, r#"{{"received_at":"{at}","event":{json}}}"#),
                }
            }
        },
        Style::Pretty => {
            let mut value: serde_json::Value = serde_json::from_str(event.json()).unwrap_or_default();
            if let Some(at) = stamp {
                value = match value {
                    serde_json::Value::Object(fields) => {
                        let mut stamped = serde_json::Map::with_capacity(fields.len() + 1);
                        stamped.insert("received_at".into(), at.to_string().into());
                        stamped.extend(fields);
                        stamped.into()
                    }
                    other => serde_json::json!({"received_at": at.to_string(), "event": other}),
                };
            }
            let text = serde_json::to_string_pretty(&value).unwrap_or_else(|_| event.json().to_string());
            writeln!(out, "{text}")
        }
        Style::Line => {
            if let Some(at) = stamp {
                write!(out, "{at} ")?;
            }
            let seq = event.seq.map_or_else(|| "-".to_string(), |s| format!("#{s}"));
            write!(out, "{} {seq} ", event.channel)?;
            match &event.body {
                Body::Change(c) => {
                    write!(out, "{} {}.{}", c.op.as_str(), c.schema, c.table)?;
                    match c.view {
                        Some(pgpubsub::View::Enter) => write!(out, " entered")?,
                        Some(pgpubsub::View::Leave) => write!(out, " left")?,
                        _ => {}
                    }
                    for (name, value) in [("key", &c.key), ("new", &c.new), ("old", &c.old)] {
                        if let Some(v) = value {
                            write!(out, " {name}={}", shorten(v.get()))?;
                        }
                    }
                    writeln!(out)
                }
                Body::Message(m) => writeln!(out, "message {}", shorten(&serde_json::to_string(&m.payload)?)),
                Body::Notify(raw) => writeln!(out, "notify {}", shorten(raw.get())),
                Body::Resync(r) => writeln!(out, "RESYNC NEEDED: {}", r.reason),
                _ => writeln!(out, "{}", shorten(event.json())),
            }
        }
    }
}

/// Tells the reader that events were pruned before this subscriber saw them:
/// a `{"kind":"resync",...}` object in JSON styles, a line otherwise.
///
/// # Errors
/// When the output cannot be written.
pub fn write_resync(
    out: &mut impl Write,
    cursor: pgpubsub::Cursor,
    pruned: pgpubsub::Cursor,
    style: Style,
) -> std::io::Result<()> {
    match style {
        Style::Json | Style::Pretty => writeln!(
            out,
            "{}",
            serde_json::json!({"seq": null, "kind": "resync", "cursor": cursor.to_string(), "pruned": pruned.to_string()})
        ),
        Style::Line => writeln!(out, "RESYNC NEEDED: events after {cursor} up to {pruned} were pruned before delivery"),
    }
}

/// Writes one row of a shape's snapshot (`listen --shape`): `row` is its
/// JSON object.
///
/// # Errors
/// When the output cannot be written.
pub fn write_snapshot_row(out: &mut impl Write, table: &str, row: &str, style: Style) -> std::io::Result<()> {
    match style {
        Style::Json => writeln!(out, r#"{{"kind":"snapshot","table":{},"row":{row}}}"#, serde_json::json!(table)),
        Style::Pretty => {
            let row: serde_json::Value = serde_json::from_str(row).unwrap_or_default();
            let v = serde_json::json!({"kind": "snapshot", "table": table, "row": row});
            writeln!(out, "{}", serde_json::to_string_pretty(&v).unwrap_or_default())
        }
        Style::Line => writeln!(out, "snapshot {table} {}", shorten(row)),
    }
}

/// Writes the end of a shape's snapshot: how many rows, and where its
/// changes begin.
///
/// # Errors
/// When the output cannot be written.
pub fn write_ready(
    out: &mut impl Write,
    table: &str,
    rows: u64,
    position: pgpubsub::Cursor,
    style: Style,
) -> std::io::Result<()> {
    match style {
        Style::Json | Style::Pretty => writeln!(
            out,
            "{}",
            serde_json::json!({"kind": "ready", "table": table, "rows": rows, "position": position.to_string()})
        ),
        Style::Line => writeln!(out, "ready {table}: {rows} rows; changes from {position}"),
    }
}

/// `text` up to [`SHOWN`] bytes (cut on a character boundary), with how much
/// was left out.
fn shorten(text: &str) -> String {
    if text.len() <= SHOWN {
        return text.to_string();
    }
    let mut cut = SHOWN;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}…(+{} bytes)", &text[..cut], text.len() - cut)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(text: &str) -> Event {
        Event::decode("t", text.to_string()).unwrap()
    }

    fn render(e: &Event, style: Style) -> String {
        let mut out = Vec::new();
        write_event(&mut out, e, style, None).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn line_style_names_everything_on_one_line() {
        let e = event(
            r#"{"seq":5,"kind":"change","channel":"t","op":"UPDATE","schema":"public","table":"t","key":{"id":1},"new":{"id":1,"v":"b"},"old":{"id":1,"v":"a"}}"#,
        );
        assert_eq!(
            render(&e, Style::Line),
            "t #5 UPDATE public.t key={\"id\":1} new={\"id\":1,\"v\":\"b\"} old={\"id\":1,\"v\":\"a\"}\n"
        );
        let e = event(r#"{"job_id":1}"#);
        assert_eq!(render(&e, Style::Line), "t - notify {\"job_id\":1}\n");
    }

    #[test]
    fn long_values_are_shortened_on_a_char_boundary() {
        let long = "é".repeat(1000);
        let e = event(&format!(r#"{{"seq":1,"kind":"message","channel":"t","payload":"{long}"}}"#));
        let line = render(&e, Style::Line);
        assert!(line.contains("…(+") && line.len() < 600 && line.ends_with("bytes)\n"));
        assert!(render(&e, Style::Json).contains(&long));
    }

    #[test]
    fn received_at_comes_first_and_keeps_the_event_whole() {
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_micros(1_763_758_939_048_203);
        let stamped = |text: &str, style| {
            let mut out = Vec::new();
            write_event(&mut out, &event(text), style, Some(at)).unwrap();
            String::from_utf8(out).unwrap()
        };
        let text = r#"{"seq":5,"kind":"change","channel":"t","op":"INSERT","schema":"public","table":"t","key":{"id":1},"new":{"id":1,"v":[1,2]}}"#;
        let line = stamped(text, Style::Json);
        assert!(line.starts_with(r#"{"received_at":"2025-11-21T21:02:19.048203Z","seq":5,"#), "{line}");
        let value: serde_json::Value = serde_json::from_str(&line).unwrap();
        let mut original: serde_json::Value = serde_json::from_str(text).unwrap();
        original["received_at"] = "2025-11-21T21:02:19.048203Z".into();
        assert_eq!(value, original);
        // Payloads that are not objects, or empty ones: still valid JSON.
        let value: serde_json::Value = serde_json::from_str(&stamped("[1,2]", Style::Json)).unwrap();
        assert_eq!(value["received_at"], "2025-11-21T21:02:19.048203Z");
        assert_eq!(value["payload"], serde_json::json!([1, 2]));
        let value: serde_json::Value = serde_json::from_str(&stamped("{ }", Style::Json)).unwrap();
        assert_eq!(value["received_at"], "2025-11-21T21:02:19.048203Z");
        assert_eq!(value["payload"], serde_json::json!({}));
        let pretty: serde_json::Value = serde_json::from_str(&stamped(text, Style::Pretty)).unwrap();
        assert_eq!(pretty["received_at"], "2025-11-21T21:02:19.048203Z");
        assert!(stamped(text, Style::Line).starts_with("2025-11-21T21:02:19.048203Z t #5 INSERT public.t"));
    }

    #[test]
    fn pretty_is_multi_line_json() {
        let e = event(r#"{"seq":1,"kind":"message","channel":"t","payload":"x"}"#);
        let text = render(&e, Style::Pretty);
        assert!(text.lines().count() > 3);
        assert_eq!(serde_json::from_str::<serde_json::Value>(&text).unwrap()["payload"], "x");
    }
}
