//! The one duration grammar of DistCache, shared by the API types (the DistCache CRD and the keyspaces file),
//! the `distcache` CLI and the hook SDK (which builds for wasm32-wasip2, hence this tiny crate of its own).
//!
//! A duration is one or more `<number><unit>` parts, summed: `500ms`, `30s`, `5m`, `1h30m`, `2.5s`, `7d`.
//!
//! * number: decimal digits, optionally followed by `.` and more digits (`2.5`; not `.5`, `5.` or `-5`);
//! * unit: `ms`, `s`, `m`, `h` or `d` (24 h), required after every number (a bare `30` is refused);
//! * whitespace around the whole string is ignored, none is allowed inside it;
//! * at most [`MAX`] (10^15 ms, about 31 700 years); digits finer than a nanosecond are dropped.
//!
//! [`PATTERN`] is the same grammar as a regular expression (the CRD's OpenAPI schema publishes it), and
//! [`format_duration`] writes a duration back in it, to the millisecond (`1h30m500ms`, `0s`).
//!
//! ```
//! use std::time::Duration;
//! use distcache_duration::{format_duration, parse_duration};
//!
//! assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5_400)));
//! assert_eq!(parse_duration("2.5s"), Ok(Duration::from_millis(2_500)));
//! assert!(parse_duration("30").is_err());
//! assert_eq!(format_duration(Duration::from_millis(5_400_500)).to_string(), "1h30m500ms");
//! ```

use std::{fmt, time::Duration};

/// The grammar as a regular expression, for schemas (surrounding whitespace, which the parser ignores, is
/// not part of it).
pub const PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h|d))+$";

/// The longest duration accepted: 10^15 ms (about 31 700 years), far below what would overflow an `Instant`.
pub const MAX: Duration = Duration::from_secs(1_000_000_000_000);

const NANOS_PER_MILLI: u128 = 1_000_000;
const NANOS_PER_SEC: u128 = 1_000_000_000;

/// The units, largest first, with their length in nanoseconds.
const UNITS: [(&str, u128); 5] = [
    ("d", 86_400 * NANOS_PER_SEC),
    ("h", 3_600 * NANOS_PER_SEC),
    ("m", 60 * NANOS_PER_SEC),
    ("s", NANOS_PER_SEC),
    ("ms", NANOS_PER_MILLI),
];

/// Why a string is not a duration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {input:?}: {kind} (expected e.g. 500ms, 30s, 5m, 1h30m)")]
pub struct ParseDurationError {
    input: String,
    kind: ErrorKind,
}

impl ParseDurationError {
    /// The rejected input, as given.
    pub fn input(&self) -> &str {
        &self.input
    }

    /// What is wrong with it.
    pub fn kind(&self) -> &ErrorKind {
        &self.kind
    }
}

/// What is wrong with a rejected duration string.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Nothing but whitespace.
    #[error("empty")]
    Empty,
    /// A part does not start with a digit (`s`, `-5s`, `.5s`).
    #[error("expected a number")]
    ExpectedNumber,
    /// Digits and dots that are not a decimal number (`1..2s`, `5.s`).
    #[error("malformed number {0:?}")]
    MalformedNumber(String),
    /// A number without a unit (`30`, `1m30`).
    #[error("missing unit")]
    MissingUnit,
    /// A unit other than `ms`, `s`, `m`, `h` and `d`.
    #[error("unknown unit {0:?} (units: ms, s, m, h, d)")]
    UnknownUnit(String),
    /// Longer than [`MAX`].
    #[error("too large (at most 10^15 ms)")]
    TooLarge,
}

/// Parses a duration written in the grammar of this crate (see the crate documentation).
pub fn parse_duration(input: &str) -> Result<Duration, ParseDurationError> {
    let error = |kind| ParseDurationError { input: input.to_owned(), kind };
    let max_nanos = MAX.as_nanos();
    let mut rest = input.trim();
    if rest.is_empty() {
        return Err(error(ErrorKind::Empty));
    }
    let mut nanos: u128 = 0;
    while !rest.is_empty() {
        if !rest.starts_with(|c: char| c.is_ascii_digit()) {
            return Err(error(ErrorKind::ExpectedNumber));
        }
        let number_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        let (number, after) = rest.split_at(number_len);
        let unit_len = after.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let unit_nanos = match UNITS.iter().find(|(name, _)| *name == unit) {
            Some(&(_, unit_nanos)) => unit_nanos,
            None if unit.is_empty() => return Err(error(ErrorKind::MissingUnit)),
            None => return Err(error(ErrorKind::UnknownUnit(unit.to_owned()))),
        };
        let part = number_nanos(number, unit_nanos).map_err(error)?;
        nanos =
            nanos.checked_add(part).filter(|&n| n <= max_nanos).ok_or_else(|| error(ErrorKind::TooLarge))?;
        rest = after;
    }
    // Both fit: nanos ≤ MAX, whose seconds fit in a u64.
    let secs = u64::try_from(nanos / NANOS_PER_SEC).map_err(|_| error(ErrorKind::TooLarge))?;
    let subsec = u32::try_from(nanos % NANOS_PER_SEC).map_err(|_| error(ErrorKind::TooLarge))?;
    Ok(Duration::new(secs, subsec))
}

/// `number` (digits, optionally `.` and more digits) times `unit_nanos`, exactly, to the nanosecond.
fn number_nanos(number: &str, unit_nanos: u128) -> Result<u128, ErrorKind> {
    let malformed = || ErrorKind::MalformedNumber(number.to_owned());
    let (whole, fraction) = match number.split_once('.') {
        Some((whole, fraction)) => (whole, Some(fraction)),
        None => (number, None),
    };
    if whole.is_empty() || fraction.is_some_and(|f| f.is_empty() || f.contains('.')) {
        return Err(malformed());
    }
    // Only digits are left; a number too long for a u128 is certainly too large.
    let whole: u128 = whole.parse().map_err(|_| ErrorKind::TooLarge)?;
    let mut nanos = whole.checked_mul(unit_nanos).ok_or(ErrorKind::TooLarge)?;
    let mut scale = unit_nanos;
    for digit in fraction.unwrap_or_default().bytes().map(|b| u128::from(b - b'0')) {
        scale /= 10;
        if scale == 0 {
            break; // finer than a nanosecond
        }
        nanos = nanos.checked_add(digit * scale).ok_or(ErrorKind::TooLarge)?;
    }
    Ok(nanos)
}

/// `duration` written in the grammar of this crate, to the millisecond: `1h30m500ms`, `7d`; `0s` below 1 ms.
/// What it writes parses back to `duration` truncated to whole milliseconds.
pub fn format_duration(duration: Duration) -> FormattedDuration {
    FormattedDuration(duration)
}

/// A duration displayed in the grammar of this crate (see [`format_duration`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FormattedDuration(Duration);

impl fmt::Display for FormattedDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut millis = self.0.as_millis();
        if millis == 0 {
            return f.write_str("0s");
        }
        for (unit, unit_nanos) in UNITS {
            let size = unit_nanos / NANOS_PER_MILLI;
            if millis >= size {
                write!(f, "{}{unit}", millis / size)?;
                millis %= size;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(input: &str) -> Option<ErrorKind> {
        parse_duration(input).err().map(|e| e.kind().clone())
    }

    #[test]
    fn parses_every_unit_and_sums_parts() {
        for (input, millis) in [
            ("500ms", 500),
            ("30s", 30_000),
            ("5m", 300_000),
            ("2h", 7_200_000),
            ("7d", 604_800_000),
            ("1h30m", 5_400_000),
            ("1d2h3m4s5ms", 93_784_005),
            ("1s1s", 2_000),
            ("30s1m", 90_000),
            ("0s", 0),
            ("0ms", 0),
            ("007s", 7_000),
        ] {
            assert_eq!(parse_duration(input), Ok(Duration::from_millis(millis)), "{input}");
        }
    }

    #[test]
    fn fractions_are_exact_to_the_nanosecond() {
        assert_eq!(parse_duration("2.5s"), Ok(Duration::from_millis(2_500)));
        assert_eq!(parse_duration("0.1s"), Ok(Duration::from_millis(100)));
        assert_eq!(parse_duration("1.5h"), Ok(Duration::from_mins(90)));
        assert_eq!(parse_duration("0.5d"), Ok(Duration::from_hours(12)));
        assert_eq!(parse_duration("1.000000001s"), Ok(Duration::new(1, 1)));
        assert_eq!(parse_duration("0.0015ms"), Ok(Duration::from_nanos(1_500)));
        // Digits finer than a nanosecond are dropped.
        assert_eq!(parse_duration("1.0000000019s"), Ok(Duration::new(1, 1)));
        assert_eq!(parse_duration("0.0000001ms"), Ok(Duration::ZERO));
    }

    #[test]
    fn surrounding_whitespace_is_ignored() {
        assert_eq!(parse_duration(" 5m\n"), Ok(Duration::from_mins(5)));
        assert_eq!(parse_duration("\t1h30m "), Ok(Duration::from_mins(90)));
    }

    #[test]
    fn rejects_what_is_not_in_the_grammar() {
        for (input, expected) in [
            ("", ErrorKind::Empty),
            ("  ", ErrorKind::Empty),
            ("s", ErrorKind::ExpectedNumber),
            ("-3s", ErrorKind::ExpectedNumber),
            ("+3s", ErrorKind::ExpectedNumber),
            (".5s", ErrorKind::ExpectedNumber),
            ("1m.5s", ErrorKind::ExpectedNumber),
            ("5.s", ErrorKind::MalformedNumber("5.".into())),
            ("1..2s", ErrorKind::MalformedNumber("1..2".into())),
            ("1.2.3s", ErrorKind::MalformedNumber("1.2.3".into())),
            ("5", ErrorKind::MissingUnit),
            ("30000", ErrorKind::MissingUnit),
            ("1m30", ErrorKind::MissingUnit),
            ("5x", ErrorKind::UnknownUnit("x".into())),
            ("5S", ErrorKind::UnknownUnit("S".into())),
            ("10us", ErrorKind::UnknownUnit("us".into())),
            ("10µs", ErrorKind::UnknownUnit("µs".into())),
            ("10ns", ErrorKind::UnknownUnit("ns".into())),
            ("5 s", ErrorKind::UnknownUnit(" s".into())),
            ("1h 30m", ErrorKind::UnknownUnit("h ".into())),
            ("5sec", ErrorKind::UnknownUnit("sec".into())),
        ] {
            assert_eq!(kind(input), Some(expected), "{input:?}");
        }
    }

    #[test]
    fn bounded_by_max() {
        assert_eq!(parse_duration("1000000000000000ms"), Ok(MAX));
        assert_eq!(parse_duration("999999999999999ms1ms"), Ok(MAX));
        for input in [
            "1000000000000001ms",
            "999999999999999ms2ms",
            "20000000000d",
            "1000000000000000000000000000000000000000000000000000s",
            "340282366920938463463374607431768211456ms",
        ] {
            assert_eq!(kind(input), Some(ErrorKind::TooLarge), "{input}");
        }
    }

    #[test]
    fn error_names_the_input_and_the_problem() {
        let error = parse_duration("5x").err();
        assert_eq!(
            error.as_ref().map(ToString::to_string).as_deref(),
            Some(
                "invalid duration \"5x\": unknown unit \"x\" (units: ms, s, m, h, d) \
                 (expected e.g. 500ms, 30s, 5m, 1h30m)"
            )
        );
        assert_eq!(error.as_ref().map(ParseDurationError::input), Some("5x"));
    }

    #[test]
    fn formats_compactly_to_the_millisecond() {
        for (duration, text) in [
            (Duration::ZERO, "0s"),
            (Duration::from_micros(999), "0s"),
            (Duration::from_micros(1_999), "1ms"),
            (Duration::from_millis(500), "500ms"),
            (Duration::from_secs(90), "1m30s"),
            (Duration::from_millis(5_400_500), "1h30m500ms"),
            (Duration::from_hours(24 * 7), "7d"),
            (Duration::from_millis(86_400_001), "1d1ms"),
            (MAX, "11574074d1h46m40s"),
        ] {
            assert_eq!(format_duration(duration).to_string(), text, "{duration:?}");
        }
    }

    #[test]
    fn formatted_durations_parse_back() {
        for millis in [0, 1, 999, 1_000, 59_999, 60_000, 3_599_999, 86_400_000, 93_784_005, 1 << 40] {
            let duration = Duration::from_millis(millis);
            assert_eq!(parse_duration(&format_duration(duration).to_string()), Ok(duration), "{millis}");
        }
        let duration = Duration::new(3, 999_999);
        assert_eq!(parse_duration(&format_duration(duration).to_string()), Ok(Duration::from_secs(3)));
    }
}
