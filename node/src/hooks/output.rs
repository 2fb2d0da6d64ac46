//! A guest's stdout and stderr: forwarded line by line to the node's log (tagged with the keyspace), at most
//! [`LINES_PER_SECOND`] lines per keyspace with the rest counted and reported, and the last bytes of stderr kept
//! so a trap can quote the guest's panic message.

use std::{
    collections::VecDeque,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use parking_lot::Mutex;
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};

/// Log lines per second per keyspace; more are dropped and counted.
pub const LINES_PER_SECOND: u32 = 50;
/// Longest line logged (longer lines are cut).
const MAX_LINE: usize = 4096;
/// Bytes of stderr kept per instance for trap messages.
const TAIL: usize = 4096;

/// The per-keyspace log budget, shared by every instance of the keyspace's hook.
#[derive(Debug)]
pub struct LogBudget {
    keyspace: Arc<str>,
    window: Mutex<(Instant, u32, u64)>,
}

impl LogBudget {
    /// A budget for one keyspace.
    pub fn new(keyspace: Arc<str>) -> Arc<Self> {
        Arc::new(Self { keyspace, window: Mutex::new((Instant::now(), 0, 0)) })
    }

    fn emit(&self, stream: &'static str, line: &[u8]) {
        let mut window = self.window.lock();
        let now = Instant::now();
        if now.duration_since(window.0) >= Duration::from_secs(1) {
            if window.2 > 0 {
                tracing::warn!(keyspace = %self.keyspace, dropped = window.2, "hook output over {LINES_PER_SECOND} lines/s dropped");
            }
            *window = (now, 0, 0);
        }
        if window.1 >= LINES_PER_SECOND {
            window.2 += 1;
            return;
        }
        window.1 += 1;
        drop(window);
        let end = line.len().min(MAX_LINE);
        let text = String::from_utf8_lossy(&line[..end]);
        tracing::info!(target: "distcache::hook", keyspace = %self.keyspace, stream, "{}", text.trim_end());
    }
}

#[derive(Debug, Default)]
struct Buffers {
    line: Vec<u8>,
    tail: VecDeque<u8>,
}

/// One instance's stdout or stderr.
#[derive(Clone, Debug)]
pub struct GuestOutput {
    stream: &'static str,
    budget: Arc<LogBudget>,
    buffers: Arc<Mutex<Buffers>>,
}

impl GuestOutput {
    /// A stream named `stream` ("stdout", "stderr") logging within `budget`.
    pub fn new(stream: &'static str, budget: Arc<LogBudget>) -> Self {
        Self { stream, budget, buffers: Arc::default() }
    }

    /// The last bytes written (at most 4 KiB), for trap messages.
    pub fn tail(&self) -> String {
        let buffers = self.buffers.lock();
        let bytes: Vec<u8> = buffers.tail.iter().copied().collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    fn write(&self, bytes: &[u8]) {
        let mut buffers = self.buffers.lock();
        for &b in bytes {
            if buffers.tail.len() == TAIL {
                buffers.tail.pop_front();
            }
            buffers.tail.push_back(b);
            if b == b'\n' {
                let line = std::mem::take(&mut buffers.line);
                self.budget.emit(self.stream, &line);
            } else if buffers.line.len() < MAX_LINE {
                buffers.line.push(b);
            }
        }
    }
}

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestOutput {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl AsyncWrite for GuestOutput {
    fn poll_write(self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.write(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tail_keeps_the_last_bytes_and_lines_are_split() {
        let out = GuestOutput::new("stderr", LogBudget::new(Arc::from("ks")));
        out.write(b"first line\nthread 'x' panicked at src/lib.rs:1:1:\nboom\n");
        assert!(out.tail().ends_with("boom\n"));
        out.write(&vec![b'y'; 10_000]);
        assert_eq!(out.tail().len(), TAIL);
        assert_eq!(out.buffers.lock().line.len(), MAX_LINE, "an endless line is cut, not grown");
    }

    #[test]
    fn lines_beyond_the_budget_are_counted_not_logged() {
        let budget = LogBudget::new(Arc::from("ks"));
        let out = GuestOutput::new("stdout", Arc::clone(&budget));
        for _ in 0..(LINES_PER_SECOND + 7) {
            out.write(b"spam\n");
        }
        let window = budget.window.lock();
        assert_eq!((window.1, window.2), (LINES_PER_SECOND, 7));
    }
}
