//! Example DistCache hook: loads each key from an HTTP(S) origin with one GET.
//!
//! `fetch(key)` sends `GET {baseUrl}/{key}`, the key percent-encoded (every byte except the unreserved
//! characters `A-Z a-z 0-9 - . _ ~` becomes `%XX`), and maps the answer:
//!
//! | origin answer | result |
//! |---|---|
//! | 200 | the body bytes; TTL from `Cache-Control` (`s-maxage`, else `max-age`, in seconds) when present, else config `ttl`, else the keyspace's `ttl` |
//! | 200, `requireJson: "true"`, body not JSON | `internal` |
//! | 404 | `not-found`, negatively cached for config `notFoundTtl` (else the keyspace's `negativeTtl`) |
//! | 400 | `invalid-key` with the start of the origin's message |
//! | 429, 5xx | `unavailable("origin answered 503")` |
//! | no connection | `unavailable` |
//! | no answer within the timeout | `timeout` |
//! | any other status | `internal("origin answered unexpected status 302")` |
//!
//! The keys `.` and `..` (and the empty key) are answered `invalid-key`: they cannot be a URL path segment.
//!
//! # Config
//!
//! | key | meaning |
//! |---|---|
//! | `baseUrl` | required; `http://` or `https://` URL without query or fragment; a trailing `/` is ignored. Its `host:port` must be in the keyspace's `allowedHosts`. |
//! | `ttl` | TTL of loaded values when the origin sends no `Cache-Control` max-age |
//! | `notFoundTtl` | negative-cache TTL of 404 answers |
//! | `timeout` | per-request timeout (the host also caps it by the rest of the call's timeout) |
//! | `headers` | request headers, one `Name: value` per line, e.g. `"accept: application/json"` |
//! | `header.<Name>` | one request header each, e.g. `header.x-api-key: "..."` (alternative to `headers`) |
//! | `requireJson` | `"true"` to refuse (as `internal`) a 200 body that is not valid JSON; default `"false"` |
//!
//! Durations are written like the keyspace's own `ttl`: one or more decimal numbers, each with a unit `ms`,
//! `s`, `m`, `h` or `d` (`250ms`, `30s`, `5m`, `1h30m`, `1.5s`, `7d`; see `distcache_hook::duration`).
//!
//! `requireJson` checks the body with `serde_json` without building it in memory ([`IgnoredAny`]); a hook that
//! needs the fields would deserialize into its own `#[derive(Deserialize)]` type the same way.

mod url;

use std::time::Duration;

use distcache_hook::{Config, Entry, FetchError, Hook, http, log};
use serde::de::IgnoredAny;

/// Longest part of an origin's 400 body quoted in the `invalid-key` message.
const MAX_QUOTED_BODY: usize = 200;

struct HttpJson {
    /// `baseUrl` without a trailing slash.
    base_url: String,
    ttl: Option<Duration>,
    not_found_ttl: Option<Duration>,
    timeout: Option<Duration>,
    headers: Vec<(String, String)>,
    require_json: bool,
}

impl Hook for HttpJson {
    fn init(config: &Config) -> Result<Self, String> {
        let base_url = url::parse_base_url(config.require("baseUrl")?)
            .map_err(|error| format!("hook config key \"baseUrl\": {error}"))?;
        let require_json = match config.get("requireJson").map(str::trim) {
            None | Some("false") => false,
            Some("true") => true,
            Some(other) => {
                return Err(format!(
                    "hook config key \"requireJson\" must be \"true\" or \"false\", not \"{other}\""
                ));
            }
        };
        Ok(HttpJson {
            base_url,
            ttl: config.get_duration("ttl")?,
            not_found_ttl: config.get_duration("notFoundTtl")?,
            timeout: config.get_duration("timeout")?,
            headers: headers(config)?,
            require_json,
        })
    }

    fn fetch(&self, key: &str) -> Result<Entry, FetchError> {
        if key.is_empty() || key == "." || key == ".." {
            return Err(FetchError::invalid_key(format!(
                "the key \"{key}\" cannot be used as a URL path segment"
            )));
        }
        let mut target = String::with_capacity(self.base_url.len() + 1 + key.len() * 3);
        target.push_str(&self.base_url);
        target.push('/');
        url::percent_encode_into(key, &mut target);

        let mut request = http::Request::get(target);
        for (name, value) in &self.headers {
            request = request.header(name.as_str(), value.as_str());
        }
        if let Some(timeout) = self.timeout {
            request = request.timeout(timeout);
        }
        let response = request.send()?;

        match response.status {
            200 => {
                if self.require_json && !is_json(&response.body) {
                    return Err(FetchError::internal(
                        "origin answered 200 with a body that is not valid JSON",
                    ));
                }
                let ttl = response.header("cache-control").and_then(cache_control_ttl).or(self.ttl);
                Ok(Entry { value: response.body, ttl })
            }
            404 => Err(FetchError::NotFound(self.not_found_ttl)),
            400 => Err(FetchError::invalid_key(format!(
                "origin rejected the key (400){}",
                quote_body(&response.body)
            ))),
            status @ (429 | 500..=599) => {
                log::debug(&format!("origin answered {status} for key \"{key}\""));
                Err(FetchError::unavailable(format!("origin answered {status}")))
            }
            status => {
                log::warn(&format!("origin answered unexpected status {status} for key \"{key}\""));
                Err(FetchError::internal(format!("origin answered unexpected status {status}")))
            }
        }
    }
}

distcache_hook::export_hook!(HttpJson);

/// Whether `body` is one JSON value (RFC 8259, UTF-8), optionally surrounded by whitespace. Skipping a value
/// ([`IgnoredAny`]) allocates nothing per value and does not recurse, so any nesting depth is safe.
fn is_json(body: &[u8]) -> bool {
    // `from_str`, not `from_slice`: skipping a string does not check its UTF-8, so check the whole body first.
    std::str::from_utf8(body).is_ok_and(|text| serde_json::from_str::<IgnoredAny>(text).is_ok())
}

/// Request headers from `headers` (one `Name: value` per line) and `header.<Name>` keys.
fn headers(config: &Config) -> Result<Vec<(String, String)>, String> {
    let mut headers = Vec::new();
    if let Some(lines) = config.get("headers") {
        for line in lines.lines().map(str::trim).filter(|line| !line.is_empty()) {
            let Some((name, value)) = line.split_once(':') else {
                return Err(format!("hook config key \"headers\": \"{line}\" is not \"Name: value\""));
            };
            headers.push(header(name.trim(), value.trim())?);
        }
    }
    for (key, value) in config.iter() {
        if let Some(name) = key.strip_prefix("header.") {
            headers.push(header(name, value.trim())?);
        }
    }
    Ok(headers)
}

fn header(name: &str, value: &str) -> Result<(String, String), String> {
    let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if name.is_empty() || !name.chars().all(token) {
        return Err(format!("hook config: \"{name}\" is not a valid header name"));
    }
    if name.eq_ignore_ascii_case("host") {
        return Err("hook config: the host header cannot be set; it is derived from baseUrl".to_owned());
    }
    if value.chars().any(|c| c.is_control() && c != '\t') {
        return Err(format!("hook config: the value of header \"{name}\" contains control characters"));
    }
    Ok((name.to_owned(), value.to_owned()))
}

/// TTL from a `Cache-Control` value: `s-maxage` (this is a shared cache) wins over `max-age`.
fn cache_control_ttl(value: &str) -> Option<Duration> {
    let mut max_age = None;
    for directive in value.split(',') {
        let Some((name, seconds)) = directive.split_once('=') else { continue };
        let name = name.trim();
        let Ok(seconds) = seconds.trim().trim_matches('"').parse::<u64>() else { continue };
        if name.eq_ignore_ascii_case("s-maxage") {
            return Some(Duration::from_secs(seconds));
        }
        if name.eq_ignore_ascii_case("max-age") && max_age.is_none() {
            max_age = Some(Duration::from_secs(seconds));
        }
    }
    max_age
}

/// `": <start of the body>"` when the body is non-empty UTF-8 text, else "".
fn quote_body(body: &[u8]) -> String {
    let Ok(text) = std::str::from_utf8(body) else { return String::new() };
    let text = text.trim();
    if text.is_empty() {
        return String::new();
    }
    let mut quoted = String::from(": ");
    for (count, c) in text.chars().enumerate() {
        if count == MAX_QUOTED_BODY {
            quoted.push('…');
            break;
        }
        quoted.push(if c.is_control() { ' ' } else { c });
    }
    quoted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_control() {
        assert_eq!(cache_control_ttl("public, max-age=60"), Some(Duration::from_mins(1)));
        assert_eq!(cache_control_ttl("max-age=60, s-maxage=5"), Some(Duration::from_secs(5)));
        assert_eq!(cache_control_ttl("MAX-AGE=\"7\""), Some(Duration::from_secs(7)));
        assert_eq!(cache_control_ttl("no-cache"), None);
        assert_eq!(cache_control_ttl("max-age=abc"), None);
    }

    #[test]
    fn header_config() {
        let config: Config = [("headers", "accept: application/json\n\n x-a: 1 "), ("header.x-api-key", "k")]
            .into_iter()
            .collect();
        assert_eq!(
            headers(&config),
            Ok(vec![
                ("accept".to_owned(), "application/json".to_owned()),
                ("x-a".to_owned(), "1".to_owned()),
                ("x-api-key".to_owned(), "k".to_owned()),
            ])
        );
        let host: Config = [("headers", "Host: evil")].into_iter().collect();
        assert!(headers(&host).is_err());
        let bad: Config = [("headers", "no colon")].into_iter().collect();
        assert!(headers(&bad).is_err());
    }

    #[test]
    fn valid_json() {
        for text in [
            "{}",
            "[]",
            " {\"id\": 1, \"name\": \"Ada\\n\\u00e9\", \"tags\": [true, false, null], \"x\": -0.5e+3} \n",
            "\"just a string\"",
            "0",
            "[[[]]]",
            "{\"é\":\"ü\"}",
        ] {
            assert!(is_json(text.as_bytes()), "{text:?} is JSON");
        }
        assert!(is_json(b"[1e400, -0, 123456789012345678901234567890]"), "any number RFC 8259 allows");
        assert!(is_json(format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)).as_bytes()), "deep is fine");
    }

    #[test]
    fn invalid_json() {
        for text in [
            "",
            "{",
            "{\"a\"}",
            "{\"a\":1,}",
            "[1,]",
            "01",
            "1.",
            "-",
            "tru",
            "\"\\x\"",
            "\"a\nb\"",
            "{} {}",
            "<html>",
            "[1 2]",
            "{a:1}",
        ] {
            assert!(!is_json(text.as_bytes()), "{text:?} is not JSON");
        }
        assert!(!is_json(&[b'"', 0xff, b'"']), "not UTF-8");
        assert!(!is_json("[".repeat(10_000).as_bytes()), "unclosed");
        assert!(!is_json(format!("{}{}", "[".repeat(10_000), "]".repeat(9_999)).as_bytes()), "unbalanced");
    }

    #[test]
    fn duration_config() {
        let config: Config =
            [("baseUrl", "http://origin:8080/users"), ("ttl", "1h30m"), ("timeout", "250ms")]
                .into_iter()
                .collect();
        let hook = HttpJson::init(&config);
        assert_eq!(hook.as_ref().err(), None);
        assert!(hook.is_ok_and(|h| h.ttl == Some(Duration::from_mins(90))
            && h.timeout == Some(Duration::from_millis(250))
            && h.not_found_ttl.is_none()));
        let millis: Config =
            [("baseUrl", "http://origin:8080"), ("notFoundTtl", "30000")].into_iter().collect();
        assert!(
            HttpJson::init(&millis)
                .is_err_and(|e| e.contains("\"notFoundTtl\"") && e.contains("missing unit"))
        );
    }

    #[test]
    fn quoted_body() {
        assert_eq!(quote_body(b""), "");
        assert_eq!(quote_body(b" bad id\n"), ": bad id");
        assert_eq!(quote_body(&[0xff]), "");
        assert_eq!(quote_body("x".repeat(300).as_bytes()).chars().count(), 2 + MAX_QUOTED_BODY + 1);
    }
}
