//! A lean gRPC-over-HTTP/2 caller for `distcache bench --transport h2`: the `h2` crate directly, without tonic's
//! channel (a `Buffer` task every call goes through), hyper's dispatch task, or the task hyper spawns per request
//! to stream its body.
//!
//! It is what `redis-benchmark` is to Redis: a load generator whose own cost per request is small, so that on a
//! machine shared with the server the client takes less of the CPU the server under test needs. Each task of a run
//! keeps to one connection, so the requests of the tasks that one batch of responses woke leave in one write.
//! The server sees ordinary gRPC calls (the same paths, headers, length-prefixed protobuf messages and trailers as
//! tonic's), over TLS for an `https://` endpoint (the client's own TLS settings).

use std::{future::Future, sync::Arc};

use bytes::{BufMut, Bytes, BytesMut};
use distcache_proto::v1 as pb;
use prost::Message;
use tonic::{Code, Status};

use crate::{DEFAULT_CONNECT_TIMEOUT, Error, tls::Target};

/// Flow-control windows: large enough that a benchmark's responses never wait for a window update.
const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;

/// The gRPC methods the benchmark calls.
#[derive(Debug, Clone, Copy)]
enum Method {
    Get,
    GetMany,
    Put,
    PutMany,
}

impl Method {
    const fn path(self) -> &'static str {
        match self {
            Self::Get => "/distcache.v1.Cache/Get",
            Self::GetMany => "/distcache.v1.Cache/GetMany",
            Self::Put => "/distcache.v1.Cache/Put",
            Self::PutMany => "/distcache.v1.Cache/PutMany",
        }
    }
}

/// One HTTP/2 connection to a node, shared by the tasks that use it (a clone is another handle to it).
#[derive(Clone)]
pub(super) struct Connection {
    send: h2::client::SendRequest<Bytes>,
    /// The URI of each [`Method`], built once.
    uris: Arc<[http::Uri; 4]>,
}

impl Connection {
    /// Opens a connection to `target` (TLS for an `https://` one) and spawns the task that drives it.
    pub(super) async fn open(target: &Target) -> Result<Self, Error> {
        let stream = target.open_stream(DEFAULT_CONNECT_TIMEOUT).await?;
        let (send, connection) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .handshake::<_, Bytes>(stream)
            .await
            .map_err(|err| {
                Error::Unavailable(format!("HTTP/2 handshake with {} failed: {err}", target.endpoint))
            })?;
        // The connection ends when every handle is dropped (or the server goes away); calls then fail on their own.
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let base: http::Uri = target
            .endpoint
            .parse()
            .map_err(|err| Error::Config(format!("invalid endpoint {:?}: {err}", target.endpoint)))?;
        let uri = |method: Method| {
            let mut parts = base.clone().into_parts();
            parts.path_and_query = Some(http::uri::PathAndQuery::from_static(method.path()));
            http::Uri::from_parts(parts)
                .map_err(|err| Error::Config(format!("invalid endpoint {:?}: {err}", target.endpoint)))
        };
        let uris = [uri(Method::Get)?, uri(Method::GetMany)?, uri(Method::Put)?, uri(Method::PutMany)?];
        Ok(Self { send, uris: Arc::new(uris) })
    }

    /// `Get`: `Ok(true)` for a value, `Ok(false)` for a key without one (`NOT_FOUND`).
    pub(super) async fn get(&self, keyspace: &str, key: String) -> Result<bool, Error> {
        let request = pb::GetRequest { keyspace: keyspace.to_owned(), key };
        match self.unary::<pb::GetResponse, _>(Method::Get, &request).await {
            Ok(_) => Ok(true),
            Err(Error::NotFound(_)) => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// `GetMany`: per key, `Ok(true)` for a value and `Ok(false)` for none.
    pub(super) async fn get_many(
        &self,
        keyspace: &str,
        keys: Vec<String>,
    ) -> Result<Vec<Result<bool, Error>>, Error> {
        let expected = keys.len();
        let request = pb::GetManyRequest { keyspace: keyspace.to_owned(), keys };
        let response = self.unary::<pb::GetManyResponse, _>(Method::GetMany, &request).await?;
        let results = counted(expected, response.results)?;
        Ok(results
            .into_iter()
            .map(|result| match result.outcome {
                Some(pb::key_result::Outcome::Value(_)) => Ok(true),
                Some(pb::key_result::Outcome::Error(error)) => {
                    match Error::from_code(error.code, error.message) {
                        Error::NotFound(_) => Ok(false),
                        other => Err(other),
                    }
                }
                Some(pb::key_result::Outcome::Ok(_)) | None => {
                    Err(Error::Protocol(format!("GetMany result for key {:?} has no value", result.key)))
                }
            })
            .collect())
    }

    /// `Put` without a TTL (the keyspace's default).
    pub(super) async fn put(&self, keyspace: &str, key: String, value: Bytes) -> Result<(), Error> {
        let request = pb::PutRequest { keyspace: keyspace.to_owned(), key, value, ttl: None };
        self.unary::<pb::PutResponse, _>(Method::Put, &request).await.map(drop)
    }

    /// `PutMany` of `(key, value)` entries without a TTL: one result per entry.
    pub(super) async fn put_many(
        &self,
        keyspace: &str,
        entries: Vec<(String, Bytes)>,
    ) -> Result<Vec<Result<(), Error>>, Error> {
        let expected = entries.len();
        let entries = entries.into_iter().map(|(key, value)| pb::Entry { key, value, ttl: None }).collect();
        let request = pb::PutManyRequest { keyspace: keyspace.to_owned(), entries };
        let response = self.unary::<pb::PutManyResponse, _>(Method::PutMany, &request).await?;
        Ok(counted(expected, response.results)?
            .into_iter()
            .map(|result| match result.outcome {
                Some(pb::key_result::Outcome::Ok(_)) => Ok(()),
                Some(pb::key_result::Outcome::Error(error)) => {
                    Err(Error::from_code(error.code, error.message))
                }
                Some(pb::key_result::Outcome::Value(_)) | None => {
                    Err(Error::Protocol(format!("PutMany result for key {:?} is not a success", result.key)))
                }
            })
            .collect())
    }

    /// One unary call: HEADERS and one DATA frame out; HEADERS, DATA and trailers (or trailers only) back.
    fn unary<R: Message + Default, M: Message>(
        &self,
        method: Method,
        request: &M,
    ) -> impl Future<Output = Result<R, Error>> + use<R, M> {
        let uri = self.uris[method as usize].clone();
        let body = frame(request);
        let send = self.send.clone();
        async move {
            let broken = |err: h2::Error| Error::Unavailable(format!("HTTP/2 call failed: {err}"));
            let mut send = send.ready().await.map_err(broken)?;
            let mut head = http::Request::post(uri);
            if let Some(headers) = head.headers_mut() {
                headers
                    .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc"));
                headers.insert(http::header::TE, http::HeaderValue::from_static("trailers"));
            }
            let head =
                head.body(()).map_err(|err| Error::Protocol(format!("cannot build a request: {err}")))?;
            let (response, mut stream) = send.send_request(head, false).map_err(broken)?;
            stream.send_data(body, true).map_err(broken)?;
            let response = response.await.map_err(broken)?;
            if response.status() != http::StatusCode::OK {
                return Err(Error::Protocol(format!("HTTP status {} from the server", response.status())));
            }
            // A trailers-only answer (every error status) carries grpc-status in the headers and no body.
            if let Some(status) = grpc_status(response.headers()) {
                return Err(status);
            }
            let mut body = response.into_body();
            let mut message = BytesMut::new();
            while let Some(chunk) = body.data().await {
                let chunk = chunk.map_err(broken)?;
                let _ = body.flow_control().release_capacity(chunk.len());
                message.extend_from_slice(&chunk);
            }
            let trailers = body.trailers().await.map_err(broken)?;
            if let Some(status) = trailers.as_ref().and_then(grpc_status) {
                return Err(status);
            }
            if trailers.is_none() {
                return Err(Error::Protocol("the response ended without gRPC trailers".to_owned()));
            }
            unframe(&message)
        }
    }
}

/// A gRPC message: not compressed (0), its length (big-endian u32), then the protobuf encoding.
fn frame(message: &impl Message) -> Bytes {
    let len = message.encoded_len();
    let mut buf = BytesMut::with_capacity(5 + len);
    buf.put_u8(0);
    buf.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    // Cannot fail: the buffer was sized by encoded_len.
    let _ = message.encode(&mut buf);
    buf.freeze()
}

/// The one message of a unary response body.
fn unframe<R: Message + Default>(body: &[u8]) -> Result<R, Error> {
    let bad = |what: &str| Err(Error::Protocol(format!("malformed gRPC response body: {what}")));
    let Some((header, rest)) = body.split_first_chunk::<5>() else {
        return bad("shorter than its 5-byte prefix");
    };
    if header[0] != 0 {
        return bad("compressed, and no compression was asked for");
    }
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if rest.len() != len {
        return bad("its length prefix does not match the body");
    }
    R::decode(rest).map_err(|err| Error::Protocol(format!("cannot decode the response: {err}")))
}

/// The error a `grpc-status` header other than OK stands for (`None` without the header, or for OK).
fn grpc_status(headers: &http::HeaderMap) -> Option<Error> {
    let code = headers.get("grpc-status")?.to_str().ok()?.parse::<i32>().ok()?;
    if code == 0 {
        return None;
    }
    let message = headers
        .get("grpc-message")
        .and_then(|value| value.to_str().ok())
        .map(percent_decode)
        .unwrap_or_default();
    Some(Error::from_status(Status::new(Code::from_i32(code), message)))
}

/// `grpc-message` is percent-encoded (the gRPC HTTP/2 spec); invalid escapes are kept as they are.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        match (bytes[i], bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(high), Some(low)) => {
                out.push(u8::try_from(high * 16 + low).unwrap_or(b'?'));
                i += 3;
            }
            (byte, _, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn counted(expected: usize, results: Vec<pb::KeyResult>) -> Result<Vec<pb::KeyResult>, Error> {
    if results.len() == expected {
        Ok(results)
    } else {
        Err(Error::Protocol(format!("{} results for {expected} keys", results.len())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_survives_framing() {
        let request = pb::GetRequest { keyspace: "users".into(), key: "42".into() };
        let framed = frame(&request);
        assert_eq!(framed[0], 0);
        assert_eq!(unframe::<pb::GetRequest>(&framed).ok(), Some(request));
    }

    #[test]
    fn a_truncated_or_compressed_body_is_a_protocol_error() {
        let framed = frame(&pb::GetRequest { keyspace: "users".into(), key: "42".into() });
        assert!(matches!(unframe::<pb::GetRequest>(&framed[..framed.len() - 1]), Err(Error::Protocol(_))));
        assert!(matches!(unframe::<pb::GetRequest>(&framed[..3]), Err(Error::Protocol(_))));
        let mut compressed = framed.to_vec();
        compressed[0] = 1;
        assert!(matches!(unframe::<pb::GetRequest>(&compressed), Err(Error::Protocol(_))));
    }

    #[test]
    fn statuses_map_like_the_client_library() {
        let mut headers = http::HeaderMap::new();
        assert!(grpc_status(&headers).is_none());
        headers.insert("grpc-status", http::HeaderValue::from_static("0"));
        assert!(grpc_status(&headers).is_none());
        headers.insert("grpc-status", http::HeaderValue::from_static("5"));
        headers.insert("grpc-message", http::HeaderValue::from_static("no%20such%20key"));
        match grpc_status(&headers) {
            Some(Error::NotFound(message)) => assert_eq!(message, "no such key"),
            other => panic!("unexpected {other:?}"),
        }
    }
}
