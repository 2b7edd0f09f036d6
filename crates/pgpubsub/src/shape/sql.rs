//! The first evaluator: a bound filter as a parameterized SQL predicate, for
//! reading the rows that match (a shape's snapshot). Columns are quoted
//! identifiers, values are parameters; no client text is ever formatted in.

use tokio_postgres::types::ToSql;

use super::bind::{BoundFilter, Column, Node, Value};
use super::types::ColumnType;
use super::{quote_ident, time};

/// A query parameter, owned, sendable to a connection on another task.
pub type Param = Box<dyn ToSql + Sync + Send>;

impl BoundFilter {
    /// The filter as a SQL boolean expression whose parameters are numbered
    /// from `$first_param` (1 when they are the query's only ones), and their
    /// values in order. Use it as `WHERE (<sql>)`: a row is selected exactly
    /// when [`BoundFilter::matches`] says it matches.
    ///
    /// Text is compared with `COLLATE "C"` (by code point, as `matches`
    /// does), whatever the column's collation. Costs one allocation per
    /// value; the statement should be prepared per filter, not cached across them.
    pub fn to_sql(&self, first_param: usize) -> (String, Vec<Param>) {
        let mut sql = String::new();
        let mut params = Vec::new();
        render(&self.root, first_param, &mut sql, &mut params);
        (sql, params)
    }
}

fn render(node: &Node, first: usize, sql: &mut String, params: &mut Vec<Param>) {
    let mut join = |parts: &[Node], word: &str, sql: &mut String| {
        sql.push('(');
        for (i, p) in parts.iter().enumerate() {
            if i > 0 {
                sql.push_str(word);
            }
            render(p, first, sql, params);
        }
        sql.push(')');
    };
    match node {
        Node::And(parts) => join(parts, " AND ", sql),
        Node::Or(parts) => join(parts, " OR ", sql),
        Node::Not(inner) => {
            sql.push_str("(NOT ");
            render(inner, first, sql, params);
            sql.push(')');
        }
        Node::Compare(c, op, v) => {
            let placeholder = param(c, v, first, params);
            sql.push_str(&format!("({} {} {placeholder})", quote_ident(&c.name), op.as_str()));
        }
        Node::In(c, values) => {
            let list: Vec<String> = values.iter().map(|v| param(c, v, first, params)).collect();
            sql.push_str(&format!("({} IN ({}))", quote_ident(&c.name), list.join(", ")));
        }
        Node::IsNull(c, negated) => {
            sql.push_str(&format!("({} IS {}NULL)", quote_ident(&c.name), if *negated { "NOT " } else { "" }));
        }
        Node::Like(c, pattern) => {
            let placeholder = param(c, &Value::Text(pattern.clone()), first, params);
            sql.push_str(&format!("({} LIKE {placeholder})", quote_ident(&c.name)));
        }
    }
}

/// Pushes `v` as the next parameter; returns its placeholder, cast to the
/// column's type (text with `COLLATE "C"`, numeric through its exact text).
fn param(c: &Column, v: &Value, first: usize, params: &mut Vec<Param>) -> String {
    let n = first + params.len();
    let (value, cast): (Param, &str) = match (c.ty, v) {
        (ColumnType::Int2, Value::Int(i)) => (Box::new(*i as i16), "::int2"),
        (ColumnType::Int4, Value::Int(i)) => (Box::new(*i as i32), "::int4"),
        (_, Value::Int(i)) => (Box::new(*i), "::int8"),
        (_, Value::Numeric(d)) => (Box::new(d.to_sql_text()), "::text::numeric"),
        (ColumnType::Float4, Value::Float(f)) => (Box::new(*f as f32), "::float4"),
        (_, Value::Float(f)) => (Box::new(*f), "::float8"),
        (_, Value::Bool(b)) => (Box::new(*b), "::bool"),
        (_, Value::Text(t)) => (Box::new(t.clone()), "::text COLLATE \"C\""),
        (ColumnType::Date, Value::Instant(i)) => (Box::new(time::Param(*i)), "::date"),
        (ColumnType::Timestamp, Value::Instant(i)) => (Box::new(time::Param(*i)), "::timestamp"),
        (_, Value::Instant(i)) => (Box::new(time::Param(*i)), "::timestamptz"),
    };
    params.push(value);
    format!("${n}{cast}")
}
