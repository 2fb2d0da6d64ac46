//! Log lines written to the node's log, tagged with the keyspace name.
//!
//! ```ignore
//! distcache_hook::log::warn(&format!("origin answered {status} for {key}"));
//! ```

use crate::bindings::distcache::hook::log as wit;

/// Severity of a log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// Very detailed tracing.
    Trace,
    /// Debugging detail.
    Debug,
    /// Normal operation.
    Info,
    /// Something unexpected that the hook handled.
    Warn,
    /// A failure.
    Error,
}

impl From<Level> for wit::Level {
    fn from(level: Level) -> Self {
        match level {
            Level::Trace => wit::Level::Trace,
            Level::Debug => wit::Level::Debug,
            Level::Info => wit::Level::Info,
            Level::Warn => wit::Level::Warn,
            Level::Error => wit::Level::Error,
        }
    }
}

/// Writes one log line at `level`.
pub fn log(level: Level, message: &str) {
    wit::log(level.into(), message);
}

/// Writes one line at trace level.
pub fn trace(message: &str) {
    log(Level::Trace, message);
}

/// Writes one line at debug level.
pub fn debug(message: &str) {
    log(Level::Debug, message);
}

/// Writes one line at info level.
pub fn info(message: &str) {
    log(Level::Info, message);
}

/// Writes one line at warn level.
pub fn warn(message: &str) {
    log(Level::Warn, message);
}

/// Writes one line at error level.
pub fn error(message: &str) {
    log(Level::Error, message);
}
