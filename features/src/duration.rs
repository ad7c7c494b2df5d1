//! Durations as written in a definitions file: `250ms`, `30s`, `5m`, `1h`, `1d`, and sums such as
//! `1h30m`. Internally every duration is a whole number of milliseconds.

use std::fmt;

/// A non-negative span of time with millisecond precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, serde::Serialize, serde::Deserialize)]
pub struct Duration {
    millis: i64,
}

impl Duration {
    /// The zero duration.
    pub const ZERO: Duration = Duration { millis: 0 };

    /// A duration of `millis` milliseconds.
    pub const fn from_millis(millis: i64) -> Self {
        Duration { millis }
    }

    /// The duration in milliseconds.
    pub const fn millis(self) -> i64 {
        self.millis
    }

    /// Parses `250ms`, `30s`, `5m`, `1h`, `1d` or a sum of them such as `1h30m`.
    ///
    /// Units must appear at most once each, largest first, so `30m1h` and `1h1h` are refused:
    /// a definitions file should read the way a person would write the duration.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.is_empty() {
            return Err("a duration is empty; write one such as `30s`, `5m` or `1h30m`".into());
        }
        const UNITS: [(&str, i64); 5] = [("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1_000), ("ms", 1)];
        let bytes = text.as_bytes();
        let mut pos = 0;
        let mut total: i64 = 0;
        let mut last_rank: Option<usize> = None;
        while pos < bytes.len() {
            let digits_start = pos;
            while pos < bytes.len() && bytes[pos].is_ascii_digit() {
                pos += 1;
            }
            if digits_start == pos {
                return Err(format!(
                    "`{text}` is not a duration: expected a number at `{}`; write one such as `30s`, `5m` or `1h30m`",
                    &text[digits_start..]
                ));
            }
            let number: i64 = text[digits_start..pos]
                .parse()
                .map_err(|_| format!("`{text}` is not a duration: the number is too large"))?;
            let unit_start = pos;
            while pos < bytes.len() && bytes[pos].is_ascii_alphabetic() {
                pos += 1;
            }
            let unit = &text[unit_start..pos];
            let Some(rank) = UNITS.iter().position(|(name, _)| *name == unit) else {
                return Err(if unit.is_empty() {
                    format!("`{text}` is not a duration: `{number}` has no unit; use ms, s, m, h or d")
                } else {
                    format!("`{text}` is not a duration: unknown unit `{unit}`; use ms, s, m, h or d")
                });
            };
            if last_rank.is_some_and(|last| rank <= last) {
                return Err(format!(
                    "`{text}` is not a duration: units must be given largest first, each once (e.g. `1h30m`)"
                ));
            }
            last_rank = Some(rank);
            total = number
                .checked_mul(UNITS[rank].1)
                .and_then(|ms| total.checked_add(ms))
                .ok_or_else(|| format!("`{text}` is too long a duration"))?;
        }
        Ok(Duration { millis: total })
    }
}

impl fmt::Display for Duration {
    /// Writes the duration the way `parse` reads it, e.g. `1h30m`; zero is `0s`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.millis == 0 {
            return f.write_str("0s");
        }
        let mut rest = self.millis;
        for (name, size) in [("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1_000), ("ms", 1)] {
            if rest >= size {
                write!(f, "{}{name}", rest / size)?;
                rest %= size;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit_and_sums() {
        assert_eq!(Duration::parse("250ms").unwrap().millis(), 250);
        assert_eq!(Duration::parse("30s").unwrap().millis(), 30_000);
        assert_eq!(Duration::parse("5m").unwrap().millis(), 300_000);
        assert_eq!(Duration::parse("1h").unwrap().millis(), 3_600_000);
        assert_eq!(Duration::parse("1d").unwrap().millis(), 86_400_000);
        assert_eq!(Duration::parse("1h30m").unwrap().millis(), 5_400_000);
        assert_eq!(Duration::parse("1d2h3m4s5ms").unwrap().millis(), 93_784_005);
        assert_eq!(Duration::parse("0s").unwrap(), Duration::ZERO);
    }

    #[test]
    fn refuses_bad_text_with_a_reason() {
        assert!(Duration::parse("").unwrap_err().contains("empty"));
        assert!(Duration::parse("10").unwrap_err().contains("no unit"));
        assert!(Duration::parse("10w").unwrap_err().contains("unknown unit `w`"));
        assert!(Duration::parse("30m1h").unwrap_err().contains("largest first"));
        assert!(Duration::parse("1h1h").unwrap_err().contains("largest first"));
        assert!(Duration::parse("-1s").unwrap_err().contains("expected a number"));
        assert!(Duration::parse("99999999999999999999d").is_err());
    }

    #[test]
    fn display_round_trips() {
        for text in ["250ms", "30s", "1h30m", "1d", "1d2h3m4s5ms", "0s"] {
            assert_eq!(Duration::parse(text).unwrap().to_string(), text);
        }
    }
}
