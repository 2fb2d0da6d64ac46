//! Request parsing: a command is an array of bulk strings (`*2\r\n$3\r\nGET\r\n$1\r\nk\r\n`), or an inline
//! line (`PING\r\n`, as typed into telnet). The parser never copies: it records where each argument lies in the
//! read buffer, in a vector the connection reuses, so a request costs no allocation.

use std::ops::Range;

/// Most arguments in one command (Redis allows more; no command here needs a million keys).
pub const MAX_ARGS: usize = 1 << 20;
/// Longest inline command line.
pub const MAX_INLINE: usize = 64 << 10;

/// A malformed request. The connection answers `-ERR Protocol error: …` and closes, as Redis does: after a framing
/// error the rest of the stream cannot be trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError(pub String);

/// Parses the request at the start of `buf`. `Ok(Some(len))`: a complete command of `len` bytes, its arguments'
/// ranges in `args` (which may be empty: an empty inline line, to be skipped); `Ok(None)`: more bytes are needed.
/// `max_request` bounds one command.
pub fn parse(
    buf: &[u8],
    args: &mut Vec<Range<usize>>,
    max_request: usize,
) -> Result<Option<usize>, ProtocolError> {
    args.clear();
    match buf.first() {
        None => Ok(None),
        Some(b'*') => parse_multibulk(buf, args, max_request),
        Some(_) => parse_inline(buf, args),
    }
}

/// The position of the `\r\n` ending the line that starts at `from`, if the buffer holds it.
fn line_end(buf: &[u8], from: usize) -> Option<usize> {
    let rest = buf.get(from..)?;
    let at = memchr::memchr(b'\r', rest)?;
    // A lone '\r' inside a header is malformed; the caller's number parsing reports it.
    (rest.get(at + 1).is_some()).then_some(from + at)
}

/// A decimal in `digits` (Redis accepts a leading '-' for -1 only, which means "null" in requests too).
fn number(digits: &[u8]) -> Option<i64> {
    let (negative, digits) = match digits.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, digits),
    };
    if digits.is_empty() || digits.len() > 18 {
        return None;
    }
    let mut n: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        n = n * 10 + i64::from(d - b'0');
    }
    Some(if negative { -n } else { n })
}

fn parse_multibulk(
    buf: &[u8],
    args: &mut Vec<Range<usize>>,
    max_request: usize,
) -> Result<Option<usize>, ProtocolError> {
    let Some(end) = line_end(buf, 1) else {
        return too_long_header(buf);
    };
    if buf[end + 1] != b'\n' {
        return Err(ProtocolError("invalid multibulk length".into()));
    }
    let count = number(&buf[1..end]).ok_or_else(|| ProtocolError("invalid multibulk length".into()))?;
    let count = match usize::try_from(count) {
        // `*0` and `*-1` are empty commands: skipped.
        Err(_) | Ok(0) => return Ok(Some(end + 2)),
        Ok(n) if n > MAX_ARGS => return Err(ProtocolError("invalid multibulk length".into())),
        Ok(n) => n,
    };
    let mut at = end + 2;
    for _ in 0..count {
        match buf.get(at) {
            None => return Ok(None),
            Some(b'$') => {}
            Some(&other) => {
                return Err(ProtocolError(format!("expected '$', got '{}'", char::from(other))));
            }
        }
        let Some(end) = line_end(buf, at + 1) else {
            return too_long_header(&buf[at..]);
        };
        if buf[end + 1] != b'\n' {
            return Err(ProtocolError("invalid bulk length".into()));
        }
        let len = number(&buf[at + 1..end])
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| ProtocolError("invalid bulk length".into()))?;
        if len > max_request {
            return Err(ProtocolError(format!(
                "bulk of {len} bytes is larger than the limit of {max_request} bytes (resp.maxRequestBytes)"
            )));
        }
        let start = end + 2;
        let stop = start + len;
        if buf.len() < stop + 2 {
            if stop > max_request {
                return Err(ProtocolError(format!(
                    "request larger than the limit of {max_request} bytes (resp.maxRequestBytes)"
                )));
            }
            return Ok(None);
        }
        if &buf[stop..stop + 2] != b"\r\n" {
            return Err(ProtocolError("bulk string not terminated by CRLF".into()));
        }
        args.push(start..stop);
        at = stop + 2;
    }
    Ok(Some(at))
}

/// A header line (`*N`, `$N`) has at most 20 bytes: a buffer holding more without its end is malformed.
fn too_long_header(from_header: &[u8]) -> Result<Option<usize>, ProtocolError> {
    if from_header.len() > 32 { Err(ProtocolError("invalid multibulk length".into())) } else { Ok(None) }
}

fn parse_inline(buf: &[u8], args: &mut Vec<Range<usize>>) -> Result<Option<usize>, ProtocolError> {
    let Some(newline) = memchr::memchr(b'\n', buf) else {
        if buf.len() > MAX_INLINE {
            return Err(ProtocolError("too big inline request".into()));
        }
        return Ok(None);
    };
    let line_stop = if newline > 0 && buf[newline - 1] == b'\r' { newline - 1 } else { newline };
    let line = &buf[..line_stop];
    let mut i = 0;
    while i < line.len() {
        if line[i].is_ascii_whitespace() {
            i += 1;
            continue;
        }
        let start = i;
        while i < line.len() && !line[i].is_ascii_whitespace() {
            i += 1;
        }
        args.push(start..i);
    }
    Ok(Some(newline + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    type Parsed = Option<(usize, Vec<Vec<u8>>)>;

    fn parsed(buf: &[u8]) -> Result<Parsed, ProtocolError> {
        let mut args = Vec::new();
        Ok(parse(buf, &mut args, 1 << 20)?
            .map(|n| (n, args.iter().map(|r| buf[r.clone()].to_vec()).collect())))
    }

    #[test]
    fn multibulk_commands_parse_one_at_a_time_and_wait_for_missing_bytes() {
        let two = b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n*1\r\n$4\r\nPING\r\n";
        let (n, args) = parsed(two).expect("parses").expect("complete");
        assert_eq!(n, 20);
        assert_eq!(args, vec![b"GET".to_vec(), b"k".to_vec()]);
        let (m, args) = parsed(&two[n..]).expect("parses").expect("complete");
        assert_eq!((m, args), (14, vec![b"PING".to_vec()]));
        for cut in 1..20 {
            assert_eq!(parsed(&two[..cut]).expect("parses"), None, "cut at {cut}");
        }
    }

    #[test]
    fn binary_values_with_crlf_inside_are_kept_whole() {
        let buf = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$4\r\na\r\nb\r\n";
        let (_, args) = parsed(buf).expect("parses").expect("complete");
        assert_eq!(args[2], b"a\r\nb".to_vec());
    }

    #[test]
    fn inline_commands_split_on_whitespace() {
        let (n, args) = parsed(b"SET  k v\r\nGET k\n").expect("parses").expect("complete");
        assert_eq!(n, 10);
        assert_eq!(args, vec![b"SET".to_vec(), b"k".to_vec(), b"v".to_vec()]);
        assert_eq!(parsed(b"\r\n").expect("parses"), Some((2, vec![])));
        assert_eq!(parsed(b"PIN").expect("parses"), None);
    }

    #[test]
    fn malformed_requests_are_protocol_errors() {
        for bad in [&b"*x\r\n"[..], b"*1\r\n:3\r\n", b"*1\r\n$-5\r\n", b"*1\r\n$3\r\nGETXX", b"*1\r\n$ab\r\n"]
        {
            assert!(parsed(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        let mut args = Vec::new();
        let big = b"*2\r\n$3\r\nSET\r\n$99999\r\n";
        assert!(parse(big, &mut args, 1024).expect_err("too large").0.contains("maxRequestBytes"));
        assert!(parsed(&vec![b'a'; MAX_INLINE + 1]).is_err());
        assert!(parsed(&[b"*".as_slice(), &[b'1'; 40]].concat()).is_err());
    }
}
