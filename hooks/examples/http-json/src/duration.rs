//! Duration config values: Go-style (`30s`, `5m`, `1h30m`, `1.5s`, `250ms`; units `ns`, `us`/`µs`, `ms`,
//! `s`, `m`, `h`) or a bare integer of milliseconds.

use std::time::Duration;

/// Parses a Go-style duration or a bare integer of milliseconds.
pub fn parse(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty duration".to_owned());
    }
    if text.bytes().all(|b| b.is_ascii_digit()) {
        return text.parse::<u64>().map(Duration::from_millis).map_err(|_| "too large".to_owned());
    }
    let mut nanos: u128 = 0;
    let mut rest = text;
    while !rest.is_empty() {
        let number_len = rest.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(rest.len());
        let (number, after) = rest.split_at(number_len);
        let unit_len = after.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let unit_nanos: u128 = match unit {
            "ns" => 1,
            "us" | "µs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "" => return Err(format!("\"{number}\" has no unit (ns, us, ms, s, m, h)")),
            other => return Err(format!("unknown unit \"{other}\" (ns, us, ms, s, m, h)")),
        };
        nanos = nanos.checked_add(number_nanos(number, unit_nanos)?).ok_or("too large")?;
        rest = after;
    }
    let secs = u64::try_from(nanos / 1_000_000_000).map_err(|_| "too large".to_owned())?;
    let subsec = u32::try_from(nanos % 1_000_000_000).map_err(|_| "too large".to_owned())?;
    Ok(Duration::new(secs, subsec))
}

/// `number` (digits, optionally with a fraction) times `unit_nanos`.
fn number_nanos(number: &str, unit_nanos: u128) -> Result<u128, String> {
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if (whole.is_empty() && fraction.is_empty()) || fraction.contains('.') {
        return Err(format!("\"{number}\" is not a number"));
    }
    let whole: u128 = if whole.is_empty() { 0 } else { whole.parse().map_err(|_| "too large".to_owned())? };
    let mut nanos = whole.checked_mul(unit_nanos).ok_or("too large")?;
    // Fraction digits beyond what a nanosecond can resolve are ignored.
    let mut scale = unit_nanos;
    for digit in fraction.bytes().map(|b| u128::from(b - b'0')) {
        scale /= 10;
        if scale == 0 {
            break;
        }
        nanos = nanos.checked_add(digit * scale).ok_or("too large")?;
    }
    Ok(nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_style_and_millis() {
        assert_eq!(parse("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse("5m"), Ok(Duration::from_mins(5)));
        assert_eq!(parse("1h30m"), Ok(Duration::from_mins(90)));
        assert_eq!(parse("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse(".5s"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("10us"), Ok(Duration::from_micros(10)));
        assert_eq!(parse(" 1500 "), Ok(Duration::from_millis(1500)));
        assert_eq!(parse("0"), Ok(Duration::ZERO));
    }

    #[test]
    fn rejects_garbage() {
        for bad in ["", "s", "5x", "-5s", "1..5s", ".s", "5 s", "1s5", "99999999999999999999999h"] {
            assert!(parse(bad).is_err(), "{bad:?} should not parse");
        }
    }
}
