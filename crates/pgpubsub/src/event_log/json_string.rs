//! A string as a JSON string literal, escaped exactly as PostgreSQL's
//! `to_json(text)` and serde_json escape it: `"` `\\` and the short forms
//! `\b \f \n \r \t`, other control characters as `\u00xx` (lowercase hex),
//! nothing else. Runs with nothing to escape are skipped eight bytes at a
//! time and copied whole.

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// Bytes each byte takes once escaped.
const WIDTH: [u8; 256] = {
    let mut t = [1u8; 256];
    let mut b = 0;
    while b < 0x20 {
        t[b] = 6;
        b += 1;
    }
    t[0x08] = 2;
    t[0x0c] = 2;
    t[b'\n' as usize] = 2;
    t[b'\r' as usize] = 2;
    t[b'\t' as usize] = 2;
    t[b'"' as usize] = 2;
    t[b'\\' as usize] = 2;
    t
};

/// Whether any of the eight bytes in `w` needs escaping (exact: the
/// classic "has a zero byte" and "has a byte below n" tests).
fn any_special(w: u64) -> bool {
    let zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGHS;
    let below_space = w.wrapping_sub(ONES * 0x20) & !w & HIGHS;
    (below_space | zero(w ^ (ONES * u64::from(b'"'))) | zero(w ^ (ONES * u64::from(b'\\')))) != 0
}

/// The offset of the first byte at or after `i` that needs escaping, or
/// the length.
fn next_special(s: &[u8], mut i: usize) -> usize {
    while let Some(word) = s.get(i..i + 8) {
        if any_special(u64::from_le_bytes(word.try_into().unwrap_or([0; 8]))) {
            break;
        }
        i += 8;
    }
    while i < s.len() && WIDTH[usize::from(s[i])] == 1 {
        i += 1;
    }
    i
}

/// Length of `s` as a JSON string literal, quotes included.
pub fn len(s: &[u8]) -> usize {
    let mut n = s.len() + 2;
    let mut i = next_special(s, 0);
    while i < s.len() {
        n += usize::from(WIDTH[usize::from(s[i])]) - 1;
        i = next_special(s, i + 1);
    }
    n
}

/// Appends `s` as a JSON string literal, quotes included.
pub fn write(out: &mut String, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = s.as_bytes();
    out.push('"');
    let mut from = 0;
    let mut i = next_special(bytes, 0);
    // Every byte escaped is ASCII, so each run between two is whole
    // characters.
    while i < bytes.len() {
        out.push_str(&s[from..i]);
        let b = bytes[i];
        match b {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            0x08 => out.push_str("\\b"),
            0x0c => out.push_str("\\f"),
            b'\n' => out.push_str("\\n"),
            b'\r' => out.push_str("\\r"),
            b'\t' => out.push_str("\\t"),
            _ => {
                out.push_str("\\u00");
                out.push(char::from(HEX[usize::from(b >> 4)]));
                out.push(char::from(HEX[usize::from(b & 15)]));
            }
        }
        from = i + 1;
        i = next_special(bytes, from);
    }
    out.push_str(&s[from..]);
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::{len, write};

    #[test]
    fn strings_escape_as_serde_json_and_postgres_do() {
        let every: String = (1u8..0x80).map(char::from).chain("é€😀\u{2028}".chars()).collect();
        // Specials at every offset within and across eight-byte words.
        for s in ["", "plain", "q\"b\\s/", "\n\r\t\u{8}\u{c}\u{1}\u{1f}\u{7f}", "12345678\"", "1234567\u{0}x", &every] {
            let mut out = String::new();
            write(&mut out, s);
            let want = serde_json::to_string(s).unwrap();
            assert_eq!(out, want, "{s:?}");
            assert_eq!(len(s.as_bytes()), want.len(), "{s:?}");
        }
        // PostgreSQL's own escapes, spelled out.
        let mut out = String::new();
        write(&mut out, "\u{1}\u{8}\"\\\u{1f}");
        assert_eq!(out, r#""\u0001\b\"\\\u001f""#);
    }
}
