use std::fmt;
use std::time::Duration;

use crate::bindings::distcache::hook::types as wit;

/// A value loaded from the backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The bytes stored and returned to readers.
    pub value: Vec<u8>,
    /// Time to live of this entry; `None` = the keyspace's `ttl` (or no expiry). Sent in whole milliseconds.
    pub ttl: Option<Duration>,
}

impl Entry {
    /// An entry with the keyspace's default TTL.
    pub fn new(value: impl Into<Vec<u8>>) -> Self {
        Entry { value: value.into(), ttl: None }
    }

    /// Sets this entry's time to live (whole milliseconds; longer than `u64::MAX` ms saturates).
    #[must_use]
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }
}

/// Why a key could not be loaded; mirrors the WIT `fetch-error` variant. How the node answers the reader:
///
/// | variant | reader gets | counts as a source failure |
/// |---|---|---|
/// | `NotFound` | NOT_FOUND, cached for the given TTL (or the keyspace's `negativeTtl` when `None`) | no |
/// | `InvalidKey` | INVALID_ARGUMENT with the message | no |
/// | `Unavailable` | UNAVAILABLE with the message | yes |
/// | `Timeout` | DEADLINE_EXCEEDED | yes |
/// | `Internal` | INTERNAL with the message (also logged) | yes |
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchError {
    /// The backend has no value for the key; optional negative-cache TTL (whole milliseconds).
    NotFound(Option<Duration>),
    /// The key can never have a value (wrong format); the message is shown to the reader.
    InvalidKey(String),
    /// The backend is down or refused the request; the message is shown to the reader.
    Unavailable(String),
    /// The backend did not answer in time.
    Timeout,
    /// A bug or an unexpected answer; the message is logged and shown to the reader.
    Internal(String),
}

impl FetchError {
    /// Not found, negatively cached for the keyspace's `negativeTtl`.
    pub fn not_found() -> Self {
        FetchError::NotFound(None)
    }

    /// Not found, negatively cached for `ttl`.
    pub fn not_found_with_ttl(ttl: Duration) -> Self {
        FetchError::NotFound(Some(ttl))
    }

    /// The key can never have a value.
    pub fn invalid_key(message: impl Into<String>) -> Self {
        FetchError::InvalidKey(message.into())
    }

    /// The backend is down or refused the request.
    pub fn unavailable(message: impl Into<String>) -> Self {
        FetchError::Unavailable(message.into())
    }

    /// The backend did not answer in time.
    pub fn timeout() -> Self {
        FetchError::Timeout
    }

    /// A bug or an unexpected answer.
    pub fn internal(message: impl Into<String>) -> Self {
        FetchError::Internal(message.into())
    }
}

impl fmt::Display for FetchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FetchError::NotFound(None) => f.write_str("not found"),
            FetchError::NotFound(Some(ttl)) => write!(f, "not found (negative ttl {}ms)", millis(*ttl)),
            FetchError::InvalidKey(message) => write!(f, "invalid key: {message}"),
            FetchError::Unavailable(message) => write!(f, "unavailable: {message}"),
            FetchError::Timeout => f.write_str("timeout"),
            FetchError::Internal(message) => write!(f, "internal error: {message}"),
        }
    }
}

impl std::error::Error for FetchError {}

/// Whole milliseconds of `duration`, saturating at `u64::MAX`.
pub(crate) fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

impl From<Entry> for wit::Entry {
    fn from(entry: Entry) -> Self {
        wit::Entry { value: entry.value, ttl_ms: entry.ttl.map(millis) }
    }
}

impl From<FetchError> for wit::FetchError {
    fn from(error: FetchError) -> Self {
        match error {
            FetchError::NotFound(ttl) => wit::FetchError::NotFound(ttl.map(millis)),
            FetchError::InvalidKey(message) => wit::FetchError::InvalidKey(message),
            FetchError::Unavailable(message) => wit::FetchError::Unavailable(message),
            FetchError::Timeout => wit::FetchError::Timeout,
            FetchError::Internal(message) => wit::FetchError::Internal(message),
        }
    }
}
