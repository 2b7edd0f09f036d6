//! `date`, `timestamp` and `timestamptz` values: read from a filter's
//! literal or from a row as `row_to_json` writes it (`2024-01-02`,
//! `2024-01-02T03:04:05.5+01:00`, `0044-03-15 BC`, `infinity`), and sent to
//! PostgreSQL in its own binary form, so both sides compare the same
//! integers: days or microseconds since 2000-01-01 (UTC for `timestamptz`).

use std::error::Error;

use bytes::{BufMut, BytesMut};
use tokio_postgres::types::{to_sql_checked, IsNull, ToSql, Type};

/// Which of the three a text is read as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Date,
    /// `timestamp` (without time zone): an offset is refused.
    Timestamp,
    /// `timestamptz`: a literal must give its offset (`Z`, `+02`, `-05:30`).
    Timestamptz,
}

/// A date or timestamp as PostgreSQL stores it: days (`date`) or
/// microseconds since 2000-01-01; `i64::MIN`/`i64::MAX` (dates:
/// `i32::MIN`/`i32::MAX`) are `-infinity`/`infinity`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Instant(pub(crate) i64);

/// Days from 1970-01-01 to the date (proleptic Gregorian, year 0 = 1 BC).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

const DAYS_1970_TO_2000: i64 = 10_957;
const DAY_MICROS: i64 = 86_400_000_000;

/// A cursor over the text, reading fixed fields.
struct Fields<'a>(&'a [u8]);

impl Fields<'_> {
    /// 1 to `max` digits.
    fn number(&mut self, min: usize, max: usize) -> Option<i64> {
        let n = self.0.iter().take(max).take_while(|b| b.is_ascii_digit()).count();
        if n < min {
            return None;
        }
        let (digits, rest) = self.0.split_at(n);
        self.0 = rest;
        std::str::from_utf8(digits).ok()?.parse().ok()
    }
    fn eat(&mut self, b: u8) -> bool {
        let is = self.0.first() == Some(&b);
        if is {
            self.0 = &self.0[1..];
        }
        is
    }
}

impl Instant {
    /// Reads `text` as `kind`. `literal` when it comes from a filter: years
    /// 1 to 9999 only, and a `timestamptz` needs its offset. `None` if it is
    /// not one.
    pub(crate) fn parse(text: &str, kind: Kind, literal: bool) -> Option<Instant> {
        let text = text.trim();
        let infinity = if kind == Kind::Date { i64::from(i32::MAX) } else { i64::MAX };
        match text.to_ascii_lowercase().as_str() {
            "infinity" | "+infinity" => return Some(Instant(infinity)),
            "-infinity" => return Some(Instant(if kind == Kind::Date { i64::from(i32::MIN) } else { i64::MIN })),
            _ => {}
        }
        let (text, bc) = match text.strip_suffix(" BC") {
            Some(t) if !literal => (t, true),
            _ => (text, false),
        };
        let mut f = Fields(text.as_bytes());
        let year = f.number(4, 6)?;
        if (literal && !(1..=9999).contains(&year)) || (bc && year == 0) {
            return None;
        }
        let year = if bc { 1 - year } else { year };
        let (month, day) = (f.eat(b'-').then(|| f.number(2, 2))??, f.eat(b'-').then(|| f.number(2, 2))??);
        let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
        let days_in_month = [31, if leap { 29 } else { 28 }, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
        if !(1..=12).contains(&month) || day < 1 || day > days_in_month[month as usize - 1] {
            return None;
        }
        let days = days_from_civil(year, month, day) - DAYS_1970_TO_2000;
        if kind == Kind::Date {
            return f.0.is_empty().then_some(Instant(days));
        }
        if !(f.eat(b'T') || f.eat(b' ')) {
            return None;
        }
        let hour = f.number(2, 2).filter(|h| *h < 24)?;
        let minute = f.eat(b':').then(|| f.number(2, 2))?.filter(|m| *m < 60)?;
        let mut micros = (hour * 3600 + minute * 60) * 1_000_000;
        if f.eat(b':') {
            micros += f.number(2, 2).filter(|s| *s < 60)? * 1_000_000;
            if f.eat(b'.') {
                let before = f.0.len();
                let frac = f.number(1, 6)?;
                micros += frac * 10_i64.pow(6 - (before - f.0.len()) as u32);
            }
        }
        let offset = if f.eat(b'Z') {
            Some(0)
        } else if f.0.first().is_some_and(|b| *b == b'+' || *b == b'-') {
            let sign = if f.eat(b'-') { -1 } else { i64::from(f.eat(b'+')) };
            let mut seconds = f.number(2, 2).filter(|h| *h <= 15)? * 3600;
            if f.eat(b':') {
                seconds += f.number(2, 2).filter(|m| *m < 60)? * 60;
                if f.eat(b':') {
                    seconds += f.number(2, 2).filter(|s| *s < 60)?;
                }
            }
            Some(sign * seconds)
        } else {
            None
        };
        let offset = match (kind, offset, literal) {
            (Kind::Timestamp, Some(_), _) | (Kind::Timestamptz, None, true) => return None,
            (_, offset, _) => offset.unwrap_or(0),
        };
        if !f.0.is_empty() {
            return None;
        }
        // Checked: a row's year may reach 999999, past what fits.
        let utc = days.checked_mul(DAY_MICROS)?.checked_add(micros)?.checked_sub(offset * 1_000_000)?;
        Some(Instant(utc))
    }
}

/// An [`Instant`] as a query parameter of its column's type (days for a
/// `date`, microseconds for the others).
#[derive(Debug)]
pub(crate) struct Param(pub(crate) Instant);

impl ToSql for Param {
    fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        if *ty == Type::DATE {
            out.put_i32(i32::try_from(self.0 .0)?);
        } else {
            out.put_i64(self.0 .0);
        }
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::DATE || *ty == Type::TIMESTAMP || *ty == Type::TIMESTAMPTZ
    }

    to_sql_checked!();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str, kind: Kind, literal: bool) -> Option<i64> {
        Instant::parse(text, kind, literal).map(|i| i.0)
    }

    #[test]
    fn reads_what_row_to_json_writes() {
        assert_eq!(at("2000-01-01", Kind::Date, true), Some(0));
        assert_eq!(at("1999-12-31", Kind::Date, true), Some(-1));
        assert_eq!(at("2000-03-01", Kind::Date, true), Some(60));
        assert_eq!(at("0001-01-01 BC", Kind::Date, false), Some(days_from_civil(0, 1, 1) - DAYS_1970_TO_2000));
        assert_eq!(at("infinity", Kind::Date, false), Some(i64::from(i32::MAX)));
        assert_eq!(at("-infinity", Kind::Timestamptz, false), Some(i64::MIN));
        assert_eq!(at("2000-01-01T00:00:01.5+00:00", Kind::Timestamptz, false), Some(1_500_000));
        assert_eq!(at("2000-01-01T05:21:10+05:21:10", Kind::Timestamptz, false), Some(0));
        assert_eq!(at("1999-12-31T23:00:00-01", Kind::Timestamptz, true), Some(0));
        assert_eq!(at("2000-01-01 00:00Z", Kind::Timestamptz, true), Some(0));
        assert_eq!(at("2000-01-01T00:00:00.000001", Kind::Timestamp, false), Some(1));
        assert_eq!(at("999999-12-31T00:00:00", Kind::Timestamp, false), None, "beyond i64: refused, not wrapped");
    }

    #[test]
    fn literals_are_strict() {
        for (bad, kind) in [
            ("2000-02-30", Kind::Date),
            ("2001-02-29", Kind::Date),
            ("2000-1-1", Kind::Date),
            ("0000-01-01", Kind::Date),
            ("12345-01-01", Kind::Date),
            ("0044-03-15 BC", Kind::Date),
            ("2000-01-01 00:00", Kind::Timestamptz),
            ("2000-01-01 00:00+01", Kind::Timestamp),
            ("2000-01-01 24:00Z", Kind::Timestamptz),
            ("2000-01-01 00:00:00.1234567Z", Kind::Timestamptz),
            ("2000-01-01 00:00+16", Kind::Timestamptz),
            ("2000-01-01x", Kind::Date),
            ("", Kind::Date),
        ] {
            assert_eq!(Instant::parse(bad, kind, true), None, "{bad}");
        }
    }
}
