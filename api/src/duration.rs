//! Durations written as Go/Kubernetes duration strings: `500ms`, `30s`, `5m`, `1h30m`, `7d`.

use std::{fmt, str::FromStr, time::Duration};

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A duration parsed from a string of `<number><unit>` parts, units `ms`, `s`, `m`, `h`, `d`
/// (`1h30m`, `2.5s`). Serialized back in the same notation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DurationString(pub Duration);

/// Why a duration string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {input:?}: {reason} (expected e.g. 500ms, 30s, 5m, 1h30m)")]
pub struct ParseDurationError {
    input: String,
    reason: &'static str,
}

impl DurationString {
    /// The parsed duration.
    pub const fn get(self) -> Duration {
        self.0
    }
}

impl From<Duration> for DurationString {
    fn from(d: Duration) -> Self {
        Self(d)
    }
}

impl FromStr for DurationString {
    type Err = ParseDurationError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = |reason| ParseDurationError { input: input.to_owned(), reason };
        let mut rest = input.trim();
        if rest.is_empty() {
            return Err(err("empty"));
        }
        let mut total_ms: f64 = 0.0;
        while !rest.is_empty() {
            let num_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
            if num_end == 0 {
                return Err(err("expected a number"));
            }
            let number: f64 = rest[..num_end].parse().map_err(|_| err("malformed number"))?;
            rest = &rest[num_end..];
            let unit_end = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
            let unit_ms = match &rest[..unit_end] {
                "ms" => 1.0,
                "s" => 1_000.0,
                "m" => 60_000.0,
                "h" => 3_600_000.0,
                "d" => 86_400_000.0,
                "" => return Err(err("missing unit")),
                _ => return Err(err("unknown unit")),
            };
            rest = &rest[unit_end..];
            total_ms += number * unit_ms;
        }
        if !total_ms.is_finite() || total_ms > 1e15 {
            return Err(err("too large"));
        }
        Ok(Self(Duration::from_secs_f64(total_ms / 1000.0)))
    }
}

impl fmt::Display for DurationString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let total_ms = self.0.as_millis();
        if total_ms == 0 {
            return f.write_str("0s");
        }
        let mut ms = total_ms;
        for (unit, size) in [("d", 86_400_000u128), ("h", 3_600_000), ("m", 60_000), ("s", 1_000), ("ms", 1)]
        {
            if ms >= size {
                write!(f, "{}{unit}", ms / size)?;
                ms %= size;
            }
        }
        Ok(())
    }
}

impl Serialize for DurationString {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DurationString {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for DurationString {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A duration such as 500ms, 30s, 5m, 1h30m or 7d.",
            "type": "string",
            "pattern": "^([0-9]+(\\.[0-9]+)?(ms|s|m|h|d))+$"
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_style_durations() {
        for (input, ms) in [
            ("500ms", 500),
            ("30s", 30_000),
            ("5m", 300_000),
            ("1h30m", 5_400_000),
            ("2.5s", 2_500),
            ("1d", 86_400_000),
        ] {
            assert_eq!(input.parse::<DurationString>().map(|d| d.0.as_millis()), Ok(ms), "{input}");
        }
    }

    #[test]
    fn rejects_garbage() {
        for input in ["", "5", "s", "5x", "1..2s", "-3s"] {
            assert!(input.parse::<DurationString>().is_err(), "{input}");
        }
    }

    #[test]
    fn displays_compactly() {
        assert_eq!(DurationString(Duration::from_millis(5_400_500)).to_string(), "1h30m500ms");
    }
}
