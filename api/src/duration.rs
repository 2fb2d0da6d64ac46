//! Durations written as Go/Kubernetes-style duration strings: `500ms`, `30s`, `5m`, `1h30m`, `7d`. The
//! grammar (parser, formatter and schema pattern) is the one of `distcache-duration`, shared with the CLI and
//! the hook SDK.

use std::{fmt, str::FromStr, time::Duration};

use distcache_duration::{PATTERN, format_duration, parse_duration};

pub use distcache_duration::ParseDurationError;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A duration parsed from a string of `<number><unit>` parts, units `ms`, `s`, `m`, `h`, `d`
/// (`1h30m`, `2.5s`; see `distcache_duration`). Serialized back in the same notation, to the millisecond.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DurationString(pub Duration);

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
        parse_duration(input).map(Self)
    }
}

impl fmt::Display for DurationString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&format_duration(self.0), f)
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
            "pattern": PATTERN
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
    fn serde_and_schema_follow_the_shared_grammar() {
        let d: DurationString = serde_json::from_str("\"1h30m\"").expect("valid");
        assert_eq!(d.get(), Duration::from_mins(90));
        assert_eq!(serde_json::to_string(&d).ok().as_deref(), Some("\"1h30m\""));
        assert!(serde_json::from_str::<DurationString>("\"30000\"").is_err());
        let schema = schemars::schema_for!(DurationString);
        assert_eq!(schema.get("pattern").and_then(|p| p.as_str()), Some(PATTERN));
    }

    #[test]
    fn displays_compactly() {
        assert_eq!(DurationString(Duration::from_millis(5_400_500)).to_string(), "1h30m500ms");
    }
}
