//! A small origin HTTP service, the "real backend" of read-through tests and of `make demo`.
//!
//! Routes:
//! - `GET /<prefix>/<key>`: the file `<dir>/<prefix>/<key>.json` (or without `.json`), 404 when absent;
//! - `GET /status/<code>/<anything>`: an empty answer with that status (a backend failing with 503);
//! - `GET /redirect/<anything>?to=<url>`: `302 Found` to `<url>`;
//! - `GET /_stats`: the request count per path, as JSON;
//! - `GET` or `POST /_control?…`: changes how the origin answers data requests, and answers the resulting
//!   settings as JSON (`{"fail":503,"delay_ms":0,"burst":0,"burst_status":503}`; a bad parameter is a 400 that
//!   says why, and nothing is changed). Parameters, any subset, in any order:
//!   - `fail=503` answers every data request with that status (400 to 599, empty body) until `fail=off`;
//!   - `delay_ms=N` delays every data answer (failures included) by N milliseconds; `delay_ms=0` removes it;
//!   - `burst=N` answers the next N data requests with `burst_status` (default 503), then goes back to `fail`
//!     or normal answers; `burst=0` cancels a burst in progress.
//!
//!   `curl -X POST 'http://127.0.0.1:8080/_control?fail=503'`, then `…/_control?fail=off`.
//!
//! Data requests are every request but `/_stats` and `/_control`: each is counted per path (without the query)
//! and logged with the instant it arrived ([`Origin::requests`]), whatever it is answered. A burst takes
//! precedence over `fail`. The same controls are methods of [`Origin`] for in-process tests.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
};
use tokio_util::sync::CancellationToken;

/// Status of a burst when `/_control` names none.
const DEFAULT_BURST_STATUS: u16 = 503;

/// What the origin counted, logged, and how it answers data requests now.
#[derive(Debug)]
struct State {
    /// Requests per path (every request but `/_stats`).
    hits: BTreeMap<String, u64>,
    /// Arrival instant and path of every data request, in order.
    log: Vec<(Instant, String)>,
    /// Path and W3C `traceparent` header of every data request that carried one, in order.
    traceparents: Vec<(String, String)>,
    /// Status every data request is answered with, unless a burst is in progress.
    fail: Option<u16>,
    /// Delay of every data answer.
    delay: Duration,
    /// Data requests still to answer with `burst_status`.
    burst: u32,
    burst_status: u16,
}

impl Default for State {
    fn default() -> Self {
        Self {
            hits: BTreeMap::new(),
            log: Vec::new(),
            traceparents: Vec::new(),
            fail: None,
            delay: Duration::ZERO,
            burst: 0,
            burst_status: DEFAULT_BURST_STATUS,
        }
    }
}

impl State {
    /// Counts and logs a data request; returns the status it must fail with (if any) and the delay of its answer.
    fn admit(&mut self, path: &str) -> (Option<u16>, Duration) {
        *self.hits.entry(path.to_owned()).or_default() += 1;
        self.log.push((Instant::now(), path.to_owned()));
        let forced = if self.burst > 0 {
            self.burst -= 1;
            Some(self.burst_status)
        } else {
            self.fail
        };
        (forced, self.delay)
    }

    fn controls_json(&self) -> Vec<u8> {
        let delay_ms = u64::try_from(self.delay.as_millis()).unwrap_or(u64::MAX);
        serde_json::to_vec(&serde_json::json!({
            "fail": self.fail,
            "delay_ms": delay_ms,
            "burst": self.burst,
            "burst_status": self.burst_status,
        }))
        .unwrap_or_default()
    }
}

type Shared = Arc<Mutex<State>>;

/// The state, also after a panic while it was held (it stays consistent: every update is one statement).
fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// An origin on a free loopback port serving `items/<key>.json` with `value(key)` for each of `keys`, from a
/// temporary directory that lives as long as the returned handle.
pub async fn serving_items(
    keys: &[String],
    value: impl Fn(&str) -> Vec<u8>,
) -> std::io::Result<(tempfile::TempDir, Origin)> {
    let data = tempfile::tempdir()?;
    let items = data.path().join("items");
    std::fs::create_dir_all(&items)?;
    for key in keys {
        std::fs::write(items.join(format!("{key}.json")), value(key))?;
    }
    let origin = Origin::start(SocketAddr::from(([127, 0, 0, 1], 0)), data.path()).await?;
    Ok((data, origin))
}

/// A running origin.
pub struct Origin {
    /// Bound address.
    pub addr: SocketAddr,
    state: Shared,
    stop: CancellationToken,
}

impl Origin {
    /// Serves `dir` on `listener` until dropped.
    pub fn serve(listener: TcpListener, dir: PathBuf) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let state = Shared::default();
        let stop = CancellationToken::new();
        let (h, s) = (Arc::clone(&state), stop.clone());
        tokio::spawn(async move {
            loop {
                let conn = tokio::select! {
                    () = s.cancelled() => return,
                    conn = listener.accept() => conn,
                };
                let Ok((stream, _)) = conn else { continue };
                let (h, dir, s) = (Arc::clone(&h), dir.clone(), s.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        () = s.cancelled() => {}
                        _ = serve_connection(stream, &dir, &h) => {}
                    }
                });
            }
        });
        Ok(Self { addr, state, stop })
    }

    /// Binds `addr` and serves `dir`.
    pub async fn start(addr: SocketAddr, dir: impl Into<PathBuf>) -> std::io::Result<Self> {
        Self::serve(TcpListener::bind(addr).await?, dir.into())
    }

    /// Requests received for `path` (without the query).
    pub fn hits(&self, path: &str) -> u64 {
        lock(&self.state).hits.get(path).copied().unwrap_or(0)
    }

    /// All requests received (but `/_stats` and `/_control`).
    pub fn total_hits(&self) -> u64 {
        lock(&self.state).hits.values().sum()
    }

    /// Every data request so far, in order of arrival: the instant it arrived and its path (without the query).
    pub fn requests(&self) -> Vec<(Instant, String)> {
        lock(&self.state).log.clone()
    }

    /// The `traceparent` header of every data request that carried one: `(path, traceparent)`, in order.
    pub fn traceparents(&self) -> Vec<(String, String)> {
        lock(&self.state).traceparents.clone()
    }

    /// Answers every data request with `status` (an HTTP error status, 400 to 599, empty body) from now on;
    /// `None` answers normally again. A burst in progress ([`Origin::fail_next`]) goes first.
    pub fn fail_with(&self, status: Option<u16>) {
        lock(&self.state).fail = status;
    }

    /// Delays every data answer (failures included) by `delay` from now on; `Duration::ZERO` removes it.
    pub fn set_delay(&self, delay: Duration) {
        lock(&self.state).delay = delay;
    }

    /// Answers the next `n` data requests with `status`, then as before (normally, or as [`Origin::fail_with`]
    /// says). Replaces a burst in progress; `n = 0` cancels it.
    pub fn fail_next(&self, n: u32, status: u16) {
        let mut state = lock(&self.state);
        state.burst = n;
        state.burst_status = status;
    }

    /// `http://<addr>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

struct Request {
    path: String,
    query: String,
    /// The client sent `Connection: close`: answer, then close the connection.
    close: bool,
    /// The W3C `traceparent` header, if sent.
    traceparent: Option<String>,
}

async fn read_request(reader: &mut BufReader<TcpStream>) -> std::io::Result<Option<Request>> {
    let mut line = String::new();
    if reader.read_line(&mut line).await? == 0 {
        return Ok(None);
    }
    let target = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
    let mut content_length = 0usize;
    let mut close = false;
    let mut traceparent = None;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).await? == 0 || header.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.trim().eq_ignore_ascii_case("content-length")
        {
            content_length = value.trim().parse().unwrap_or(0);
        }
        if let Some((name, value)) = header.split_once(':')
            && name.trim().eq_ignore_ascii_case("connection")
            && value.trim().eq_ignore_ascii_case("close")
        {
            close = true;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.trim().eq_ignore_ascii_case("traceparent")
        {
            traceparent = Some(value.trim().to_owned());
        }
    }
    if content_length > 0 {
        let mut body = vec![0; content_length.min(1 << 20)];
        reader.read_exact(&mut body).await?;
    }
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    Ok(Some(Request { path: percent_decode(path), query: query.to_owned(), close, traceparent }))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = s.get(i + 1..i + 3)
            && let Ok(b) = u8::from_str_radix(hex, 16)
        {
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn serve_connection(stream: TcpStream, dir: &Path, state: &Mutex<State>) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream);
    while let Some(request) = read_request(&mut reader).await? {
        let (status, headers, body) = match request.path.as_str() {
            "/_stats" => {
                let body = serde_json::to_vec(&lock(state).hits).unwrap_or_default();
                ("200 OK".to_owned(), json_headers(), body)
            }
            "/_control" => control(&request.query, state),
            path => {
                let (forced, delay) = {
                    let mut state = lock(state);
                    if let Some(traceparent) = &request.traceparent {
                        state.traceparents.push((path.to_owned(), traceparent.clone()));
                    }
                    state.admit(path)
                };
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                match forced {
                    Some(code) => (status_line(code), Vec::new(), Vec::new()),
                    None => respond(&request, dir).await,
                }
            }
        };
        let mut head = format!("HTTP/1.1 {status}\r\ncontent-length: {}\r\n", body.len());
        if request.close {
            head.push_str("connection: close\r\n");
        }
        for (k, v) in headers {
            head.push_str(k);
            head.push_str(": ");
            head.push_str(&v);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        let stream = reader.get_mut();
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(&body).await?;
        if request.close {
            break;
        }
    }
    Ok(())
}

type Answer = (String, Vec<(&'static str, String)>, Vec<u8>);

fn json_headers() -> Vec<(&'static str, String)> {
    vec![("content-type", "application/json".to_owned())]
}

/// `503 Service Unavailable`.
fn status_line(code: u16) -> String {
    let reason =
        reqwest::StatusCode::from_u16(code).ok().and_then(|s| s.canonical_reason()).unwrap_or("Status");
    format!("{code} {reason}")
}

/// `/_control`: parses every parameter first, so that a bad one changes nothing, then applies them.
fn control(query: &str, state: &Mutex<State>) -> Answer {
    match parse_control(query) {
        Ok(change) => {
            let mut state = lock(state);
            match change.fail {
                Some(Fail::Off) => state.fail = None,
                Some(Fail::With(status)) => state.fail = Some(status),
                None => {}
            }
            if let Some(delay) = change.delay {
                state.delay = delay;
            }
            if let Some(burst) = change.burst {
                state.burst = burst;
                state.burst_status = change.burst_status.unwrap_or(DEFAULT_BURST_STATUS);
            } else if let Some(status) = change.burst_status {
                state.burst_status = status;
            }
            ("200 OK".to_owned(), json_headers(), state.controls_json())
        }
        Err(message) => (status_line(400), Vec::new(), format!("{message}\n").into_bytes()),
    }
}

/// `fail=` of a `/_control` request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fail {
    /// `fail=off`: answer normally.
    Off,
    /// `fail=<status>`.
    With(u16),
}

/// The parameters of one `/_control` request (`None`: not given).
#[derive(Debug, Default, PartialEq, Eq)]
struct ControlChange {
    fail: Option<Fail>,
    delay: Option<Duration>,
    burst: Option<u32>,
    burst_status: Option<u16>,
}

fn parse_control(query: &str) -> Result<ControlChange, String> {
    fn error_status(name: &str, value: &str) -> Result<u16, String> {
        value
            .parse::<u16>()
            .ok()
            .filter(|code| (400..=599).contains(code))
            .ok_or_else(|| format!("{name}={value}: expected an HTTP error status, 400 to 599"))
    }
    let mut change = ControlChange::default();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_decode(value);
        match name {
            "fail" if value == "off" => change.fail = Some(Fail::Off),
            "fail" => change.fail = Some(Fail::With(error_status(name, &value)?)),
            "delay_ms" => {
                let ms = value.parse().map_err(|_| format!("delay_ms={value}: expected milliseconds"))?;
                change.delay = Some(Duration::from_millis(ms));
            }
            "burst" => {
                change.burst = Some(value.parse().map_err(|_| format!("burst={value}: expected a count"))?);
            }
            "burst_status" => change.burst_status = Some(error_status(name, &value)?),
            other => {
                return Err(format!(
                    "unknown parameter {other:?}; expected fail=<status>|off, delay_ms=N, burst=N, burst_status=<status>"
                ));
            }
        }
    }
    Ok(change)
}

async fn respond(request: &Request, dir: &Path) -> Answer {
    let parts: Vec<&str> = request.path.trim_start_matches('/').split('/').collect();
    match parts.as_slice() {
        ["status", code, ..] => (format!("{code} Status"), Vec::new(), Vec::new()),
        ["redirect", ..] => {
            let to = request.query.split('&').find_map(|kv| kv.strip_prefix("to=")).unwrap_or("/");
            ("302 Found".into(), vec![("location", percent_decode(to))], Vec::new())
        }
        _ => {
            let rel: PathBuf = parts.iter().filter(|p| !p.is_empty() && **p != ".." && **p != ".").collect();
            let with_json = dir.join(format!("{}.json", rel.display()));
            for candidate in [with_json, dir.join(&rel)] {
                if candidate.is_file()
                    && let Ok(body) = tokio::fs::read(&candidate).await
                {
                    return ("200 OK".into(), json_headers(), body);
                }
            }
            ("404 Not Found".into(), Vec::new(), Vec::new())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An origin serving `users/1.json`.
    async fn origin() -> anyhow::Result<(tempfile::TempDir, Origin)> {
        let dir = tempfile::tempdir()?;
        std::fs::create_dir_all(dir.path().join("users"))?;
        std::fs::write(dir.path().join("users").join("1.json"), "{\"id\":1}")?;
        let origin = Origin::start("127.0.0.1:0".parse()?, dir.path()).await?;
        Ok((dir, origin))
    }

    async fn status(origin: &Origin, path: &str) -> anyhow::Result<u16> {
        Ok(crate::http_get(origin.addr, path).await?.0)
    }

    async fn post(origin: &Origin, path_and_query: &str) -> anyhow::Result<(u16, String)> {
        let client = reqwest::Client::builder().no_proxy().build()?;
        let response = client.post(format!("{}{path_and_query}", origin.url())).send().await?;
        Ok((response.status().as_u16(), response.text().await?))
    }

    #[tokio::test]
    async fn failures_bursts_and_delays_set_in_process_apply_to_data_requests_only() -> anyhow::Result<()> {
        let (_dir, origin) = origin().await?;
        assert_eq!(status(&origin, "/users/1").await?, 200);

        origin.fail_with(Some(503));
        assert_eq!(status(&origin, "/users/1").await?, 503);
        assert_eq!(status(&origin, "/users/2").await?, 503, "missing keys fail too");
        assert_eq!(status(&origin, "/_stats").await?, 200, "not a data path");
        assert_eq!(status(&origin, "/_control").await?, 200, "not a data path");

        // A burst goes before the failure mode, then the failure mode again.
        origin.fail_next(2, 429);
        for expected in [429, 429, 503] {
            assert_eq!(status(&origin, "/users/1").await?, expected);
        }
        origin.fail_with(None);
        origin.fail_next(1, 500);
        assert_eq!(status(&origin, "/users/1").await?, 500);
        assert_eq!(status(&origin, "/users/1").await?, 200, "the burst is over");
        assert_eq!(status(&origin, "/users/2").await?, 404);

        // A delay holds every data answer at least that long (a lower bound: no upper one on a busy machine).
        origin.set_delay(Duration::from_millis(150));
        let started = Instant::now();
        assert_eq!(status(&origin, "/users/1").await?, 200);
        assert!(started.elapsed() >= Duration::from_millis(150), "{:?}", started.elapsed());
        origin.set_delay(Duration::ZERO);

        // The log: data requests only, in order of arrival.
        let log = origin.requests();
        let paths: Vec<&str> = log.iter().map(|(_, p)| p.as_str()).collect();
        let mut expected = vec!["/users/1", "/users/1", "/users/2"];
        expected.extend(["/users/1"; 5]);
        expected.extend(["/users/2", "/users/1"]);
        assert_eq!(paths, expected);
        assert!(log.windows(2).all(|w| w[0].0 <= w[1].0), "timestamps in order");
        assert_eq!((origin.hits("/users/1"), origin.hits("/users/2"), origin.total_hits()), (8, 2, 10));
        assert_eq!(origin.hits("/_control"), 0);
        Ok(())
    }

    #[tokio::test]
    async fn the_same_controls_over_http() -> anyhow::Result<()> {
        let (_dir, origin) = origin().await?;
        let (code, body) = post(&origin, "/_control?fail=503").await?;
        assert_eq!(code, 200, "{body}");
        let settings: serde_json::Value = serde_json::from_str(&body)?;
        assert_eq!(
            settings,
            serde_json::json!({"fail": 503, "delay_ms": 0, "burst": 0, "burst_status": 503})
        );
        assert_eq!(status(&origin, "/users/1").await?, 503);

        // GET works as well as POST; several parameters at once.
        let (code, body) =
            crate::http_get(origin.addr, "/_control?fail=off&burst=2&burst_status=502").await?;
        assert_eq!(code, 200, "{body}");
        for expected in [502, 502, 200] {
            assert_eq!(status(&origin, "/users/1").await?, expected);
        }
        // burst without burst_status: 503.
        post(&origin, "/_control?burst=1").await?;
        assert_eq!(status(&origin, "/users/1").await?, 503);
        assert_eq!(status(&origin, "/users/1").await?, 200);

        let (_, body) = post(&origin, "/_control?delay_ms=120").await?;
        assert!(body.contains("\"delay_ms\":120"), "{body}");
        let started = Instant::now();
        assert_eq!(status(&origin, "/users/1").await?, 200);
        assert!(started.elapsed() >= Duration::from_millis(120), "{:?}", started.elapsed());

        // A bad parameter is refused with its reason, and changes nothing (not even the valid ones before it).
        for bad in ["fail=200", "fail=abc&delay_ms=0", "delay_ms=0&burst=-1", "speed=1"] {
            let (code, body) = post(&origin, &format!("/_control?{bad}")).await?;
            assert_eq!(code, 400, "{bad}: {body}");
        }
        let (_, body) = post(&origin, "/_control").await?;
        let settings: serde_json::Value = serde_json::from_str(&body)?;
        assert_eq!(
            settings,
            serde_json::json!({"fail": null, "delay_ms": 120, "burst": 0, "burst_status": 503})
        );
        assert_eq!(origin.total_hits(), 7, "control requests are not data requests");
        assert_eq!(origin.requests().len(), 7);
        Ok(())
    }

    #[test]
    fn control_parameters_parse() {
        assert_eq!(parse_control(""), Ok(ControlChange::default()));
        assert_eq!(
            parse_control("fail=off&delay_ms=20&burst=3&burst_status=500"),
            Ok(ControlChange {
                fail: Some(Fail::Off),
                delay: Some(Duration::from_millis(20)),
                burst: Some(3),
                burst_status: Some(500),
            })
        );
        assert_eq!(parse_control("fail=404").map(|c| c.fail), Ok(Some(Fail::With(404))));
        let error = parse_control("fail=600").expect_err("not an error status");
        assert!(error.contains("fail=600"), "{error}");
        assert!(parse_control("burst_status=200").is_err());
        assert!(parse_control("delay_ms=1s").is_err());
    }
}
