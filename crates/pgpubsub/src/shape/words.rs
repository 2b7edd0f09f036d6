//! The text form's keywords and quoting, shared by the parser, the
//! lexer's messages and the filter's `Display`.

const KEYWORDS: [&str; 9] = ["and", "or", "not", "in", "is", "null", "like", "true", "false"];

/// Whether a (lower-case) bare word is one of the grammar's keywords, which
/// a column so named must be quoted to avoid.
pub(crate) fn is_keyword(word: &str) -> bool {
    KEYWORDS.contains(&word)
}

/// `s` between `q`s, each `q` inside doubled (as SQL quotes).
pub(crate) fn quote(s: &str, q: char) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push(q);
    for c in s.chars() {
        if c == q {
            out.push(q);
        }
        out.push(c);
    }
    out.push(q);
    out
}
