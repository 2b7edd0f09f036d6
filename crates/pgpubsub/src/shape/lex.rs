//! The text form's tokens: words, quoted identifiers, strings, numbers,
//! operators and punctuation, each with the byte position it starts at.

use super::filter::FilterError;

#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Token {
    /// A bare word, folded to lower case: a keyword or a column.
    Word(String),
    /// A double-quoted identifier.
    Quoted(String),
    Str(String),
    Num(String),
    Op(&'static str),
    Open,
    Close,
    Comma,
    End,
}

/// How a token is named in an error message.
impl Token {
    pub(crate) fn describe(&self) -> String {
        match self {
            Token::Word(w) => format!("`{w}`"),
            Token::Quoted(q) => format!("identifier {}", super::words::quote(q, '"')),
            Token::Str(s) => format!("string {}", super::words::quote(s, '\'')),
            Token::Num(n) => format!("number {n}"),
            Token::Op(o) => format!("`{o}`"),
            Token::Open => "`(`".into(),
            Token::Close => "`)`".into(),
            Token::Comma => "`,`".into(),
            Token::End => "the end of the filter".into(),
        }
    }
}

/// Reads tokens from the text, one at a time.
pub(crate) struct Lexer<'a> {
    pub(crate) text: &'a str,
    pub(crate) pos: usize,
}

impl Lexer<'_> {
    /// The next token and the byte position where it starts.
    pub(crate) fn next(&mut self) -> Result<(Token, usize), FilterError> {
        let bytes = self.text.as_bytes();
        while self.pos < bytes.len() && bytes[self.pos].is_ascii_whitespace() {
            self.pos += 1;
        }
        let at = self.pos;
        let rest = &self.text[self.pos..];
        let Some(c) = rest.chars().next() else {
            return Ok((Token::End, at));
        };
        let (token, len) = match c {
            '(' => (Token::Open, 1),
            ')' => (Token::Close, 1),
            ',' => (Token::Comma, 1),
            '\'' | '"' => self.quoted(rest, c)?,
            '<' | '>' | '=' | '!' => {
                let op = ["<=", ">=", "<>", "!=", "<", ">", "="].into_iter().find(|op| rest.starts_with(op));
                match op {
                    Some(op) => (Token::Op(op), op.len()),
                    None => return Err(unexpected(at, c, "an operator")),
                }
            }
            '0'..='9' | '.' | '-' => number(rest).ok_or_else(|| unexpected(at, c, "a number"))?,
            c if c.is_ascii_alphabetic() || c == '_' => {
                let len = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len());
                (Token::Word(rest[..len].to_ascii_lowercase()), len)
            }
            c => return Err(unexpected(at, c, "a column, a value, an operator or a parenthesis")),
        };
        self.pos += len;
        Ok((token, at))
    }

    /// A string (`'`) or identifier (`"`) starting at `rest`, doubled quotes inside.
    fn quoted(&self, rest: &str, q: char) -> Result<(Token, usize), FilterError> {
        let mut out = String::new();
        let mut chars = rest.char_indices().skip(1).peekable();
        while let Some((i, c)) = chars.next() {
            if c == q {
                if chars.peek().map(|&(_, n)| n) == Some(q) {
                    chars.next();
                } else {
                    let token = if q == '"' { Token::Quoted(out) } else { Token::Str(out) };
                    return Ok((token, i + 1));
                }
            }
            out.push(c);
        }
        let expected = if q == '"' { "a closing `\"`" } else { "a closing `'`" };
        Err(FilterError::Syntax { position: self.text.len(), expected: expected.into(), found: "the end".into() })
    }
}

fn unexpected(at: usize, c: char, expected: &str) -> FilterError {
    FilterError::Syntax { position: at, expected: expected.into(), found: format!("{c:?}") }
}

/// A number at the start of `s` and its length, if it is one.
fn number(s: &str) -> Option<(Token, usize)> {
    let b = s.as_bytes();
    let digits = |mut i: usize| {
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        (i, i - start)
    };
    let mut i = usize::from(b.first() == Some(&b'-'));
    let (end, whole) = digits(i);
    i = end;
    let mut frac = 0;
    if b.get(i) == Some(&b'.') {
        (i, frac) = digits(i + 1);
    }
    if whole + frac == 0 {
        return None;
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        let sign = usize::from(matches!(b.get(i + 1), Some(b'+' | b'-')));
        let (end, exp) = digits(i + 1 + sign);
        if exp == 0 {
            return None;
        }
        i = end;
    }
    if b.get(i).is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_' || *c == b'.') {
        return None;
    }
    Some((Token::Num(s[..i].to_string()), i))
}
