//! Amounts of money as clients write them: exact, to the micro-dollar.

use serde::{Deserialize, Deserializer, de::Error as _};

/// The largest budget a run may have, in dollars.
pub const MAX_BUDGET_USD: u64 = 1_000_000;

/// Micro-dollars in a dollar.
const MICROS: i64 = 1_000_000;

/// A budget in dollars: a JSON number from 0 to [`MAX_BUDGET_USD`] with at most six decimals,
/// read from the decimal it is written as (never rounded through a float on the way in).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dollars {
    micros: i64,
}

impl Dollars {
    /// Reads `text`, a JSON number, exactly.
    pub fn parse(text: &str) -> Result<Self, String> {
        let refused = || {
            format!(
                "must be a number of dollars from 0 to {MAX_BUDGET_USD} with at most six decimals"
            )
        };
        let text = text.trim();
        let (mantissa, exponent) = match text.find(['e', 'E']) {
            Some(at) => (
                &text[..at],
                text[at + 1..].parse::<i32>().map_err(|_| refused())?,
            ),
            None => (text, 0),
        };
        if mantissa.starts_with('-') {
            // `-0` is zero; anything else below zero is refused.
            let magnitude = mantissa.trim_start_matches('-');
            if magnitude.bytes().any(|b| b.is_ascii_digit() && b != b'0') {
                return Err(refused());
            }
            return Ok(Self { micros: 0 });
        }
        let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
        if whole.is_empty()
            || !whole
                .bytes()
                .chain(fraction.bytes())
                .all(|b| b.is_ascii_digit())
        {
            return Err(refused());
        }
        // All digits and the power of ten of the last one, without surplus zeros.
        let digits: String = format!("{whole}{fraction}")
            .trim_start_matches('0')
            .to_owned();
        let mut digits = digits.as_str();
        let mut power = i64::from(exponent) - fraction.len() as i64;
        while let Some(rest) = digits.strip_suffix('0') {
            digits = rest;
            power += 1;
        }
        if digits.is_empty() {
            return Ok(Self { micros: 0 });
        }
        // In micro-dollars: the power of ten moves up by six.
        let shift = power + 6;
        if shift < 0 || digits.len() as i64 + shift > 13 {
            return Err(refused());
        }
        let mut micros: i64 = digits.parse().map_err(|_| refused())?;
        for _ in 0..shift {
            micros = micros.checked_mul(10).ok_or_else(refused)?;
        }
        if micros > MAX_BUDGET_USD as i64 * MICROS {
            return Err(refused());
        }
        Ok(Self { micros })
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
    fn budgets_are_read_exactly() {
        for (text, micros) in [
            ("0", 0),
            ("-0", 0),
            ("0.000001", 1),
            ("1e-6", 1),
            ("150", 150_000_000),
            ("150.25", 150_250_000),
            ("1000000", 1_000_000_000_000),
            ("1000000.000000", 1_000_000_000_000),
            ("2.5e3", 2_500_000_000),
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
            "0.0000001",
            "1000000.0000000001",
            "1000000.000001",
            "1e7",
            "1e400",
            "abc",
        ] {
            assert!(Dollars::parse(text).is_err(), "{text}");
        }
    }

    #[test]
    fn a_json_budget_keeps_its_decimals() {
        let parsed: Dollars = serde_json::from_str("0.1").expect("parses");
        assert_eq!(parsed.micros(), 100_000);
        let value: serde_json::Value =
            serde_json::from_str(r#"{"b": 1000000.0000000001}"#).expect("json");
        assert!(serde_json::from_value::<Dollars>(value["b"].clone()).is_err());
    }
}
