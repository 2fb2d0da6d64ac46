//! Outbound HTTP(S), the hook's only egress.
//!
//! The host allows a request only when its scheme is http or https and its `host:port` (the scheme's
//! default port when absent) is one of the keyspace's `allowedHosts`. The `Host` header is derived from the
//! URL; a request that sets `host` itself is denied. Redirects are followed by the host, only to allowed
//! hosts. The response body is capped by `limits.maxResponseBytes` and concurrent requests per keyspace by
//! `limits.maxConcurrentRequests`.
//!
//! ```ignore
//! use std::time::Duration;
//! use distcache_hook::http::Request;
//!
//! let response = Request::get("http://users.internal:8080/users/42")
//!     .header("accept", "application/json")
//!     .timeout(Duration::from_millis(500))
//!     .send()?;
//! if response.status == 200 { /* response.body */ }
//! ```

use std::fmt;
use std::time::Duration;

use crate::FetchError;
use crate::bindings::distcache::hook::http as wit;
use crate::types::millis;

/// An outbound request; build it, then [`Request::send`] it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    method: String,
    url: String,
    headers: Vec<(String, String)>,
    body: Option<Vec<u8>>,
    timeout: Option<Duration>,
}

impl Request {
    /// A request with any method ("GET", "POST", ...) to an absolute http:// or https:// URL.
    pub fn new(method: impl Into<String>, url: impl Into<String>) -> Self {
        Request { method: method.into(), url: url.into(), headers: Vec::new(), body: None, timeout: None }
    }

    /// A GET request.
    pub fn get(url: impl Into<String>) -> Self {
        Request::new("GET", url)
    }

    /// A POST request.
    pub fn post(url: impl Into<String>) -> Self {
        Request::new("POST", url)
    }

    /// Adds a header (never `host`: the host derives it from the URL and denies requests that set it).
    #[must_use]
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sets the request body.
    #[must_use]
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = Some(body.into());
        self
    }

    /// Sets this request's timeout (whole milliseconds). The host never waits longer than the rest of the
    /// call's own timeout, whatever this says.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Sends the request and waits for the complete response, whatever its status.
    pub fn send(self) -> Result<Response, HttpError> {
        let request = wit::Request {
            method: self.method,
            url: self.url,
            headers: self.headers,
            body: self.body,
            timeout_ms: self.timeout.map(millis),
        };
        wit::send(&request)
            .map(|response| Response {
                status: response.status,
                headers: response.headers,
                body: response.body,
            })
            .map_err(HttpError::from)
    }
}

/// Sends a GET request to `url` without extra headers.
pub fn get(url: &str) -> Result<Response, HttpError> {
    Request::get(url).send()
}

/// A complete response, whatever its status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// HTTP status code.
    pub status: u16,
    /// Response headers, in order.
    pub headers: Vec<(String, String)>,
    /// The complete body.
    pub body: Vec<u8>,
}

impl Response {
    /// The value of the first header called `name`, compared case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The body as UTF-8 text.
    pub fn text(&self) -> Result<&str, std::str::Utf8Error> {
        std::str::from_utf8(&self.body)
    }

    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// Why no response was received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpError {
    /// The URL or a header is not allowed for this keyspace (host not in `allowedHosts`, a redirect leaving
    /// them, a `host` header); the message says which.
    Denied(String),
    /// The request is malformed (bad URL, method or header).
    InvalidRequest(String),
    /// No response within the timeout.
    Timeout,
    /// The response body is larger than `limits.maxResponseBytes`.
    TooLarge,
    /// Connection, TLS or protocol failure.
    Connection(String),
}

impl From<wit::Error> for HttpError {
    fn from(error: wit::Error) -> Self {
        match error {
            wit::Error::Denied(message) => HttpError::Denied(message),
            wit::Error::InvalidRequest(message) => HttpError::InvalidRequest(message),
            wit::Error::Timeout => HttpError::Timeout,
            wit::Error::TooLarge => HttpError::TooLarge,
            wit::Error::Connection(message) => HttpError::Connection(message),
        }
    }
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpError::Denied(message) => write!(f, "http request denied: {message}"),
            HttpError::InvalidRequest(message) => write!(f, "invalid http request: {message}"),
            HttpError::Timeout => f.write_str("http request timed out"),
            HttpError::TooLarge => f.write_str("http response too large (over limits.maxResponseBytes)"),
            HttpError::Connection(message) => write!(f, "http connection failed: {message}"),
        }
    }
}

impl std::error::Error for HttpError {}

/// `Timeout` -> [`FetchError::Timeout`], `Connection` -> [`FetchError::Unavailable`]; `Denied`,
/// `InvalidRequest` and `TooLarge` are bugs or misconfiguration of the hook -> [`FetchError::Internal`] with
/// a message naming the kind (and the host's reason).
impl From<HttpError> for FetchError {
    fn from(error: HttpError) -> Self {
        match error {
            HttpError::Timeout => FetchError::Timeout,
            HttpError::Connection(_) => FetchError::Unavailable(error.to_string()),
            HttpError::Denied(_) | HttpError::InvalidRequest(_) | HttpError::TooLarge => {
                FetchError::Internal(error.to_string())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_helpers() {
        let response = Response {
            status: 200,
            headers: vec![("Content-Type".to_owned(), "text/plain".to_owned())],
            body: b"hello".to_vec(),
        };
        assert_eq!(response.header("content-type"), Some("text/plain"));
        assert_eq!(response.header("etag"), None);
        assert_eq!(response.text(), Ok("hello"));
        assert!(response.is_success());
    }

    #[test]
    fn http_errors_to_fetch_errors() {
        assert_eq!(FetchError::from(HttpError::Timeout), FetchError::Timeout);
        assert!(matches!(FetchError::from(HttpError::Connection("refused".into())),
            FetchError::Unavailable(m) if m.contains("refused")));
        assert!(matches!(FetchError::from(HttpError::Denied("evil.example:80 not allowed".into())),
            FetchError::Internal(m) if m.contains("denied") && m.contains("evil.example:80")));
        assert!(matches!(FetchError::from(HttpError::InvalidRequest("bad url".into())),
            FetchError::Internal(m) if m.contains("invalid") && m.contains("bad url")));
        assert!(
            matches!(FetchError::from(HttpError::TooLarge), FetchError::Internal(m) if m.contains("too large"))
        );
    }
}
