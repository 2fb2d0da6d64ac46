//! The host's `http` interface: a hook's only egress.
//!
//! Every request is checked against the keyspace's `allowedHosts` on the *parsed* URL — scheme http or https,
//! host and port (the scheme's default port when absent) equal to one entry. The `Host` header always comes
//! from the URL: a request that sets one is denied, so a hook cannot reach a virtual host behind an allowed
//! address. Redirects are followed by the host, and only to allowed hosts. Each keyspace has its own client
//! (connection reuse within the keyspace), a cap on requests in flight, and a cap on the response body.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use distcache_api::{Host, HostPort};
use tokio::sync::Semaphore;
use tracing::Instrument;

use super::bindings::wit_http::{Error, Request, Response};
use crate::telemetry;

/// Most redirects followed for one request.
const MAX_REDIRECTS: usize = 5;
/// Timeout of connection establishment (TCP + TLS).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The allowlist of one keyspace: its parsed `allowedHosts`.
#[derive(Clone, Debug, Default)]
pub struct AllowList {
    hosts: Vec<HostPort>,
}

impl AllowList {
    /// The allowlist of these entries.
    pub fn new(hosts: &[HostPort]) -> Self {
        Self { hosts: hosts.to_vec() }
    }

    /// Why `url` may not be requested, or `None` when it may.
    pub fn check(&self, url: &reqwest::Url) -> Option<String> {
        if !matches!(url.scheme(), "http" | "https") {
            return Some(format!("scheme {:?} is not allowed, only http and https", url.scheme()));
        }
        let host = match url.host() {
            Some(url::Host::Domain(d)) => Host::Name(d.to_owned()),
            Some(url::Host::Ipv4(ip)) => Host::Ipv4(ip),
            Some(url::Host::Ipv6(ip)) => Host::Ipv6(ip),
            None => return Some("the URL has no host".into()),
        };
        let Some(port) = url.port_or_known_default() else {
            return Some("the URL has no port".into());
        };
        let target = HostPort::new(host, port);
        if self.hosts.contains(&target) {
            None
        } else {
            Some(format!("{target} is not in the keyspace's allowedHosts"))
        }
    }
}

/// A redirect refused by the allowlist (carried through reqwest's error chain).
#[derive(Debug, thiserror::Error)]
#[error("redirect to {0}")]
struct DeniedRedirect(String);

/// Limits of a keyspace's egress.
#[derive(Clone, Debug)]
pub struct HttpLimits {
    /// Largest response body.
    pub max_response_bytes: u64,
    /// Most requests in flight.
    pub max_concurrent: u32,
}

/// The egress of one keyspace's hook.
pub struct HttpGate {
    allow: Arc<AllowList>,
    client: reqwest::Client,
    in_flight: Semaphore,
    max_response_bytes: u64,
}

impl HttpGate {
    /// A gate for one keyspace.
    pub fn new(allowed_hosts: &[HostPort], limits: &HttpLimits) -> Result<Self, reqwest::Error> {
        let allow = Arc::new(AllowList::new(allowed_hosts));
        let policy_allow = Arc::clone(&allow);
        let policy = reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() >= MAX_REDIRECTS {
                return attempt.error(format!("more than {MAX_REDIRECTS} redirects"));
            }
            match policy_allow.check(attempt.url()) {
                None => attempt.follow(),
                Some(why) => {
                    let err = DeniedRedirect(format!("{}: {why}", attempt.url()));
                    attempt.error(err)
                }
            }
        });
        let client = reqwest::Client::builder()
            .redirect(policy)
            // Requests go where the URL says: no proxy from the environment.
            .no_proxy()
            .connect_timeout(CONNECT_TIMEOUT)
            .pool_idle_timeout(Duration::from_mins(1))
            .user_agent(concat!("distcache-hook/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            allow,
            client,
            in_flight: Semaphore::new(usize::try_from(limits.max_concurrent).unwrap_or(usize::MAX).max(1)),
            max_response_bytes: limits.max_response_bytes,
        })
    }

    /// Sends a guest's request, to finish before `deadline` (the end of the hook call).
    pub async fn send(&self, request: Request, deadline: Instant) -> Result<Response, Error> {
        let url = reqwest::Url::parse(&request.url)
            .map_err(|e| Error::InvalidRequest(format!("invalid URL {:?}: {e}", request.url)))?;
        if let Some(why) = self.allow.check(&url) {
            return Err(Error::Denied(format!("{url}: {why}")));
        }
        let method = reqwest::Method::from_bytes(request.method.to_ascii_uppercase().as_bytes())
            .map_err(|_| Error::InvalidRequest(format!("invalid method {:?}", request.method)))?;
        let mut headers = reqwest::header::HeaderMap::with_capacity(request.headers.len());
        for (name, value) in &request.headers {
            let name = reqwest::header::HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| Error::InvalidRequest(format!("invalid header name {name:?}")))?;
            if name == reqwest::header::HOST {
                return Err(Error::Denied(
                    "the Host header is set by the host from the URL; a hook may not set it".into(),
                ));
            }
            let value = reqwest::header::HeaderValue::from_str(value)
                .map_err(|_| Error::InvalidRequest(format!("invalid value of header {name}")))?;
            headers.append(name, value);
        }
        // The origin sees the request's trace (W3C traceparent), unless the hook sent a traceparent of its own.
        let span = if telemetry::in_trace() {
            tracing::info_span!(
                target: telemetry::SPANS,
                "distcache.hook.http",
                otel.kind = "client",
                http.request.method = method.as_str(),
                server.address = url.host_str().unwrap_or_default(),
                server.port = url.port_or_known_default().unwrap_or_default(),
                http.response.status_code = tracing::field::Empty,
                otel.status_code = tracing::field::Empty,
            )
        } else {
            tracing::Span::none()
        };
        if !headers.contains_key("traceparent") {
            let _entered = span.enter();
            telemetry::inject_headers(&mut headers);
        }
        let now = Instant::now();
        let mut timeout = deadline.saturating_duration_since(now);
        if let Some(ms) = request.timeout_ms {
            timeout = timeout.min(Duration::from_millis(ms));
        }
        if timeout.is_zero() {
            return Err(Error::Timeout);
        }
        let work = async {
            let _permit = self.in_flight.acquire().await.map_err(|_| Error::Connection("closed".into()))?;
            let mut builder = self.client.request(method, url).headers(headers);
            if let Some(body) = request.body {
                builder = builder.body(body);
            }
            let mut response = builder.send().await.map_err(|e| map_error(&e))?;
            if response.content_length().is_some_and(|n| n > self.max_response_bytes) {
                return Err(Error::TooLarge);
            }
            let status = response.status().as_u16();
            let headers = response
                .headers()
                .iter()
                .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
                .collect();
            let mut body = Vec::new();
            while let Some(chunk) = response.chunk().await.map_err(|e| map_error(&e))? {
                if (body.len() + chunk.len()) as u64 > self.max_response_bytes {
                    return Err(Error::TooLarge);
                }
                body.extend_from_slice(&chunk);
            }
            Ok(Response { status, headers, body })
        };
        let answer =
            tokio::time::timeout(timeout, work).instrument(span.clone()).await.unwrap_or(Err(Error::Timeout));
        match &answer {
            Ok(response) => span.record("http.response.status_code", response.status),
            Err(_) => span.record("otel.status_code", "ERROR"),
        };
        answer
    }
}

fn map_error(e: &reqwest::Error) -> Error {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(denied) = s.downcast_ref::<DeniedRedirect>() {
            return Error::Denied(denied.to_string());
        }
        source = s.source();
    }
    if e.is_timeout() {
        return Error::Timeout;
    }
    // reqwest's Display names the URL; the sources say what failed (refused, TLS, ...).
    let mut message = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    Error::Connection(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> reqwest::Url {
        reqwest::Url::parse(s).expect("test URL parses")
    }

    fn allow(entries: &[&str]) -> AllowList {
        let hosts: Vec<HostPort> =
            entries.iter().map(|e| e.parse().unwrap_or_else(|err| panic!("{e}: {err}"))).collect();
        AllowList::new(&hosts)
    }

    #[test]
    fn allowlist_matches_scheme_host_and_port_of_the_parsed_url() {
        let allow = allow(&["127.0.0.1:8080", "Example.com:443", "[::1]:9000"]);
        assert_eq!(allow.check(&url("http://127.0.0.1:8080/users/1")), None);
        assert_eq!(allow.check(&url("https://example.com/x")), None, "default port of https");
        assert_eq!(allow.check(&url("https://EXAMPLE.com:443/x")), None, "hosts are case-insensitive");
        assert_eq!(allow.check(&url("http://[::1]:9000/")), None);
        assert_eq!(allow.check(&url("http://[0:0::1]:9000/")), None, "IPv6 addresses compare as addresses");
        for denied in [
            "http://127.0.0.1:8081/",
            "http://example.com/",                      // port 80 is not listed
            "ftp://127.0.0.1:8080/",                    // scheme
            "http://127.0.0.1:8080@evil.example:8080/", // userinfo trick: the host is evil.example
            "http://127.0.0.2:8080/",
            "http://0x7f.0.0.1:8081/",
            "http://[::1]:9001/",
            "http://[::2]:9000/",
        ] {
            assert!(allow.check(&url(denied)).is_some(), "{denied} must be denied");
        }
        // Alternative spellings of an allowed IP normalise to it (the URL parser canonicalises them).
        assert_eq!(allow.check(&url("http://0x7f.0.0.1:8080/")), None);
    }

    #[test]
    fn egress_to_another_port_or_host_is_refused_naming_the_target() {
        let allow = allow(&["users-api.default.svc:8080"]);
        assert_eq!(allow.check(&url("http://users-api.default.svc:8080/u/1")), None, "allowed");
        assert_eq!(
            allow.check(&url("http://users-api.default.svc:8081/u/1")).as_deref(),
            Some("users-api.default.svc:8081 is not in the keyspace's allowedHosts"),
            "another port"
        );
        assert_eq!(
            allow.check(&url("http://orders-api.default.svc:8080/")).as_deref(),
            Some("orders-api.default.svc:8080 is not in the keyspace's allowedHosts"),
            "another host"
        );
        assert_eq!(
            allow.check(&url("https://users-api.default.svc/")).as_deref(),
            Some("users-api.default.svc:443 is not in the keyspace's allowedHosts"),
            "the scheme's default port is not the allowed one"
        );
        assert_eq!(
            self::allow(&["[fd00::1]:443"]).check(&url("https://[fd00::2]/")).as_deref(),
            Some("[fd00::2]:443 is not in the keyspace's allowedHosts"),
            "IPv6 shown in brackets"
        );
        assert!(AllowList::default().check(&url("http://127.0.0.1:8080/")).is_some(), "empty: no egress");
    }
}
