//! A filter over a row's columns, as a client writes it: the tree, its
//! bounds and its errors. [`parse`](super::parse) reads the text form,
//! [`json`](super::json) the JSON form; [`Filter::bind`] types it against a
//! table's columns.

use std::fmt;

/// The deepest nesting (parentheses, `not`, `and`/`or` levels) a filter may
/// have: deeper filters are refused before they can exhaust the stack.
pub const MAX_DEPTH: usize = 64;

/// The most predicates (comparisons, `in`, `is null`, `like`) in one filter.
pub const MAX_TERMS: usize = 256;

/// The most values in all the `in (...)` lists of one filter together.
pub const MAX_VALUES: usize = 1024;

/// The longest filter text (or JSON) accepted, in bytes.
pub const MAX_BYTES: usize = 64 * 1024;

/// A filter, parsed but not yet checked against a table: column names are as
/// written, literals not yet typed. [`Filter::bind`] checks and types it.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Filter {
    /// True when every part is true (SQL `AND`); never empty.
    And(Vec<Filter>),
    /// True when any part is true (SQL `OR`); never empty.
    Or(Vec<Filter>),
    /// True when the part is false (SQL `NOT`: `not unknown` is unknown).
    Not(Box<Filter>),
    /// `column op value`.
    Compare {
        /// The column, as named in the table (case kept).
        column: String,
        /// The comparison.
        op: CompareOp,
        /// The value compared with.
        value: Literal,
    },
    /// `column in (values...)`; never empty.
    In {
        /// The column.
        column: String,
        /// The values, any of which matches.
        values: Vec<Literal>,
    },
    /// `column is null`, or `column is not null` with `negated`.
    IsNull {
        /// The column.
        column: String,
        /// `is not null`.
        negated: bool,
    },
    /// `column like 'pattern'`: `%` any run, `_` one character, `\` escapes.
    Like {
        /// The column (text or varchar).
        column: String,
        /// The pattern.
        pattern: String,
    },
}

/// A comparison operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CompareOp {
    /// `=`
    Eq,
    /// `<>` (also written `!=`)
    Ne,
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
}

impl CompareOp {
    /// The operator as SQL and the text form write it.
    pub fn as_str(self) -> &'static str {
        match self {
            CompareOp::Eq => "=",
            CompareOp::Ne => "<>",
            CompareOp::Lt => "<",
            CompareOp::Le => "<=",
            CompareOp::Gt => ">",
            CompareOp::Ge => ">=",
        }
    }

    /// The operator written as `s`, if it is one (`!=` is `<>`).
    pub fn from_symbol(s: &str) -> Option<CompareOp> {
        Some(match s {
            "=" => CompareOp::Eq,
            "<>" | "!=" => CompareOp::Ne,
            "<" => CompareOp::Lt,
            "<=" => CompareOp::Le,
            ">" => CompareOp::Gt,
            ">=" => CompareOp::Ge,
            _ => return None,
        })
    }

    /// Whether `ordering` (of the column's value against the literal) satisfies it.
    pub(crate) fn holds(self, ordering: std::cmp::Ordering) -> bool {
        use std::cmp::Ordering::*;
        match self {
            CompareOp::Eq => ordering == Equal,
            CompareOp::Ne => ordering != Equal,
            CompareOp::Lt => ordering == Less,
            CompareOp::Le => ordering != Greater,
            CompareOp::Gt => ordering == Greater,
            CompareOp::Ge => ordering != Less,
        }
    }
}

/// A value as written, before it is typed by its column.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Literal {
    /// A quoted string; it may still be read as a number or a boolean, as SQL
    /// reads `'2'` for an integer column.
    Text(String),
    /// A number, kept as written so no precision is lost.
    Number(String),
    /// `true` or `false`.
    Bool(bool),
}

/// Why a filter was refused. The message says where and what was expected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FilterError {
    /// The text (or JSON) is not a filter.
    #[error("filter syntax error at byte {position}: expected {expected}, found {found}")]
    Syntax {
        /// Byte offset in the text (0 for JSON, whose path is in `found`).
        position: usize,
        /// What would have been accepted here.
        expected: String,
        /// What was there instead.
        found: String,
    },
    /// Nested deeper than [`MAX_DEPTH`].
    #[error("filter nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
    /// More predicates than [`MAX_TERMS`], values than [`MAX_VALUES`] or bytes than [`MAX_BYTES`].
    #[error("filter too large: more than {0}")]
    TooLarge(&'static str),
    /// The column is not one of the table's.
    #[error("unknown column {0:?}")]
    UnknownColumn(String),
    /// The column's type is not one filters support.
    #[error(
        "column {column:?} has type {type_name}, which filters do not support (supported: {})",
        super::types::SUPPORTED
    )]
    UnsupportedType {
        /// The column.
        column: String,
        /// Its type, as given.
        type_name: String,
    },
    /// The value does not fit the column's type, or the operator does not apply to it.
    #[error("column {column:?} ({type_name}): {reason}")]
    BadValue {
        /// The column.
        column: String,
        /// Its type.
        type_name: &'static str,
        /// What is wrong.
        reason: String,
    },
}

impl fmt::Display for Filter {
    /// The text form, which [`Filter::parse`] reads back to the same filter.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let join = |f: &mut fmt::Formatter<'_>, parts: &[Filter], word: &str| {
            f.write_str("(")?;
            for (i, p) in parts.iter().enumerate() {
                if i > 0 {
                    write!(f, " {word} ")?;
                }
                write!(f, "{p}")?;
            }
            f.write_str(")")
        };
        match self {
            Filter::And(parts) => join(f, parts, "and"),
            Filter::Or(parts) => join(f, parts, "or"),
            Filter::Not(inner) => write!(f, "not {inner}"),
            Filter::Compare { column, op, value } => write!(f, "{} {} {value}", ident(column), op.as_str()),
            Filter::In { column, values } => {
                write!(f, "{} in (", ident(column))?;
                for (i, v) in values.iter().enumerate() {
                    write!(f, "{}{v}", if i > 0 { ", " } else { "" })?;
                }
                f.write_str(")")
            }
            Filter::IsNull { column, negated } => {
                write!(f, "{} is {}null", ident(column), if *negated { "not " } else { "" })
            }
            Filter::Like { column, pattern } => {
                write!(f, "{} like {}", ident(column), super::words::quote(pattern, '\''))
            }
        }
    }
}

impl fmt::Display for Literal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Literal::Text(s) => f.write_str(&super::words::quote(s, '\'')),
            Literal::Number(n) => f.write_str(n),
            Literal::Bool(b) => write!(f, "{b}"),
        }
    }
}

/// A column name as the text form writes it: bare when it reads back the
/// same (lower case, not a keyword), else double-quoted.
fn ident(name: &str) -> String {
    let bare = name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !super::words::is_keyword(name);
    if bare {
        name.to_string()
    } else {
        super::words::quote(name, '"')
    }
}
