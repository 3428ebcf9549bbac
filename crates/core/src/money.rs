//! Amounts of money as clients write them: exact, to the micro-dollar.

use serde::{Deserialize, Deserializer, de::Error as _};

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
        let (mantissa, exponent) = match text.find(['e', 'E']) {
            Some(at) => (&text[..at], text[at + 1..].parse::<i64>().ok()),
            None => (text, Some(0)),
        };
        // An exponent too large to read: the float above was 0 (or infinite, refused).
        let Some(exponent) = exponent else {
            return Ok(Self { micros: 0 });
        };
        let mantissa = mantissa.trim_start_matches('-');
        let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
        if !whole
            .bytes()
            .chain(fraction.bytes())
            .all(|b| b.is_ascii_digit())
        {
            return Err(refused());
        }
        if float == 0.0 && whole.bytes().chain(fraction.bytes()).all(|b| b == b'0') {
            return Ok(Self { micros: 0 });
        }
        // The digits as written, and the power of ten (in micro-dollars) of the last one.
        let digits = format!("{whole}{fraction}");
        let digits = digits.trim_start_matches('0').as_bytes();
        let shift = exponent
            .saturating_sub(fraction.len() as i64)
            .saturating_add(6);
        // The digits standing for whole micro-dollars; the one after them rounds.
        let kept = (digits.len() as i64).saturating_add(shift);
        if kept > 13 {
            return Err(refused());
        }
        let value = |i: i64| {
            usize::try_from(i)
                .ok()
                .and_then(|i| digits.get(i))
                .map_or(0, |b| i64::from(b - b'0'))
        };
        let mut micros: i64 = 0;
        for i in 0..kept.max(0) {
            micros = micros * 10 + value(i);
        }
        if kept >= 0 && value(kept) >= 5 {
            micros += 1;
        }
        Ok(Self {
            micros: micros.min(MAX_BUDGET_USD as i64 * MICROS),
        })
    }

    pub fn micros(self) -> i64 {
        self.micros
    }

    pub fn as_f64(self) -> f64 {
        self.micros as f64 / MICROS as f64
    }
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
    fn a_json_budget_is_read_from_its_decimal() {
        let parsed: Dollars = serde_json::from_str("0.1").expect("parses");
        assert_eq!(parsed.micros(), 100_000);
        let value: serde_json::Value =
            serde_json::from_str(r#"{"b": 1000000.000001}"#).expect("json");
        assert!(serde_json::from_value::<Dollars>(value["b"].clone()).is_err());
    }
}
