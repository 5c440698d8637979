//! Durations, sizes and the ranges that bound them, as the configuration file and the routes file write
//! them. A leaf: both `config` and `routes` use it, and it uses neither.

use std::fmt;
use std::time::Duration;

/// Parses `500ms`, `30s`, `5m`, `1h`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let bad = || {
        format!(
            "invalid duration {text:?}: write a whole number and a unit, e.g. 500ms, 30s, 5m, 1h"
        )
    };
    let n: u64 = number.parse().map_err(|_| bad())?;
    let ms = match unit {
        "ms" => Some(n),
        "s" => n.checked_mul(1_000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        _ => return Err(bad()),
    }
    .ok_or_else(bad)?;
    Ok(Duration::from_millis(ms))
}

/// Parses a byte size: `1048576`, `512B`, `16KiB`, `10MiB`, `1GiB`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let bad = || {
        format!("invalid size {text:?}: write a whole number and B, KiB, MiB or GiB, e.g. 10MiB")
    };
    let n: u64 = number.parse().map_err(|_| bad())?;
    let shift = match unit.trim() {
        "" | "B" => 0,
        "KiB" => 10,
        "MiB" => 20,
        "GiB" => 30,
        _ => return Err(bad()),
    };
    n.checked_mul(1 << shift).ok_or_else(bad)
}

/// A size in bytes, shown in the largest unit that writes it exactly (`16KiB`, `1000`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Bytes(pub u64);

/// A value a [`Range`] can bound: ordered, and written back the way the files write it, so an error shows
/// the operator a value they could have typed.
pub trait Quantity: Copy + PartialOrd {
    fn show(self) -> String;
}

impl Quantity for Duration {
    fn show(self) -> String {
        let ms = self.as_millis();
        match ms {
            0 => "0s".to_string(),
            _ if ms % 3_600_000 == 0 => format!("{}h", ms / 3_600_000),
            _ if ms % 60_000 == 0 => format!("{}m", ms / 60_000),
            _ if ms % 1_000 == 0 => format!("{}s", ms / 1_000),
            _ => format!("{ms}ms"),
        }
    }
}

impl Quantity for Bytes {
    fn show(self) -> String {
        let n = self.0;
        let units = [(30, "GiB"), (20, "MiB"), (10, "KiB")];
        match units
            .iter()
            .find(|(shift, _)| n != 0 && n % (1 << shift) == 0)
        {
            Some((shift, unit)) => format!("{}{unit}", n >> shift),
            None => n.to_string(),
        }
    }
}

/// A count: connections, scripts, list entries.
impl Quantity for usize {
    fn show(self) -> String {
        self.to_string()
    }
}

/// The values a setting may take, both ends included. Each setting's range is a constant beside the
/// setting it bounds, so the check and its documentation sit together.
#[derive(Debug, Clone, Copy)]
pub struct Range<T> {
    pub min: T,
    pub max: T,
}

impl<T: Quantity> Range<T> {
    pub const fn new(min: T, max: T) -> Range<T> {
        Range { min, max }
    }

    pub fn contains(&self, value: T) -> bool {
        self.min <= value && value <= self.max
    }

    /// `value`, or an error that shows it and the range, for the caller to prefix with the setting's name.
    pub fn check(&self, value: T) -> Result<T, String> {
        if self.contains(value) {
            Ok(value)
        } else {
            Err(format!("{} is out of range: use {self}", value.show()))
        }
    }
}

impl<T: Quantity> fmt::Display for Range<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} to {}", self.min.show(), self.max.show())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        for bad in [
            "",
            "30",
            "s",
            "1.5s",
            "-1s",
            "30 sec",
            "99999999999999999999h",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("10MiB"), Ok(10 << 20));
        assert_eq!(parse_size("16KiB"), Ok(16 << 10));
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("512B"), Ok(512));
        for bad in ["", "10MB", "ten", "1.5MiB", "18446744073709551615GiB"] {
            assert!(parse_size(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn values_are_shown_as_they_would_be_written() {
        let d = |ms| Duration::from_millis(ms).show();
        assert_eq!(
            [d(0), d(250), d(1_500), d(30_000), d(90_000), d(300_000)],
            ["0s", "250ms", "1500ms", "30s", "90s", "5m"]
        );
        assert_eq!([d(3_600_000), d(86_400_000)], ["1h", "24h"]);
        let b = |n| Bytes(n).show();
        assert_eq!(
            [b(0), b(1000), b(1024), b(16 << 10), b(10 << 20), b(1 << 40)],
            ["0", "1000", "1KiB", "16KiB", "10MiB", "1024GiB"]
        );
        // What is shown parses back to the same value.
        for ms in [250, 30_000, 300_000, 3_600_000] {
            assert_eq!(parse_duration(&d(ms)), Ok(Duration::from_millis(ms)));
        }
        for n in [1000, 1024, 10 << 20, 64 << 30] {
            assert_eq!(parse_size(&b(n)), Ok(n));
        }
    }

    #[test]
    fn ranges_include_both_ends_and_say_what_they_are() {
        let range = Range::new(Duration::from_millis(100), Duration::from_secs(3600));
        assert_eq!(range.to_string(), "100ms to 1h");
        assert!(range.check(Duration::from_millis(100)).is_ok());
        assert!(range.check(Duration::from_secs(3600)).is_ok());
        assert_eq!(
            range.check(Duration::from_millis(99)),
            Err("99ms is out of range: use 100ms to 1h".to_string())
        );
        assert_eq!(
            range.check(Duration::from_millis(3_600_001)),
            Err("3600001ms is out of range: use 100ms to 1h".to_string())
        );
        let sizes = Range::new(Bytes(1 << 10), Bytes(1 << 20));
        assert_eq!(
            sizes.check(Bytes(1 << 40)),
            Err("1024GiB is out of range: use 1KiB to 1MiB".to_string())
        );
        let counts = Range::new(1usize, 64);
        assert!(counts.contains(1) && counts.contains(64));
        assert!(!counts.contains(0) && !counts.contains(65));
    }
}
