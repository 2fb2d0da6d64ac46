//! `host:port` pairs, as a hook's `allowedHosts` lists them: parsed once, compared as values.

use std::{
    fmt,
    net::{Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

/// Longest host name (DNS).
const MAX_NAME_LEN: usize = 253;

/// The host of a [`HostPort`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Host {
    /// A DNS name, lowercase.
    Name(String),
    /// An IPv4 address.
    Ipv4(Ipv4Addr),
    /// An IPv6 address (written in brackets).
    Ipv6(Ipv6Addr),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Name(name) => f.write_str(name),
            Self::Ipv4(ip) => write!(f, "{ip}"),
            Self::Ipv6(ip) => write!(f, "[{ip}]"),
        }
    }
}

/// A host and a port, `users-api.default.svc:8080`, `10.0.0.7:80` or `[fd00::1]:443`. Host names compare
/// case-insensitively (they are kept lowercase); addresses compare as addresses. Displayed in the same notation
/// it parses.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HostPort {
    host: Host,
    port: u16,
}

/// Why a `host:port` string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid host:port {input:?}: {reason} (expected e.g. users-api:8080, 10.0.0.7:80 or [fd00::1]:443)")]
pub struct ParseHostPortError {
    input: String,
    reason: &'static str,
}

impl HostPort {
    /// A host and port; a host name is lowercased.
    pub fn new(host: Host, port: u16) -> Self {
        let host = match host {
            Host::Name(name) => Host::Name(name.to_ascii_lowercase()),
            ip => ip,
        };
        Self { host, port }
    }

    /// The host.
    pub fn host(&self) -> &Host {
        &self.host
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// A host name as the CRD's rule accepts it: letters, digits, '.' and '-', starting and ending with a letter or
/// digit.
fn valid_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && bytes.iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-'))
        && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
}

impl FromStr for HostPort {
    type Err = ParseHostPortError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = |reason| ParseHostPortError { input: input.to_owned(), reason };
        if input.contains("://") {
            return Err(err("a URL is not a host:port"));
        }
        let (host, port) = if let Some(rest) = input.strip_prefix('[') {
            let (ip, port) =
                rest.split_once("]:").ok_or_else(|| err("missing ]:port after the IPv6 address"))?;
            (Host::Ipv6(ip.parse().map_err(|_| err("not an IPv6 address in the brackets"))?), port)
        } else {
            let (host, port) = input.rsplit_once(':').ok_or_else(|| err("missing :port"))?;
            if host.contains(':') {
                return Err(err("an IPv6 address must be in brackets"));
            }
            let host = match host.parse::<Ipv4Addr>() {
                Ok(ip) => Host::Ipv4(ip),
                Err(_) if valid_name(host) => Host::Name(host.to_owned()),
                Err(_) => {
                    return Err(err(
                        "the host must be a name of letters, digits, '.' and '-' (at most 253) or an IP address",
                    ));
                }
            };
            (host, port)
        };
        if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err("the port must be a number"));
        }
        match port.parse::<u16>() {
            Ok(port) if port > 0 => Ok(Self::new(host, port)),
            _ => Err(err("the port must be between 1 and 65535")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<HostPort, ParseHostPortError> {
        s.parse()
    }

    #[test]
    fn names_addresses_and_bracketed_ipv6_parse_and_display_as_written() {
        for (input, shown) in [
            ("users-api.default.svc:8080", "users-api.default.svc:8080"),
            ("Example.COM:443", "example.com:443"),
            ("127.0.0.1:8080", "127.0.0.1:8080"),
            ("[fd00::1]:443", "[fd00::1]:443"),
            ("[FD00:0::1]:443", "[fd00::1]:443"),
            ("[::ffff:10.0.0.7]:80", "[::ffff:10.0.0.7]:80"),
            ("a:65535", "a:65535"),
        ] {
            let parsed = parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(parsed.to_string(), shown);
            assert_eq!(parse(shown), Ok(parsed), "{shown} parses back to the same value");
        }
        let ip = parse("10.0.0.7:80").expect("parses");
        assert_eq!((ip.host(), ip.port()), (&Host::Ipv4(Ipv4Addr::new(10, 0, 0, 7)), 80));
        assert_eq!(parse("[::1]:9000").map(|h| h.host().clone()), Ok(Host::Ipv6(Ipv6Addr::LOCALHOST)));
        assert_eq!(
            parse("API.example.com:1"),
            parse("api.example.com:1"),
            "names compare case-insensitively"
        );
        assert_eq!(
            HostPort::new(Host::Name("Users-API".into()), 8080),
            parse("users-api:8080").expect("parses"),
            "constructed names are lowercased too"
        );
    }

    #[test]
    fn malformed_entries_are_refused_with_the_reason() {
        for (input, reason) in [
            ("nohost", "missing :port"),
            ("host:", "the port must be a number"),
            ("host:http", "the port must be a number"),
            ("host:+80", "the port must be a number"),
            ("host:0", "between 1 and 65535"),
            ("host:65536", "between 1 and 65535"),
            (":80", "the host must be"),
            ("-a:80", "the host must be"),
            ("user@host:80", "the host must be"),
            ("http://host:80", "a URL is not a host:port"),
            ("host/path:80", "the host must be"),
            ("::1:80", "an IPv6 address must be in brackets"),
            ("[::1]", "missing ]:port"),
            ("[::1]80", "missing ]:port"),
            ("[zz]:80", "not an IPv6 address"),
            ("[]:80", "not an IPv6 address"),
        ] {
            let err = parse(input).expect_err(input).to_string();
            assert!(err.contains(reason), "{input}: {err}");
            assert!(err.contains(&format!("{input:?}")), "the error quotes the entry: {err}");
        }
        assert!(parse(&format!("{}:80", "a".repeat(254))).is_err(), "host names are at most 253 characters");
    }
}
