//! A small origin HTTP service, the "real backend" of read-through tests and of `make demo`.
//!
//! Routes (every request is counted per path; `GET /_stats` returns the counts as JSON):
//! - `GET /<prefix>/<key>`: the file `<dir>/<prefix>/<key>.json` (or without `.json`), 404 when absent;
//! - `GET /status/<code>/<anything>`: an empty answer with that status (a backend failing with 503);
//! - `GET /redirect/<anything>?to=<url>`: `302 Found` to `<url>`.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
};
use tokio_util::sync::CancellationToken;

/// A running origin.
pub struct Origin {
    /// Bound address.
    pub addr: SocketAddr,
    hits: Arc<Mutex<BTreeMap<String, u64>>>,
    stop: CancellationToken,
}

impl Origin {
    /// Serves `dir` on `listener` until dropped.
    pub fn serve(listener: TcpListener, dir: PathBuf) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let hits = Arc::new(Mutex::new(BTreeMap::new()));
        let stop = CancellationToken::new();
        let (h, s) = (Arc::clone(&hits), stop.clone());
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
        Ok(Self { addr, hits, stop })
    }

    /// Binds `addr` and serves `dir`.
    pub async fn start(addr: SocketAddr, dir: impl Into<PathBuf>) -> std::io::Result<Self> {
        Self::serve(TcpListener::bind(addr).await?, dir.into())
    }

    /// Requests received for `path` (without the query).
    pub fn hits(&self, path: &str) -> u64 {
        self.hits.lock().map_or(0, |h| h.get(path).copied().unwrap_or(0))
    }

    /// All requests received.
    pub fn total_hits(&self) -> u64 {
        self.hits.lock().map_or(0, |h| h.values().sum())
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
}

async fn read_request(reader: &mut BufReader<TcpStream>) -> std::io::Result<Option<Request>> {
    let mut line = String::new();
    if reader.read_line(&mut line).await? == 0 {
        return Ok(None);
    }
    let target = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
    let mut content_length = 0usize;
    let mut close = false;
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
    }
    if content_length > 0 {
        let mut body = vec![0; content_length.min(1 << 20)];
        reader.read_exact(&mut body).await?;
    }
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    Ok(Some(Request { path: percent_decode(path), query: query.to_owned(), close }))
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

async fn serve_connection(
    stream: TcpStream,
    dir: &Path,
    hits: &Mutex<BTreeMap<String, u64>>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream);
    while let Some(request) = read_request(&mut reader).await? {
        if request.path != "/_stats"
            && let Ok(mut h) = hits.lock()
        {
            *h.entry(request.path.clone()).or_default() += 1;
        }
        let (status, headers, body) = respond(&request, dir, hits).await;
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

async fn respond(
    request: &Request,
    dir: &Path,
    hits: &Mutex<BTreeMap<String, u64>>,
) -> (String, Vec<(&'static str, String)>, Vec<u8>) {
    let json = vec![("content-type", "application/json".to_owned())];
    let parts: Vec<&str> = request.path.trim_start_matches('/').split('/').collect();
    match parts.as_slice() {
        ["_stats"] => {
            let body = hits.lock().map(|h| serde_json::to_vec(&*h).unwrap_or_default()).unwrap_or_default();
            ("200 OK".into(), json, body)
        }
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
                    return ("200 OK".into(), json, body);
                }
            }
            ("404 Not Found".into(), Vec::new(), Vec::new())
        }
    }
}
