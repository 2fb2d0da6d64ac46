//! [`PeerTransport`] over the `distcache.v1.Peer` gRPC service: one lazily connected HTTP/2 channel per peer
//! address (tonic reconnects it after failures). Every call carries its own deadline (a connect timeout bounds
//! dialling a dead peer), so a dead peer costs at most the deadline, never a hang. With TLS, each new connection
//! authenticates with the node's current certificate and checks the peer's (mutual TLS, `distcache-tls`).

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use dashmap::DashMap;
use distcache_proto::v1::{
    self as pb, HandoffRequest, InvalidateRequest, LoadRequest, PeekRequest, PingRequest, PurgeRequest,
    RemoveRequest, StoreRequest, key_result::Outcome, peer_client::PeerClient,
};
use tonic::transport::{Channel, Endpoint};

use super::{HandoffBatch, HandoffReply, KeyResults, PeerError, PeerTransport, Pong, WriteEntry, key_names};
use crate::{
    error::EngineError,
    keyspace::Value,
    ring::Member,
    store::{Entry, Held},
};

/// What a node holds for a key, as the Peer service carries it. Cached NOT_FOUNDs do not move (`None`).
pub fn held_to_pb(key: &str, held: &Held) -> Option<pb::HandoffEntry> {
    match held {
        Held::Entry(e) => Some(pb::HandoffEntry {
            key: key.to_owned(),
            value: e.value.clone()?,
            ttl: e.ttl_left().map(distcache_proto::from_std_duration),
            version: e.version,
            deleted: false,
        }),
        Held::Deleted(v) => Some(pb::HandoffEntry {
            key: key.to_owned(),
            value: bytes::Bytes::new(),
            ttl: None,
            version: *v,
            deleted: true,
        }),
    }
}

/// The key and what the sender holds for it; an entry whose remaining TTL is zero has expired on the way.
pub fn held_from_pb(e: pb::HandoffEntry) -> (Arc<str>, Option<Held>) {
    let key: Arc<str> = Arc::from(e.key);
    if e.deleted {
        return (key, Some(Held::Deleted(e.version)));
    }
    let ttl = e.ttl.as_ref().and_then(distcache_proto::to_std_duration);
    if ttl.is_some_and(|t| t.is_zero()) {
        return (key, None);
    }
    (key, Some(Held::Entry(Entry::value(e.value, ttl).versioned(e.version))))
}

/// Deadline of a previous-owner read (`Peek`).
const PEEK_TIMEOUT: Duration = Duration::from_millis(500);

/// gRPC peer client pool.
pub struct GrpcPeers {
    local: String,
    local_address: String,
    timeout: Duration,
    connect_timeout: Duration,
    max_message_bytes: usize,
    tls: Option<Arc<distcache_tls::Tls>>,
    channels: DashMap<String, PeerClient<Channel>>,
}

impl GrpcPeers {
    /// A pool for the node named `local`; `timeout` bounds every peer call (forwarded writes get twice as long).
    pub fn new(local: &Member, timeout: Duration, max_message_bytes: usize) -> Self {
        Self::with_tls(local, timeout, max_message_bytes, None)
    }

    /// A pool that dials peers over mutual TLS with `tls`'s current material (plain without).
    pub fn with_tls(
        local: &Member,
        timeout: Duration,
        max_message_bytes: usize,
        tls: Option<Arc<distcache_tls::Tls>>,
    ) -> Self {
        Self {
            tls,
            local: local.name.clone(),
            local_address: local.address.clone(),
            timeout,
            connect_timeout: timeout.min(Duration::from_secs(1)),
            max_message_bytes,
            channels: DashMap::new(),
        }
    }

    fn client(&self, address: &str) -> Result<PeerClient<Channel>, PeerError> {
        if let Some(c) = self.channels.get(address) {
            return Ok(c.clone());
        }
        let endpoint = Endpoint::from_shared(format!("http://{address}"))
            .map_err(|e| PeerError {
                name: address.into(),
                address: address.into(),
                message: e.to_string(),
                timed_out: false,
            })?
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5));
        let channel = match &self.tls {
            None => endpoint.connect_lazy(),
            Some(tls) => {
                let tls = Arc::clone(tls);
                let config: distcache_tls::connect::ConfigSource =
                    Arc::new(move || Arc::clone(&tls.current().peer_client));
                endpoint.connect_with_connector_lazy(distcache_tls::Connector::new(
                    config,
                    None,
                    self.connect_timeout,
                ))
            }
        };
        let client = PeerClient::new(channel)
            .max_decoding_message_size(self.max_message_bytes)
            .max_encoding_message_size(self.max_message_bytes);
        self.channels.insert(address.to_owned(), client.clone());
        Ok(client)
    }

    fn fail(peer: &Member, status: &tonic::Status) -> PeerError {
        // A client-side deadline surfaces as CANCELLED ("Timeout expired") or DEADLINE_EXCEEDED.
        let timed_out = matches!(status.code(), tonic::Code::DeadlineExceeded | tonic::Code::Cancelled);
        PeerError {
            name: peer.name.clone(),
            address: peer.address.clone(),
            message: status.message().to_owned(),
            timed_out,
        }
    }

    fn mismatch(peer: &Member, got: usize, want: usize) -> PeerError {
        PeerError {
            name: peer.name.clone(),
            address: peer.address.clone(),
            message: format!("answered {got} results for {want} keys"),
            timed_out: false,
        }
    }
}

/// A call to a peer: its deadline, and the caller's trace (W3C `traceparent`) when it is traced.
fn request<T>(message: T, timeout: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.set_timeout(timeout);
    crate::telemetry::inject_metadata(r.metadata_mut());
    r
}

fn unit_results(peer: &Member, n: usize, results: Vec<pb::KeyResult>) -> Result<KeyResults<()>, PeerError> {
    if results.len() != n {
        return Err(GrpcPeers::mismatch(peer, results.len(), n));
    }
    Ok(results
        .into_iter()
        .map(|r| match r.outcome {
            Some(Outcome::Error(e)) => Err(EngineError::from_code(e.code, e.message)),
            _ => Ok(()),
        })
        .collect())
}

/// Converts a per-key result of a peer into the engine's form.
pub fn value_result(r: pb::KeyResult) -> Result<Value, EngineError> {
    match r.outcome {
        Some(Outcome::Value(v)) => Ok(Value {
            bytes: v.value,
            ttl: v.ttl.as_ref().and_then(distcache_proto::to_std_duration),
            stale: v.stale,
        }),
        Some(Outcome::Error(e)) => Err(EngineError::from_code(e.code, e.message)),
        Some(Outcome::Ok(_)) | None => Err(EngineError::Internal("peer answered without a value".into())),
    }
}

#[async_trait]
impl PeerTransport for GrpcPeers {
    async fn load(
        &self,
        peer: &Member,
        keyspace: &str,
        keys: Vec<Arc<str>>,
        timeout: Duration,
        forwarded: bool,
    ) -> Result<KeyResults<Value>, PeerError> {
        let n = keys.len();
        let req = LoadRequest {
            keyspace: keyspace.to_owned(),
            keys: key_names(&keys),
            from: self.local.clone(),
            from_address: self.local_address.clone(),
            forwarded,
        };
        let resp = self
            .client(&peer.address)?
            .load(request(req, timeout))
            .await
            .map_err(|s| Self::fail(peer, &s))?
            .into_inner();
        if resp.results.len() != n {
            return Err(Self::mismatch(peer, resp.results.len(), n));
        }
        Ok(resp.results.into_iter().map(value_result).collect())
    }

    async fn store(
        &self,
        peer: &Member,
        keyspace: &str,
        entries: Vec<WriteEntry>,
        forwarded: bool,
    ) -> Result<KeyResults<()>, PeerError> {
        let n = entries.len();
        let req = StoreRequest {
            keyspace: keyspace.to_owned(),
            entries: entries
                .into_iter()
                .map(|e| pb::Entry {
                    key: e.key.to_string(),
                    value: e.value,
                    ttl: e.ttl.map(distcache_proto::from_std_duration),
                })
                .collect(),
            from: self.local.clone(),
            forwarded,
        };
        let resp = self
            .client(&peer.address)?
            .store(request(req, self.timeout * 2))
            .await
            .map_err(|s| Self::fail(peer, &s))?
            .into_inner();
        unit_results(peer, n, resp.results)
    }

    async fn remove(
        &self,
        peer: &Member,
        keyspace: &str,
        keys: Vec<Arc<str>>,
        forwarded: bool,
    ) -> Result<KeyResults<()>, PeerError> {
        let n = keys.len();
        let req = RemoveRequest {
            keyspace: keyspace.to_owned(),
            keys: key_names(&keys),
            from: self.local.clone(),
            forwarded,
        };
        let resp = self
            .client(&peer.address)?
            .remove(request(req, self.timeout * 2))
            .await
            .map_err(|s| Self::fail(peer, &s))?
            .into_inner();
        unit_results(peer, n, resp.results)
    }

    async fn invalidate(&self, peer: &Member, keyspace: &str, keys: Vec<Arc<str>>) -> Result<(), PeerError> {
        let req = InvalidateRequest {
            keyspace: keyspace.to_owned(),
            keys: key_names(&keys),
            from: self.local.clone(),
        };
        self.client(&peer.address)?
            .invalidate(request(req, self.timeout))
            .await
            .map_err(|s| Self::fail(peer, &s))?;
        Ok(())
    }

    async fn purge(&self, peer: &Member, keyspace: &str, hot_only: bool) -> Result<(), PeerError> {
        let req = PurgeRequest { keyspace: keyspace.to_owned(), from: self.local.clone(), hot_only };
        self.client(&peer.address)?
            .purge(request(req, self.timeout))
            .await
            .map_err(|s| Self::fail(peer, &s))?;
        Ok(())
    }

    async fn handoff(&self, peer: &Member, batch: HandoffBatch) -> Result<HandoffReply, PeerError> {
        let req = HandoffRequest {
            from: self.local.clone(),
            keyspace: batch.keyspace,
            entries: batch.entries.iter().filter_map(|(k, h)| held_to_pb(k, h)).collect(),
            leaving: batch.leaving,
            admitted: batch.admitted,
            stale_before: batch.stale_before,
        };
        let resp = self
            .client(&peer.address)?
            .handoff(request(req, self.timeout * 2))
            .await
            .map_err(|s| Self::fail(peer, &s))?
            .into_inner();
        Ok(HandoffReply { applied: resp.applied, ignored: resp.ignored })
    }

    async fn peek(
        &self,
        peer: &Member,
        keyspace: &str,
        keys: Vec<Arc<str>>,
    ) -> Result<Vec<Option<Held>>, PeerError> {
        let n = keys.len();
        let req =
            PeekRequest { keyspace: keyspace.to_owned(), keys: key_names(&keys), from: self.local.clone() };
        // From memory on the other side: a short deadline, so a previous owner that crashed or is cut off costs a
        // reader little (it is not asked again).
        let resp = self
            .client(&peer.address)?
            .peek(request(req, self.timeout.min(PEEK_TIMEOUT)))
            .await
            .map_err(|s| Self::fail(peer, &s))?
            .into_inner();
        if resp.entries.len() != n || resp.held.len() != n {
            return Err(Self::mismatch(peer, resp.entries.len(), n));
        }
        Ok(resp
            .entries
            .into_iter()
            .zip(resp.held)
            .map(|(e, held)| if held { held_from_pb(e).1 } else { None })
            .collect())
    }

    async fn ping(&self, address: &str) -> Result<Pong, PeerError> {
        let unknown = Member::new(address, address);
        let resp = self
            .client(address)?
            .ping(request(PingRequest { from: self.local.clone() }, self.timeout))
            .await
            .map_err(|s| Self::fail(&unknown, &s))?
            .into_inner();
        Ok(Pong { member: Member::new(resp.name, resp.address), leaving: resp.leaving })
    }

    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn retain_addresses(&self, keep: &std::collections::HashSet<String>) {
        self.channels.retain(|address, _| keep.contains(address));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connections_of_addresses_that_left_are_dropped() {
        let peers = GrpcPeers::new(&Member::new("a", "127.0.0.1:1"), Duration::from_secs(1), 1 << 20);
        for address in ["127.0.0.1:2", "127.0.0.1:3", "127.0.0.1:4"] {
            peers.client(address).expect("a lazy channel");
        }
        let keep = ["127.0.0.1:3".to_owned()].into_iter().collect();
        peers.retain_addresses(&keep);
        assert_eq!(peers.channels.len(), 1);
        assert!(peers.channels.contains_key("127.0.0.1:3"));
    }
}
