//! The engine's error type. It carries no transport types: the gRPC server maps it to `tonic::Status` in one
//! place (`server.rs`), and batch results carry its [`Code`] as a number.

use std::time::Duration;

/// Status codes of the DistCache API, numbered as `google.rpc.Code`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(i32)]
pub enum Code {
    /// Success.
    Ok = 0,
    /// The caller cancelled.
    Cancelled = 1,
    /// Bad key, value, TTL or batch.
    InvalidArgument = 3,
    /// The data source did not answer in time.
    DeadlineExceeded = 4,
    /// No value for the key.
    NotFound = 5,
    /// The caller may not do this operation on this keyspace.
    PermissionDenied = 7,
    /// Rate limited.
    ResourceExhausted = 8,
    /// Unknown keyspace.
    FailedPrecondition = 9,
    /// A bug or an unexpected failure.
    Internal = 13,
    /// The data source or a required peer is down.
    Unavailable = 14,
}

impl Code {
    /// The code for a `google.rpc.Code` number; unknown numbers map to `Internal`.
    pub fn from_i32(code: i32) -> Self {
        match code {
            0 => Self::Ok,
            1 => Self::Cancelled,
            3 => Self::InvalidArgument,
            4 => Self::DeadlineExceeded,
            5 => Self::NotFound,
            7 => Self::PermissionDenied,
            8 => Self::ResourceExhausted,
            9 => Self::FailedPrecondition,
            14 => Self::Unavailable,
            _ => Self::Internal,
        }
    }

    /// Lower-case label used in metrics (`code="not_found"`).
    pub fn label(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Cancelled => "cancelled",
            Self::InvalidArgument => "invalid_argument",
            Self::DeadlineExceeded => "deadline_exceeded",
            Self::NotFound => "not_found",
            Self::PermissionDenied => "permission_denied",
            Self::ResourceExhausted => "resource_exhausted",
            Self::FailedPrecondition => "failed_precondition",
            Self::Internal => "internal",
            Self::Unavailable => "unavailable",
        }
    }
}

/// Why a cache operation failed. Cloneable because one outcome is shared by every caller of a single flight.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// The key has no value.
    #[error("not found")]
    NotFound,
    /// The request is malformed; the message names the limit.
    #[error("{0}")]
    InvalidArgument(String),
    /// The keyspace does not exist on this node.
    #[error("unknown keyspace {name:?} (known: {known})")]
    UnknownKeyspace {
        /// Requested name.
        name: String,
        /// Comma-separated names this node serves.
        known: String,
    },
    /// The data source or a peer that must take part is down.
    #[error("{0}")]
    Unavailable(String),
    /// The data source gave up on its own limit (a hook's timeout, a backend that timed out).
    #[error("{0}")]
    SourceTimedOut(String),
    /// The data source did not answer in time.
    #[error("data source of keyspace {keyspace:?} did not answer within {timeout:?}")]
    DeadlineExceeded {
        /// Keyspace.
        keyspace: String,
        /// The fetch timeout that elapsed.
        timeout: Duration,
    },
    /// Rate limited.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The keyspace's `access` lists do not name the caller.
    #[error("{0}")]
    PermissionDenied(String),
    /// Unexpected failure.
    #[error("{0}")]
    Internal(String),
    /// An error received from a peer, kept with its code.
    #[error("{message}")]
    Remote {
        /// The code the peer reported.
        code: Code,
        /// The peer's message.
        message: String,
    },
}

impl EngineError {
    /// The API status code of this error.
    pub fn code(&self) -> Code {
        match self {
            Self::NotFound => Code::NotFound,
            Self::InvalidArgument(_) => Code::InvalidArgument,
            Self::UnknownKeyspace { .. } => Code::FailedPrecondition,
            Self::Unavailable(_) => Code::Unavailable,
            Self::DeadlineExceeded { .. } | Self::SourceTimedOut(_) => Code::DeadlineExceeded,
            Self::ResourceExhausted(_) => Code::ResourceExhausted,
            Self::PermissionDenied(_) => Code::PermissionDenied,
            Self::Internal(_) => Code::Internal,
            Self::Remote { code, .. } => *code,
        }
    }

    /// Rebuilds an error from a code and message received in a batch result.
    pub fn from_code(code: i32, message: String) -> Self {
        match Code::from_i32(code) {
            Code::NotFound => Self::NotFound,
            code => Self::Remote { code, message },
        }
    }
}
