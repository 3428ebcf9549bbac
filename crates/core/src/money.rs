//! Money, exact to the micro-dollar: [`Usd`] for every cost and budget the system keeps and
//! sums, and [`Dollars`] for a budget as a client writes it (bounded).

use std::{
    fmt,
    iter::Sum,
    ops::{Add, AddAssign, Sub},
};

use serde::{Deserialize, Deserializer, Serialize, Serializer, de::Error as _};

/// The largest budget a run may have, in dollars.
pub const MAX_BUDGET_USD: u64 = 1_000_000;

/// Micro-dollars in a dollar.
const MICROS: i64 = 1_000_000;

/// A budget in dollars: a JSON number from 0 to [`MAX_BUDGET_USD`], kept in whole
/// micro-dollars (rounded to the nearest, halves up). Its bounds are checked as a JSON Schema
/// validator checks them, on the number read as a float, so the server and the published
/// schema agree on every value; the amount kept is taken from the decimal as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dollars {
    micros: i64,
}

impl Dollars {
    /// Reads `text`, a JSON number.
    pub fn parse(text: &str) -> Result<Self, String> {
        let refused = || format!("must be a number of dollars from 0 to {MAX_BUDGET_USD}");
        let text = text.trim();
        let float: f64 = text.parse().map_err(|_| refused())?;
        if !float.is_finite() || !(0.0..=MAX_BUDGET_USD as f64).contains(&float) {
            return Err(refused());
        }
        // `-0` and `-1e-10` pass the float check; the amount kept is their magnitude, rounded.
        let micros = decimal_micros(text.trim_start_matches('-')).ok_or_else(refused)?;
        Ok(Self {
            micros: micros.min(MAX_BUDGET_USD as i64 * MICROS),
        })
    }

    pub fn micros(self) -> i64 {
        self.micros
    }

    pub fn usd(self) -> Usd {
        Usd(self.micros)
    }
}

/// An amount of dollars held as whole micro-dollars, so sums are exact. In JSON it is a number
/// (the nearest double to the exact amount, which prints as the amount itself: `4.7933`, never
/// `4.793299999999999`). Arithmetic saturates rather than wraps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Usd(i64);

impl Usd {
    pub const ZERO: Usd = Usd(0);

    pub const fn from_micros(micros: i64) -> Self {
        Self(micros)
    }

    pub const fn micros(self) -> i64 {
        self.0
    }

    /// A price computed as a float (rates times quantities), rounded to the nearest
    /// micro-dollar; `None` for NaN or an amount beyond what an `i64` of micro-dollars holds.
    pub fn from_dollars(dollars: f64) -> Option<Self> {
        let micros = (dollars * MICROS as f64).round();
        (micros.is_finite() && micros.abs() < i64::MAX as f64).then_some(Self(micros as i64))
    }

    /// The amount as a float, for display and JSON only: never sum these.
    pub fn dollars(self) -> f64 {
        self.0 as f64 / MICROS as f64
    }

    pub fn is_negative(self) -> bool {
        self.0 < 0
    }

    /// Reads a decimal as written (`"0.1"`, `"2.5e-3"`), rounding to the nearest micro-dollar.
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim();
        let (negative, unsigned) = match text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let micros = decimal_micros(unsigned)?;
        Some(Self(if negative { -micros } else { micros }))
    }
}

impl Add for Usd {
    type Output = Usd;
    fn add(self, other: Usd) -> Usd {
        Usd(self.0.saturating_add(other.0))
    }
}

impl AddAssign for Usd {
    fn add_assign(&mut self, other: Usd) {
        *self = *self + other;
    }
}

impl Sub for Usd {
    type Output = Usd;
    fn sub(self, other: Usd) -> Usd {
        Usd(self.0.saturating_sub(other.0))
    }
}

impl Sum for Usd {
    fn sum<I: Iterator<Item = Usd>>(iter: I) -> Usd {
        iter.fold(Usd::ZERO, Add::add)
    }
}

/// Dollars with as many decimals as the amount needs, up to six: `4.7933`, `0`, `12.5`.
impl fmt::Display for Usd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        let (whole, fraction) = (abs / MICROS as u64, abs % MICROS as u64);
        if fraction == 0 {
            return write!(f, "{sign}{whole}");
        }
        let fraction = format!("{fraction:06}");
        write!(f, "{sign}{whole}.{}", fraction.trim_end_matches('0'))
    }
}

impl Serialize for Usd {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_f64(self.dollars())
    }
}

impl<'de> Deserialize<'de> for Usd {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let number = serde_json::Number::deserialize(deserializer)?;
        Self::parse(&number.to_string())
            .ok_or_else(|| D::Error::custom("must be a number of dollars"))
    }
}

/// The non-negative decimal `text` (digits, an optional fraction, an optional exponent) in
/// micro-dollars, rounded half up; `None` when it is not such a decimal or does not fit.
fn decimal_micros(text: &str) -> Option<i64> {
    let (mantissa, exponent) = match text.find(['e', 'E']) {
        Some(at) => (&text[..at], text[at + 1..].parse::<i64>().ok()),
        None => (text, Some(0)),
    };
    let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let all_digits = whole
        .bytes()
        .chain(fraction.bytes())
        .all(|b| b.is_ascii_digit());
    if !all_digits || whole.len() + fraction.len() == 0 {
        return None;
    }
    let digits = format!("{whole}{fraction}");
    let digits = digits.trim_start_matches('0').as_bytes();
    if digits.is_empty() {
        return Some(0);
    }
    // An exponent too large to read: zero for a negative one, too large otherwise.
    let exponent = match exponent {
        Some(exponent) => exponent,
        None if text.contains("e-") || text.contains("E-") => return Some(0),
        None => return None,
    };
    // The power of ten, in micro-dollars, of the last digit written.
    let shift = exponent
        .saturating_sub(fraction.len() as i64)
        .saturating_add(6);
    // The digits standing for whole micro-dollars; the one after them rounds.
    let kept = (digits.len() as i64).saturating_add(shift);
    if kept > 18 {
        return None;
    }
    let value = |i: i64| {
        usize::try_from(i)
            .ok()
            .and_then(|i| digits.get(i))
            .map_or(0, |b| i64::from(b - b'0'))
    };
    let mut micros: i64 = 0;
    for i in 0..kept.max(0) {
        micros = micros.checked_mul(10)?.checked_add(value(i))?;
    }
    if kept >= 0 && value(kept) >= 5 {
        micros = micros.checked_add(1)?;
    }
    Some(micros)
}

impl<'de> Deserialize<'de> for Dollars {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let number = serde_json::Number::deserialize(deserializer)?;
        Self::parse(&number.to_string()).map_err(D::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_are_read_to_the_micro_dollar() {
        for (text, micros) in [
            ("0", 0),
            ("-0", 0),
            ("0.0", 0),
            ("0e99999999999999999999", 0),
            ("0.000001", 1),
            ("1e-6", 1),
            ("9.999999999999999e-06", 10),
            ("2.9999999999999997e-05", 30),
            ("0.0000004", 0),
            ("0.0000005", 1),
            ("1e-99999999999999999999", 0),
            ("0.1", 100_000),
            ("150", 150_000_000),
            ("150.25", 150_250_000),
            ("0.0012345678", 1_235),
            ("1000000", 1_000_000_000_000),
            ("1000000.000000", 1_000_000_000_000),
            // A float reads this as 1000000.0, so a schema validator accepts it: so do we.
            ("1000000.00000000001", 1_000_000_000_000),
            ("2.5e3", 2_500_000_000),
            ("25e-1", 2_500_000),
        ] {
            assert_eq!(
                Dollars::parse(text).map(Dollars::micros),
                Ok(micros),
                "{text}"
            );
        }
        for text in [
            "-1",
            "-0.000001",
            "-1e-10",
            "1000000.000001",
            "1000000.0000000001",
            "1e7",
            "1e400",
            "1e99999999999999999999",
            "abc",
        ] {
            assert!(Dollars::parse(text).is_err(), "{text}");
        }
    }

    #[test]
    fn sums_are_exact_and_print_as_written() {
        let parts = [1.2, 0.0333, 3.56].map(|d| Usd::from_dollars(d).expect("finite"));
        let total: Usd = parts.into_iter().sum();
        assert_eq!(total.micros(), 4_793_300);
        assert_eq!(serde_json::to_string(&total).expect("json"), "4.7933");
        assert_eq!(total.to_string(), "4.7933");
        assert_eq!(Usd::from_micros(-1_500_000).to_string(), "-1.5");
        assert_eq!(Usd::ZERO.to_string(), "0");
        // Every micro-dollar amount survives a trip through its JSON number.
        for micros in [1, 7, 999_999, 4_793_300, 123_456_789_012, 9_007_199_254] {
            let usd = Usd::from_micros(micros);
            let back: Usd =
                serde_json::from_str(&serde_json::to_string(&usd).expect("json")).expect("parses");
            assert_eq!(back, usd);
        }
        assert_eq!(Usd::parse("-0.25"), Some(Usd::from_micros(-250_000)));
        assert_eq!(Usd::parse("1e30"), None);
        assert_eq!(Usd::from_dollars(f64::NAN), None);
    }

    #[test]
    fn a_json_budget_is_read_from_its_decimal() {
        let parsed: Dollars = serde_json::from_str("0.1").expect("parses");
        assert_eq!(parsed.micros(), 100_000);
        let value: serde_json::Value =
            serde_json::from_str(r#"{"b": 1000000.000001}"#).expect("json");
        assert!(serde_json::from_value::<Dollars>(value["b"].clone()).is_err());
    }
}
