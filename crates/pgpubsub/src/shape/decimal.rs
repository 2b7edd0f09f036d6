//! Exact decimal numbers, ordered as PostgreSQL orders `numeric`:
//! `-Infinity` < every finite number < `Infinity` < `NaN`, and `NaN = NaN`.
//! Digits are kept as text, so no precision is lost (no `f64` on the way).

use std::cmp::Ordering;

/// The largest exponent accepted in `1e…` notation, so that a short literal
/// cannot expand to megabytes of digits.
pub(crate) const MAX_EXPONENT: i64 = 1000;

/// A `numeric` value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Decimal {
    NegInfinity,
    /// `int`: digits before the point, without leading zeros; `frac`: after
    /// it, without trailing zeros. Zero is `neg: false` with both empty.
    Finite {
        neg: bool,
        int: String,
        frac: String,
    },
    Infinity,
    NaN,
}

impl Decimal {
    /// Reads `-12.50`, `1e3`, `.5`, `NaN`, `Infinity`, `-inf` (as
    /// `numeric_in` does, surrounding spaces allowed). `None` if it is not a
    /// number or its exponent is beyond [`MAX_EXPONENT`].
    pub(crate) fn parse(text: &str) -> Option<Decimal> {
        let text = text.trim();
        let (neg, body) = match text.as_bytes().first() {
            Some(b'-') => (true, &text[1..]),
            Some(b'+') => (false, &text[1..]),
            _ => (false, text),
        };
        if body.eq_ignore_ascii_case("nan") && body.len() == text.len() {
            return Some(Decimal::NaN);
        }
        if body.eq_ignore_ascii_case("infinity") || body.eq_ignore_ascii_case("inf") {
            return Some(if neg { Decimal::NegInfinity } else { Decimal::Infinity });
        }
        let (mantissa, exp) = match body.find(['e', 'E']) {
            Some(i) => (&body[..i], body[i + 1..].parse::<i64>().ok().filter(|e| e.abs() <= MAX_EXPONENT)?),
            None => (body, 0),
        };
        let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
        let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        if int.len() + frac.len() == 0 || !all_digits(int) || !all_digits(frac) {
            return None;
        }
        // Move the point by the exponent: digits, and where the point falls in them.
        let digits = format!("{int}{frac}");
        let point = int.len() as i64 + exp;
        let (int, frac) = if point <= 0 {
            (String::new(), format!("{}{digits}", "0".repeat(point.unsigned_abs() as usize)))
        } else if point as usize >= digits.len() {
            (format!("{digits}{}", "0".repeat(point as usize - digits.len())), String::new())
        } else {
            let (i, f) = digits.split_at(point as usize);
            (i.to_string(), f.to_string())
        };
        let int = int.trim_start_matches('0').to_string();
        let frac = frac.trim_end_matches('0').to_string();
        let neg = neg && !(int.is_empty() && frac.is_empty());
        Some(Decimal::Finite { neg, int, frac })
    }

    /// The value as `numeric_in` reads it back exactly.
    pub(crate) fn to_sql_text(&self) -> String {
        match self {
            Decimal::NegInfinity => "-Infinity".into(),
            Decimal::Infinity => "Infinity".into(),
            Decimal::NaN => "NaN".into(),
            Decimal::Finite { neg, int, frac } => {
                let int = if int.is_empty() { "0" } else { int };
                let point = if frac.is_empty() { "" } else { "." };
                format!("{}{int}{point}{frac}", if *neg { "-" } else { "" })
            }
        }
    }

    /// An integer's value, if this is one that fits an `i64`.
    pub(crate) fn to_i64(&self) -> Option<i64> {
        match self {
            Decimal::Finite { neg, int, frac } if frac.is_empty() && int.len() <= 19 => {
                let magnitude: i128 = if int.is_empty() { 0 } else { int.parse().ok()? };
                i64::try_from(if *neg { -magnitude } else { magnitude }).ok()
            }
            _ => None,
        }
    }

    fn rank(&self) -> u8 {
        match self {
            Decimal::NegInfinity => 0,
            Decimal::Finite { .. } => 1,
            Decimal::Infinity => 2,
            Decimal::NaN => 3,
        }
    }
}

impl Ord for Decimal {
    fn cmp(&self, other: &Self) -> Ordering {
        match (self, other) {
            (Decimal::Finite { neg: a_neg, int: a_int, frac: a_frac }, Decimal::Finite { neg, int, frac }) => {
                if a_neg != neg {
                    return if *a_neg { Ordering::Less } else { Ordering::Greater };
                }
                // Fractions without trailing zeros order as their digit strings do.
                let magnitude = a_int.len().cmp(&int.len()).then_with(|| a_int.cmp(int)).then_with(|| a_frac.cmp(frac));
                if *neg {
                    magnitude.reverse()
                } else {
                    magnitude
                }
            }
            _ => self.rank().cmp(&other.rank()),
        }
    }
}

impl PartialOrd for Decimal {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Decimal {
        Decimal::parse(s).unwrap()
    }

    #[test]
    fn orders_as_numeric_does() {
        let sorted =
            ["-Infinity", "-1e3", "-10.5", "-10.05", "-0.001", "-0", "0.0001", "0.1", "0.51", "0.6", "1", "1.5e1"];
        for w in sorted.windows(2) {
            assert!(d(w[0]) < d(w[1]), "{w:?}");
        }
        for w in ["99999999999999999999.5", "100000000000000000000", "Infinity", "NaN"].windows(2) {
            assert!(d(w[0]) < d(w[1]), "{w:?}");
        }
        assert_eq!(d("1.50"), d("1.5"));
        assert_eq!(d("-0.00"), d("0"));
        assert_eq!(d("1e2"), d("100"));
        assert_eq!(d("nan"), d("NaN"));
        assert_eq!(d("123.4500e-2").to_sql_text(), "1.2345");
    }

    #[test]
    fn refuses_what_is_not_a_number() {
        for bad in ["", "-", ".", "1..2", "1e", "1e99999", "abc", "1 2", "--1", "-nan"] {
            assert_eq!(Decimal::parse(bad), None, "{bad:?}");
        }
        assert_eq!(d("9223372036854775807").to_i64(), Some(i64::MAX));
        assert_eq!(d("-9223372036854775808").to_i64(), Some(i64::MIN));
        assert_eq!(d("9223372036854775808").to_i64(), None);
        assert_eq!(d("2.0").to_i64(), Some(2));
        assert_eq!(d("2.5").to_i64(), None);
    }
}
