//! The one error type of the client: a gRPC status mapped to what the caller can act on.

use tonic::Code;

/// Why a `DistCache` call failed.
///
/// The variants follow the status codes the server documents (see `cache.proto`), so callers can branch on what
/// they can act on — retry on [`Error::Unavailable`], fix the request on [`Error::InvalidArgument`] — without
/// decoding gRPC codes themselves. Every message carries the server's own explanation. Per-key errors inside a
/// batch (`KeyError.code`) map to the same variants through [`Error::from_code`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The key has no value (`NOT_FOUND`). Single-key reads return `Ok(None)` instead.
    #[error("{}", describe(.0, "not found"))]
    NotFound(String),
    /// The request was malformed: empty or oversized key, value too large, bad TTL (`INVALID_ARGUMENT`).
    #[error("{}", describe(.0, "invalid argument"))]
    InvalidArgument(String),
    /// The node does not serve this keyspace (`FAILED_PRECONDITION`).
    #[error("{}", describe(.0, "unknown keyspace"))]
    UnknownKeyspace(String),
    /// The data source or a peer is down, or the connection broke (`UNAVAILABLE`); worth retrying with backoff.
    #[error("{}", describe(.0, "unavailable"))]
    Unavailable(String),
    /// The node rate-limited the call (`RESOURCE_EXHAUSTED`); retry later.
    #[error("{}", describe(.0, "rate limited"))]
    RateLimited(String),
    /// The data source or the call's own deadline expired (`DEADLINE_EXCEEDED`, or the client-side timeout).
    #[error("{}", describe(.0, "deadline exceeded"))]
    DeadlineExceeded(String),
    /// The client could not reach the endpoint.
    #[error("failed to connect to {endpoint}")]
    Connect {
        /// The endpoint as the client tried it (`http://host:port`).
        endpoint: String,
        /// What went wrong at the transport level.
        #[source]
        source: tonic::transport::Error,
    },
    /// The connection failed because of TLS, and the message says what: the server's certificate is signed by an
    /// unknown CA or is not valid for the name dialled, the server requires a client certificate and none was
    /// given (or refused the one given), or one side speaks TLS and the other does not.
    #[error("TLS failure with {endpoint}: {reason}")]
    Tls {
        /// The endpoint as the client tried it (`https://host:port` or `http://host:port`).
        endpoint: String,
        /// What failed and what to do about it.
        reason: String,
    },
    /// The client's own options cannot work: an invalid endpoint, an `https://` endpoint without a CA bundle, a
    /// client certificate without its key (or the reverse), an unreadable or mismatched PEM file, TLS options
    /// for a plain `http://` endpoint. Nothing was sent.
    #[error("{0}")]
    Config(String),
    /// The server answered something that breaks the API contract (e.g. a batch with the wrong number of
    /// results); a client/server version mismatch is the usual cause.
    #[error("unexpected response from server: {0}")]
    Protocol(String),
    /// Any other gRPC status (`INTERNAL`, `UNAUTHENTICATED`, …), kept whole for inspection.
    #[error("{}", describe_status(.0))]
    Other(tonic::Status),
}

impl Error {
    /// Maps a gRPC status returned by a call.
    ///
    /// A client-side timeout (the deadline set with [`crate::ClientBuilder::timeout`]) surfaces from tonic as
    /// `CANCELLED` with a `TimeoutExpired` cause; it is reported as [`Error::DeadlineExceeded`] because that is
    /// what happened from the caller's point of view.
    pub fn from_status(status: tonic::Status) -> Self {
        if status.code() == Code::Cancelled && caused_by_timeout(&status) {
            return Self::DeadlineExceeded(format!(
                "no answer within the client timeout ({})",
                status.message()
            ));
        }
        match status.code() {
            Code::NotFound => Self::NotFound(status.message().to_owned()),
            Code::InvalidArgument => Self::InvalidArgument(status.message().to_owned()),
            Code::FailedPrecondition => Self::UnknownKeyspace(status.message().to_owned()),
            Code::Unavailable => Self::Unavailable(status.message().to_owned()),
            Code::ResourceExhausted => Self::RateLimited(status.message().to_owned()),
            Code::DeadlineExceeded => Self::DeadlineExceeded(status.message().to_owned()),
            _ => Self::Other(status),
        }
    }

    /// Maps a per-key error of a batch (`KeyError { code, message }`, `code` being a `google.rpc.Code` number)
    /// exactly as [`Error::from_status`] maps a call's status.
    pub fn from_code(code: i32, message: String) -> Self {
        match Code::from(code) {
            Code::NotFound => Self::NotFound(message),
            Code::InvalidArgument => Self::InvalidArgument(message),
            Code::FailedPrecondition => Self::UnknownKeyspace(message),
            Code::Unavailable => Self::Unavailable(message),
            Code::ResourceExhausted => Self::RateLimited(message),
            Code::DeadlineExceeded => Self::DeadlineExceeded(message),
            other => Self::Other(tonic::Status::new(other, message)),
        }
    }

    /// The gRPC code this error stands for (`UNAVAILABLE` for connection failures, `INTERNAL` for protocol
    /// violations), for logging and metrics.
    pub fn code(&self) -> Code {
        match self {
            Self::NotFound(_) => Code::NotFound,
            Self::InvalidArgument(_) | Self::Config(_) => Code::InvalidArgument,
            Self::UnknownKeyspace(_) => Code::FailedPrecondition,
            Self::Unavailable(_) | Self::Connect { .. } | Self::Tls { .. } => Code::Unavailable,
            Self::RateLimited(_) => Code::ResourceExhausted,
            Self::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Self::Protocol(_) => Code::Internal,
            Self::Other(status) => status.code(),
        }
    }

    /// True for [`Error::NotFound`], the one error that is an answer rather than a failure.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::NotFound(_))
    }
}

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        Self::from_status(status)
    }
}

/// The server's message, or `fallback` when the server sent none.
fn describe<'a>(message: &'a str, fallback: &'a str) -> &'a str {
    if message.is_empty() { fallback } else { message }
}

fn describe_status(status: &tonic::Status) -> String {
    if status.message().is_empty() {
        status.code().description().to_owned()
    } else {
        format!("{}: {}", status.code().description(), status.message())
    }
}

/// Whether a call failed because its connection broke before the node answered: a status tonic made from a
/// transport error (it has a source; a status the node sent has none), `CANCELLED` ("operation was canceled": the
/// connection closed with the request queued on it, as when a node shuts down and its GOAWAY crosses the request)
/// or `UNAVAILABLE`, and not the client's own timeout. A read that failed so can be sent again at once: the
/// channel connects anew (through a Service, to another pod).
pub(crate) fn connection_lost(status: &tonic::Status) -> bool {
    matches!(status.code(), Code::Cancelled | Code::Unavailable)
        && std::error::Error::source(status).is_some()
        && !caused_by_timeout(status)
}

pub(crate) fn caused_by_timeout(status: &tonic::Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(err) = source {
        if err.is::<tonic::TimeoutExpired>() {
            return true;
        }
        source = err.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_broken_connection_counts_as_lost() {
        let transport = |code| {
            let mut status = tonic::Status::new(code, "operation was canceled");
            status.set_source(std::sync::Arc::new(std::io::Error::other("connection closed")));
            status
        };
        assert!(connection_lost(&transport(Code::Cancelled)));
        assert!(connection_lost(&transport(Code::Unavailable)));
        // The node's own answers (no source) are not retried, nor other codes, nor the client's timeout.
        assert!(!connection_lost(&tonic::Status::unavailable("the data source is down")));
        assert!(!connection_lost(&tonic::Status::cancelled("cancelled by the node")));
        assert!(!connection_lost(&transport(Code::Internal)));
        let mut timeout = tonic::Status::cancelled("timeout expired");
        timeout.set_source(std::sync::Arc::new(tonic::TimeoutExpired(())));
        assert!(!connection_lost(&timeout));
    }

    #[test]
    fn maps_documented_codes_to_variants() {
        type Check = fn(&Error) -> bool;
        let cases: [(Code, Check); 6] = [
            (Code::NotFound, |e| matches!(e, Error::NotFound(m) if m == "msg")),
            (Code::InvalidArgument, |e| matches!(e, Error::InvalidArgument(m) if m == "msg")),
            (Code::FailedPrecondition, |e| matches!(e, Error::UnknownKeyspace(m) if m == "msg")),
            (Code::Unavailable, |e| matches!(e, Error::Unavailable(m) if m == "msg")),
            (Code::ResourceExhausted, |e| matches!(e, Error::RateLimited(m) if m == "msg")),
            (Code::DeadlineExceeded, |e| matches!(e, Error::DeadlineExceeded(m) if m == "msg")),
        ];
        for (code, check) in cases {
            let from_status = Error::from_status(tonic::Status::new(code, "msg"));
            assert!(check(&from_status), "{code:?} from status gave {from_status:?}");
            let from_code = Error::from_code(code as i32, "msg".to_owned());
            assert!(check(&from_code), "{code:?} from code gave {from_code:?}");
            assert_eq!(from_code.code(), code);
        }
    }

    #[test]
    fn other_codes_keep_the_status() {
        let err = Error::from_code(13, "hook trapped".to_owned());
        assert!(
            matches!(&err, Error::Other(s) if s.code() == Code::Internal && s.message() == "hook trapped")
        );
        assert_eq!(err.to_string(), "Internal error: hook trapped");
        // Unknown numbers become UNKNOWN rather than being dropped.
        assert_eq!(Error::from_code(99, String::new()).code(), Code::Unknown);
    }

    #[test]
    fn messages_are_the_servers_own() {
        let err = Error::from_status(tonic::Status::failed_precondition("unknown keyspace \"nope\""));
        assert_eq!(err.to_string(), "unknown keyspace \"nope\"");
        assert_eq!(Error::from_code(8, String::new()).to_string(), "rate limited");
    }

    #[test]
    fn client_timeout_is_deadline_exceeded() {
        let status = tonic::Status::from_error(Box::new(tonic::TimeoutExpired(())));
        assert_eq!(status.code(), Code::Cancelled);
        assert!(matches!(Error::from_status(status), Error::DeadlineExceeded(_)));
        // A plain cancellation stays what it is.
        assert_eq!(Error::from_status(tonic::Status::cancelled("bye")).code(), Code::Cancelled);
    }
}
