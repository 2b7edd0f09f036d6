//! The column types a filter can compare on, and how a caller names them.

use super::time::Kind;

/// The column types filters support, as the errors list them.
pub const SUPPORTED: &str = "smallint, integer, bigint, numeric, real, double precision, boolean, text, \
     character varying, date, timestamp, timestamp with time zone";

/// A column type a filter can compare on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ColumnType {
    /// `smallint` (`int2`).
    Int2,
    /// `integer` (`int4`).
    Int4,
    /// `bigint` (`int8`).
    Int8,
    /// `numeric` (`decimal`), compared exactly.
    Numeric,
    /// `real` (`float4`).
    Float4,
    /// `double precision` (`float8`).
    Float8,
    /// `boolean`.
    Bool,
    /// `text`.
    Text,
    /// `character varying` (`varchar`), compared as `text`.
    Varchar,
    /// `date`.
    Date,
    /// `timestamp` (without time zone).
    Timestamp,
    /// `timestamp with time zone` (`timestamptz`), compared as instants.
    Timestamptz,
}

impl ColumnType {
    /// The type named `name` as PostgreSQL writes it (`format_type` or
    /// `pg_type.typname`: `integer`, `int4`, `numeric(10,2)`,
    /// `character varying(20)`...), if filters support it.
    pub fn from_name(name: &str) -> Option<ColumnType> {
        // Without a type modifier: `numeric(10,2)`, `timestamp(3) with time zone`.
        let mut base = String::new();
        let mut depth = 0;
        for c in name.trim().chars() {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                c if depth == 0 => base.push(c.to_ascii_lowercase()),
                _ => {}
            }
        }
        Some(match base.split_whitespace().collect::<Vec<_>>().join(" ").as_str() {
            "smallint" | "int2" => ColumnType::Int2,
            "integer" | "int" | "int4" => ColumnType::Int4,
            "bigint" | "int8" => ColumnType::Int8,
            "numeric" | "decimal" => ColumnType::Numeric,
            "real" | "float4" => ColumnType::Float4,
            "double precision" | "float8" => ColumnType::Float8,
            "boolean" | "bool" => ColumnType::Bool,
            "text" => ColumnType::Text,
            "character varying" | "varchar" => ColumnType::Varchar,
            "date" => ColumnType::Date,
            "timestamp" | "timestamp without time zone" => ColumnType::Timestamp,
            "timestamptz" | "timestamp with time zone" => ColumnType::Timestamptz,
            _ => return None,
        })
    }

    /// The type with this OID (PostgreSQL's built-in OIDs), if supported.
    pub fn from_oid(oid: u32) -> Option<ColumnType> {
        Some(match oid {
            21 => ColumnType::Int2,
            23 => ColumnType::Int4,
            20 => ColumnType::Int8,
            1700 => ColumnType::Numeric,
            700 => ColumnType::Float4,
            701 => ColumnType::Float8,
            16 => ColumnType::Bool,
            25 => ColumnType::Text,
            1043 => ColumnType::Varchar,
            1082 => ColumnType::Date,
            1114 => ColumnType::Timestamp,
            1184 => ColumnType::Timestamptz,
            _ => return None,
        })
    }

    /// The type's SQL name, used in the casts of [`BoundFilter::to_sql`](super::BoundFilter::to_sql).
    pub fn sql_name(self) -> &'static str {
        match self {
            ColumnType::Int2 => "int2",
            ColumnType::Int4 => "int4",
            ColumnType::Int8 => "int8",
            ColumnType::Numeric => "numeric",
            ColumnType::Float4 => "float4",
            ColumnType::Float8 => "float8",
            ColumnType::Bool => "bool",
            ColumnType::Text => "text",
            ColumnType::Varchar => "varchar",
            ColumnType::Date => "date",
            ColumnType::Timestamp => "timestamp",
            ColumnType::Timestamptz => "timestamptz",
        }
    }

    /// How a `date` or timestamp column's values are read.
    pub(crate) fn time_kind(self) -> Option<Kind> {
        match self {
            ColumnType::Date => Some(Kind::Date),
            ColumnType::Timestamp => Some(Kind::Timestamp),
            ColumnType::Timestamptz => Some(Kind::Timestamptz),
            _ => None,
        }
    }
}

/// How [`Filter::bind`](super::Filter::bind) is told a column's type: by name (`&str`,
/// `String`), by OID (`u32`), as a `tokio_postgres` type, or directly.
pub trait TypeRef {
    /// The type, or its name for the error when filters do not support it.
    ///
    /// # Errors
    /// The type's name (or OID) when it is not a [`ColumnType`].
    fn column_type(&self) -> Result<ColumnType, String>;
}

impl TypeRef for &str {
    fn column_type(&self) -> Result<ColumnType, String> {
        ColumnType::from_name(self).ok_or_else(|| self.to_string())
    }
}

impl TypeRef for String {
    fn column_type(&self) -> Result<ColumnType, String> {
        self.as_str().column_type()
    }
}

impl TypeRef for u32 {
    fn column_type(&self) -> Result<ColumnType, String> {
        ColumnType::from_oid(*self).ok_or_else(|| format!("OID {self}"))
    }
}

impl TypeRef for tokio_postgres::types::Type {
    fn column_type(&self) -> Result<ColumnType, String> {
        ColumnType::from_oid(self.oid()).ok_or_else(|| self.name().to_string())
    }
}

impl TypeRef for ColumnType {
    fn column_type(&self) -> Result<ColumnType, String> {
        Ok(*self)
    }
}
