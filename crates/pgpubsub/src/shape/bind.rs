//! Binding a filter to a table: each column checked and typed from the
//! table's, each value read as its column's type, once, here.

use super::decimal::Decimal;
use super::filter::{CompareOp, Filter, FilterError, Literal, MAX_DEPTH, MAX_TERMS, MAX_VALUES};
use super::time::{Instant, Kind};
use super::types::{ColumnType, TypeRef};

/// A column of the table, as the bound filter uses it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Column {
    pub(crate) name: String,
    pub(crate) ty: ColumnType,
}

/// A value typed by its column.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Value {
    Int(i64),
    Numeric(Decimal),
    /// `real` values are `f32`s widened, so they compare as `f32`s do.
    Float(f64),
    Bool(bool),
    Text(String),
    Instant(Instant),
}

/// A filter checked against a table's columns, its values typed: what
/// [`BoundFilter::to_sql`] renders and [`BoundFilter::matches`] evaluates.
#[derive(Clone, Debug, PartialEq)]
pub struct BoundFilter {
    pub(crate) root: Node,
}

impl BoundFilter {
    /// The columns the filter reads, each once, in the order it names them.
    pub fn columns(&self) -> Vec<String> {
        fn walk(node: &Node, out: &mut Vec<String>) {
            let name = match node {
                Node::And(parts) | Node::Or(parts) => return parts.iter().for_each(|p| walk(p, out)),
                Node::Not(inner) => return walk(inner, out),
                Node::Compare(c, ..) | Node::In(c, _) | Node::IsNull(c, _) | Node::Like(c, _) => &c.name,
            };
            if !out.contains(name) {
                out.push(name.clone());
            }
        }
        let mut out = Vec::new();
        walk(&self.root, &mut out);
        out
    }
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Node {
    And(Vec<Node>),
    Or(Vec<Node>),
    Not(Box<Node>),
    Compare(Column, CompareOp, Value),
    In(Column, Vec<Value>),
    IsNull(Column, bool),
    Like(Column, String),
}

impl Filter {
    /// Checks the filter against the table's `columns` (each a name and a
    /// type: a name as [`ColumnType::from_name`] reads it, an OID, or a
    /// `tokio_postgres` [`Type`](tokio_postgres::types::Type)) and types its values.
    ///
    /// # Errors
    /// [`FilterError::UnknownColumn`], [`FilterError::UnsupportedType`] for a
    /// column the filter uses whose type is not supported,
    /// [`FilterError::BadValue`] for a value that does not fit its column or
    /// `like` on a column that is not text; [`FilterError::TooDeep`] or
    /// [`FilterError::TooLarge`] for a filter built in code past the bounds.
    pub fn bind<N: AsRef<str>, T: TypeRef>(&self, columns: &[(N, T)]) -> Result<BoundFilter, FilterError> {
        check_bounds(self)?;
        let root = bind_node(self, &|name: &str| {
            let (_, ty) = columns
                .iter()
                .find(|(n, _)| n.as_ref() == name)
                .ok_or_else(|| FilterError::UnknownColumn(name.into()))?;
            let unsupported = |type_name| FilterError::UnsupportedType { column: name.into(), type_name };
            Ok(Column { name: name.into(), ty: ty.column_type().map_err(unsupported)? })
        })?;
        Ok(BoundFilter { root })
    }
}

/// Depth, predicates and values of a filter built in code, counted without recursion.
fn check_bounds(filter: &Filter) -> Result<(), FilterError> {
    let (mut terms, mut values) = (0, 0);
    let mut stack = vec![(filter, 0)];
    while let Some((f, depth)) = stack.pop() {
        if depth > MAX_DEPTH + 1 {
            return Err(FilterError::TooDeep);
        }
        match f {
            Filter::And(parts) | Filter::Or(parts) => stack.extend(parts.iter().map(|p| (p, depth + 1))),
            Filter::Not(inner) => stack.push((inner, depth + 1)),
            Filter::In { values: v, .. } => (terms, values) = (terms + 1, values + v.len()),
            _ => (terms, values) = (terms + 1, values + 1),
        }
        if terms > MAX_TERMS || values > MAX_VALUES {
            return Err(FilterError::TooLarge(if terms > MAX_TERMS { "256 predicates" } else { "1024 values" }));
        }
    }
    Ok(())
}

type Lookup<'a> = dyn Fn(&str) -> Result<Column, FilterError> + 'a;

fn bind_node(filter: &Filter, column: &Lookup<'_>) -> Result<Node, FilterError> {
    let all = |parts: &[Filter]| parts.iter().map(|p| bind_node(p, column)).collect::<Result<Vec<_>, _>>();
    Ok(match filter {
        Filter::And(parts) if !parts.is_empty() => Node::And(all(parts)?),
        Filter::Or(parts) if !parts.is_empty() => Node::Or(all(parts)?),
        Filter::And(_) | Filter::Or(_) => return Err(FilterError::TooLarge("zero parts: `and`/`or` need one")),
        Filter::Not(inner) => Node::Not(Box::new(bind_node(inner, column)?)),
        Filter::Compare { column: name, op, value } => {
            let c = column(name)?;
            let v = typed(&c, value)?;
            Node::Compare(c, *op, v)
        }
        Filter::In { column: name, values } => {
            let c = column(name)?;
            if values.is_empty() {
                return Err(bad(&c, "`in` needs at least one value".into()));
            }
            let v = values.iter().map(|v| typed(&c, v)).collect::<Result<Vec<_>, _>>()?;
            Node::In(c, v)
        }
        Filter::IsNull { column: name, negated } => Node::IsNull(column(name)?, *negated),
        Filter::Like { column: name, pattern } => {
            let c = column(name)?;
            if !matches!(c.ty, ColumnType::Text | ColumnType::Varchar) {
                return Err(bad(&c, "`like` applies to text columns only".into()));
            }
            if pattern.contains('\0') {
                return Err(bad(&c, "a pattern cannot contain a NUL character".into()));
            }
            if pattern.chars().fold(false, |escaped, ch| !escaped && ch == '\\') {
                return Err(bad(&c, "a `like` pattern must not end with the escape character `\\`".into()));
            }
            Node::Like(c, pattern.clone())
        }
    })
}

fn bad(c: &Column, reason: String) -> FilterError {
    FilterError::BadValue { column: c.name.clone(), type_name: c.ty.sql_name(), reason }
}

/// Reads `literal` as a value of the column's type, as PostgreSQL would read
/// a constant compared with the column; a string may hold a number or a
/// boolean (`'2'`), a number never stands for text.
fn typed(c: &Column, literal: &Literal) -> Result<Value, FilterError> {
    let not = |what: &str| bad(c, format!("{literal} is not {what}"));
    let text = match literal {
        Literal::Text(t) | Literal::Number(t) => t.as_str(),
        Literal::Bool(b) if c.ty == ColumnType::Bool => return Ok(Value::Bool(*b)),
        Literal::Bool(_) => return Err(not("of the column's type (a boolean is compared with boolean columns only)")),
    };
    match c.ty {
        ColumnType::Int2 | ColumnType::Int4 | ColumnType::Int8 => {
            let (min, max) = match c.ty {
                ColumnType::Int2 => (i16::MIN as i64, i16::MAX as i64),
                ColumnType::Int4 => (i32::MIN as i64, i32::MAX as i64),
                _ => (i64::MIN, i64::MAX),
            };
            let n = Decimal::parse(text).ok_or_else(|| not("a number"))?;
            let n = n.to_i64().filter(|n| (min..=max).contains(n));
            n.map(Value::Int).ok_or_else(|| not(&format!("an integer from {min} to {max}")))
        }
        ColumnType::Numeric => Decimal::parse(text).map(Value::Numeric).ok_or_else(|| not("a number")),
        ColumnType::Float4 | ColumnType::Float8 => {
            let t = text.trim();
            let word = t.trim_start_matches(['-', '+']).to_ascii_lowercase();
            let special = matches!(word.as_str(), "nan" | "inf" | "infinity");
            let f = if c.ty == ColumnType::Float4 { t.parse::<f32>().map(f64::from) } else { t.parse::<f64>() };
            match f {
                Ok(f) if special || f.is_finite() => Ok(Value::Float(f)),
                _ => Err(not("a number in the range of the type")),
            }
        }
        ColumnType::Bool => match (literal, text.trim().to_ascii_lowercase().as_str()) {
            (Literal::Text(_), "t" | "true" | "yes" | "on" | "1") => Ok(Value::Bool(true)),
            (Literal::Text(_), "f" | "false" | "no" | "off" | "0") => Ok(Value::Bool(false)),
            _ => Err(not("a boolean")),
        },
        ColumnType::Text | ColumnType::Varchar => match literal {
            Literal::Text(t) if t.contains('\0') => Err(bad(c, "text cannot contain a NUL character".into())),
            Literal::Text(t) => Ok(Value::Text(t.clone())),
            _ => Err(not("text: write it as a string, '…'")),
        },
        ColumnType::Date | ColumnType::Timestamp | ColumnType::Timestamptz => {
            let kind = c.ty.time_kind().unwrap_or(Kind::Date);
            let instant = match literal {
                Literal::Text(t) => Instant::parse(t, kind, true),
                _ => None,
            };
            instant.map(Value::Instant).ok_or_else(|| {
                not(match kind {
                    Kind::Date => "a date: 'YYYY-MM-DD' (years 1 to 9999) or 'infinity'",
                    Kind::Timestamp => "a timestamp without offset: 'YYYY-MM-DD HH:MM[:SS[.ffffff]]'",
                    Kind::Timestamptz => "a timestamp with its offset: 'YYYY-MM-DDTHH:MM[:SS[.ffffff]](Z|+HH[:MM])'",
                })
            })
        }
    }
}
