//! Byte sizes written as Kubernetes quantities: `65536`, `64Ki`, `64Mi`, `1.5Gi`, `100M`.

use std::{fmt, str::FromStr};

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

/// A number of bytes, parsed from an integer or a Kubernetes quantity string (binary suffixes `Ki Mi Gi Ti`,
/// decimal suffixes `k K M G T`). Serialized back as a quantity string with the largest exact binary suffix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

/// Why a size string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid size {input:?}: {reason} (expected a byte count such as 1048576, 64Ki, 64Mi or 1Gi)")]
pub struct ParseSizeError {
    input: String,
    reason: &'static str,
}

impl ByteSize {
    /// Size in bytes.
    pub const fn bytes(self) -> u64 {
        self.0
    }
}

impl FromStr for ByteSize {
    type Err = ParseSizeError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = |reason| ParseSizeError { input: input.to_owned(), reason };
        let s = input.trim();
        let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
        let (number, suffix) = s.split_at(split);
        if number.is_empty() {
            return Err(err("missing number"));
        }
        let multiplier: u64 = match suffix {
            "" => 1,
            "k" | "K" => 1_000,
            "M" => 1_000_000,
            "G" => 1_000_000_000,
            "T" => 1_000_000_000_000,
            "Ki" => 1 << 10,
            "Mi" => 1 << 20,
            "Gi" => 1 << 30,
            "Ti" => 1 << 40,
            _ => return Err(err("unknown suffix")),
        };
        let value = if let Some((whole, frac)) = number.split_once('.') {
            if whole.is_empty() || frac.is_empty() || frac.contains('.') {
                return Err(err("malformed number"));
            }
            let whole: u64 = whole.parse().map_err(|_| err("number too large"))?;
            let frac_digits = u32::try_from(frac.len()).map_err(|_| err("too many decimals"))?;
            let frac_value: u64 = frac.parse().map_err(|_| err("too many decimals"))?;
            let scale = 10u64.checked_pow(frac_digits).ok_or_else(|| err("too many decimals"))?;
            let whole_bytes = whole.checked_mul(multiplier).ok_or_else(|| err("number too large"))?;
            let frac_bytes = u128::from(frac_value) * u128::from(multiplier) / u128::from(scale);
            whole_bytes
                .checked_add(u64::try_from(frac_bytes).map_err(|_| err("number too large"))?)
                .ok_or_else(|| err("number too large"))?
        } else {
            let n: u64 = number.parse().map_err(|_| err("number too large"))?;
            n.checked_mul(multiplier).ok_or_else(|| err("number too large"))?
        };
        Ok(Self(value))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u64); 4] = [("Ti", 1 << 40), ("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)];
        for (suffix, unit) in UNITS {
            if self.0 >= unit && self.0.is_multiple_of(unit) {
                return write!(f, "{}{suffix}", self.0 / unit);
            }
        }
        write!(f, "{}", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a byte size such as 1048576, 64Ki, 64Mi or 1Gi")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v).map(ByteSize).map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                v.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

impl JsonSchema for ByteSize {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "ByteSize".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A byte size: an integer or a Kubernetes quantity such as 64Ki, 64Mi, 1Gi.",
            "x-kubernetes-int-or-string": true,
            "anyOf": [
                { "type": "integer", "minimum": 0 },
                { "type": "string", "pattern": "^[0-9]+(\\.[0-9]+)?(k|K|M|G|T|Ki|Mi|Gi|Ti)?$" }
            ]
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kubernetes_quantities() {
        for (input, bytes) in [
            ("0", 0),
            ("65536", 65_536),
            ("64Ki", 65_536),
            ("64Mi", 64 << 20),
            ("1Gi", 1 << 30),
            ("1.5Gi", 3 << 29),
            ("100M", 100_000_000),
            ("2k", 2_000),
        ] {
            assert_eq!(input.parse::<ByteSize>(), Ok(ByteSize(bytes)), "{input}");
        }
    }

    #[test]
    fn rejects_garbage_with_the_input_in_the_message() {
        for input in ["", "Mi", "12Xi", "1..5Mi", "-3", "99999999999999999999"] {
            let err = input.parse::<ByteSize>().expect_err(input).to_string();
            assert!(err.contains(&format!("{input:?}")), "{err}");
        }
    }

    #[test]
    fn displays_with_the_largest_exact_suffix() {
        assert_eq!(ByteSize(64 << 20).to_string(), "64Mi");
        assert_eq!(ByteSize(1000).to_string(), "1000");
        assert_eq!(ByteSize(3 << 29).to_string(), "1536Mi");
    }
}
