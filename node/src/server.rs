//! The gRPC services: `distcache.v1.Cache` for applications and `distcache.v1.Peer` for other nodes. Thin
//! adapters: decode, call the engine, encode. The one mapping from engine errors to gRPC statuses lives here.

use std::{pin::Pin, sync::Arc, time::Duration};

use distcache_api::AccessOp;
use distcache_proto::v1::{
    self as pb, DeleteManyRequest, DeleteManyResponse, DeleteRequest, DeleteResponse, GetManyRequest,
    GetManyResponse, GetRequest, GetResponse, HandoffRequest, HandoffResponse, InvalidateRequest,
    InvalidateResponse, KeyResult, KeySpaceInfo, KeySpaceStats, ListKeySpacesRequest, ListKeySpacesResponse,
    LoadRequest, LoadResponse, MemberEvent, PeekRequest, PeekResponse, PingRequest, PingResponse,
    PurgeKeySpaceRequest, PurgeKeySpaceResponse, PurgeRequest, PurgeResponse, PutManyRequest,
    PutManyResponse, PutRequest, PutResponse, RemoveRequest, RemoveResponse, StatsRequest, StatsResponse,
    StoreRequest, StoreResponse, WatchMembersRequest, key_result::Outcome, member_event::Type as EventType,
};
use futures::{Stream, StreamExt};
use tokio_stream::wrappers::{BroadcastStream, errors::BroadcastStreamRecvError};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::{
    batch::Batch,
    engine::Engine,
    error::{Code, EngineError},
    keyspace::Value,
    membership::ChangeKind,
    peer::WriteEntry,
    ring::Member,
    telemetry,
};

impl From<EngineError> for Status {
    fn from(e: EngineError) -> Self {
        let code = match e.code() {
            Code::Ok => tonic::Code::Ok,
            Code::Cancelled => tonic::Code::Cancelled,
            Code::InvalidArgument => tonic::Code::InvalidArgument,
            Code::DeadlineExceeded => tonic::Code::DeadlineExceeded,
            Code::NotFound => tonic::Code::NotFound,
            Code::ResourceExhausted => tonic::Code::ResourceExhausted,
            Code::PermissionDenied => tonic::Code::PermissionDenied,
            Code::FailedPrecondition => tonic::Code::FailedPrecondition,
            Code::Internal => tonic::Code::Internal,
            Code::Unavailable => tonic::Code::Unavailable,
        };
        Status::new(code, e.to_string())
    }
}

fn ttl_to_pb(ttl: Option<Duration>) -> Option<prost_types::Duration> {
    ttl.map(distcache_proto::from_std_duration)
}

fn get_response(v: Value) -> GetResponse {
    GetResponse { value: v.bytes, ttl: ttl_to_pb(v.ttl), stale: v.stale }
}

fn key_error(e: &EngineError) -> Outcome {
    Outcome::Error(pb::KeyError { code: e.code() as i32, message: e.to_string() })
}

fn value_results(keys: Vec<String>, results: Vec<Result<Value, EngineError>>) -> Vec<KeyResult> {
    keys.into_iter()
        .zip(results)
        .map(|(key, r)| KeyResult {
            key,
            outcome: Some(match r {
                Ok(v) => Outcome::Value(get_response(v)),
                Err(e) => key_error(&e),
            }),
        })
        .collect()
}

fn unit_results(keys: Vec<String>, results: Vec<Result<(), EngineError>>) -> Vec<KeyResult> {
    keys.into_iter()
        .zip(results)
        .map(|(key, r)| KeyResult {
            key,
            outcome: Some(match r {
                Ok(()) => Outcome::Ok(pb::Ok {}),
                Err(e) => key_error(&e),
            }),
        })
        .collect()
}

/// A batch-level failure on the peer service becomes a per-key error for every key, so that a non-OK status
/// from a peer always means "could not reach or run", which callers answer by falling back.
fn per_key_failure(keys: &[String], e: &EngineError) -> Vec<KeyResult> {
    keys.iter().map(|k| KeyResult { key: k.clone(), outcome: Some(key_error(e)) }).collect()
}

fn parse_ttl(ttl: Option<&prost_types::Duration>) -> Result<Option<Duration>, EngineError> {
    match ttl {
        None => Ok(None),
        Some(d) => distcache_proto::to_std_duration(d)
            .map(Some)
            .ok_or_else(|| EngineError::InvalidArgument("ttl must not be negative".into())),
    }
}

fn write_entries(entries: Vec<pb::Entry>) -> (Vec<String>, Vec<Result<WriteEntry, EngineError>>) {
    let keys = entries.iter().map(|e| e.key.clone()).collect();
    let parsed = entries
        .into_iter()
        .map(|e| {
            let ttl = parse_ttl(e.ttl.as_ref())?;
            Ok(WriteEntry { key: Arc::from(e.key), value: e.value, ttl })
        })
        .collect();
    (keys, parsed)
}

/// The identities of the caller's client certificate (empty on a plain connection or without a certificate),
/// without allocating: a clone of the connection's list, or nothing.
fn identities<T>(request: &Request<T>) -> Identities {
    Identities(
        request.extensions().get::<distcache_tls::TlsConnectInfo>().map(|info| Arc::clone(&info.identities)),
    )
}

/// See [`identities`].
struct Identities(Option<Arc<[String]>>);

impl std::ops::Deref for Identities {
    type Target = [String];

    fn deref(&self) -> &[String] {
        self.0.as_deref().unwrap_or_default()
    }
}

/// The `Cache` service.
#[derive(Clone)]
pub struct CacheService {
    engine: Arc<Engine>,
}

impl CacheService {
    /// A service over an engine.
    pub fn new(engine: Arc<Engine>) -> Self {
        Self { engine }
    }
}

type MemberStream = Pin<Box<dyn Stream<Item = Result<MemberEvent, Status>> + Send + 'static>>;

fn pb_member(m: &Member, local: &str) -> pb::Member {
    pb::Member { name: m.name.clone(), address: m.address.clone(), local: m.name == local }
}

#[tonic::async_trait]
impl pb::cache_server::Cache for CacheService {
    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let span = if telemetry::sampled(request.metadata()) {
            tracing::info_span!(
                target: telemetry::SPANS,
                "distcache.Cache/Get",
                otel.kind = "server",
                rpc.system = "grpc",
                distcache.keyspace = tracing::field::Empty,
                distcache.key = tracing::field::Empty,
                distcache.outcome = tracing::field::Empty,
                distcache.bytes = tracing::field::Empty,
                otel.status_code = tracing::field::Empty,
            )
        } else {
            tracing::Span::none()
        };
        telemetry::adopt_parent(&span, request.metadata());
        let who = identities(&request);
        let req = request.into_inner();
        if !span.is_none() {
            span.record("distcache.keyspace", req.keyspace.as_str());
            if telemetry::record_keys() {
                span.record("distcache.key", req.key.as_str());
            }
        }
        let answer = async {
            self.engine.authorize(&req.keyspace, "get", AccessOp::Read, &who)?;
            self.engine.get(&req.keyspace, &req.key).await
        }
        .instrument(span.clone())
        .await;
        match &answer {
            Ok(v) => span.record("distcache.bytes", v.bytes.len()),
            Err(EngineError::NotFound) => span.record("distcache.outcome", "not_found"),
            Err(_) => span.record("otel.status_code", "ERROR"),
        };
        Ok(Response::new(get_response(answer?)))
    }

    async fn get_many(&self, request: Request<GetManyRequest>) -> Result<Response<GetManyResponse>, Status> {
        let who = identities(&request);
        let req = request.into_inner();
        self.engine.authorize(&req.keyspace, "get_many", AccessOp::Read, &who)?;
        let results = self.engine.get_many(&req.keyspace, &req.keys).await?;
        Ok(Response::new(GetManyResponse { results: value_results(req.keys, results) }))
    }

    async fn put(&self, request: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let who = identities(&request);
        let req = request.into_inner();
        self.engine.authorize(&req.keyspace, "put", AccessOp::Write, &who)?;
        let ttl = parse_ttl(req.ttl.as_ref())?;
        self.engine.put(&req.keyspace, &req.key, req.value, ttl).await?;
        Ok(Response::new(PutResponse {}))
    }

    async fn put_many(&self, request: Request<PutManyRequest>) -> Result<Response<PutManyResponse>, Status> {
        let who = identities(&request);
        let req = request.into_inner();
        self.engine.authorize(&req.keyspace, "put_many", AccessOp::Write, &who)?;
        let (keys, parsed) = write_entries(req.entries);
        let mut batch = Batch::new(keys.len());
        let (positions, entries): (Vec<usize>, Vec<WriteEntry>) =
            batch.split(parsed, |p| p).into_iter().unzip();
        batch.fill(positions, self.engine.put_many(&req.keyspace, entries).await?);
        let results = batch.finish();
        Ok(Response::new(PutManyResponse { results: unit_results(keys, results) }))
    }

    async fn delete(&self, request: Request<DeleteRequest>) -> Result<Response<DeleteResponse>, Status> {
        let who = identities(&request);
        let req = request.into_inner();
        self.engine.authorize(&req.keyspace, "delete", AccessOp::Write, &who)?;
        self.engine.delete(&req.keyspace, &req.key).await?;
        Ok(Response::new(DeleteResponse {}))
    }

    async fn delete_many(
        &self,
        request: Request<DeleteManyRequest>,
    ) -> Result<Response<DeleteManyResponse>, Status> {
        let who = identities(&request);
        let req = request.into_inner();
        self.engine.authorize(&req.keyspace, "delete_many", AccessOp::Write, &who)?;
        let results = self.engine.delete_many(&req.keyspace, &req.keys).await?;
        Ok(Response::new(DeleteManyResponse { results: unit_results(req.keys, results) }))
    }

    async fn list_key_spaces(
        &self,
        _request: Request<ListKeySpacesRequest>,
    ) -> Result<Response<ListKeySpacesResponse>, Status> {
        let keyspaces = self
            .engine
            .keyspaces()
            .all()
            .iter()
            .map(|ks| KeySpaceInfo {
                name: ks.config.name.clone(),
                max_bytes: ks.config.max_bytes,
                ttl: ttl_to_pb(ks.config.ttl),
                negative_ttl: ttl_to_pb(ks.config.negative_ttl),
                fetch_timeout: ttl_to_pb(Some(ks.config.fetch_timeout)),
                max_value_bytes: ks.config.max_value_bytes,
                read_through: ks.source.is_some(),
            })
            .collect();
        Ok(Response::new(ListKeySpacesResponse { keyspaces }))
    }

    async fn purge_key_space(
        &self,
        request: Request<PurgeKeySpaceRequest>,
    ) -> Result<Response<PurgeKeySpaceResponse>, Status> {
        let who = identities(&request);
        let keyspace = request.into_inner().keyspace;
        self.engine.authorize(&keyspace, "purge", AccessOp::Write, &who)?;
        let nodes = self.engine.purge(&keyspace).await?;
        Ok(Response::new(PurgeKeySpaceResponse { nodes }))
    }

    type WatchMembersStream = MemberStream;

    async fn watch_members(
        &self,
        _request: Request<WatchMembersRequest>,
    ) -> Result<Response<Self::WatchMembersStream>, Status> {
        let membership = Arc::clone(self.engine.membership());
        // Subscribe before taking the snapshot so that no change falls between the two.
        let changes = membership.subscribe();
        let local = membership.local().name.clone();
        let snapshot: Vec<Result<MemberEvent, Status>> = membership
            .ring()
            .members()
            .iter()
            .map(|m| Ok(MemberEvent { r#type: EventType::Join as i32, member: Some(pb_member(m, &local)) }))
            .chain(std::iter::once(Ok(MemberEvent { r#type: EventType::SnapshotEnd as i32, member: None })))
            .collect();
        // A watcher that falls behind by more than the channel holds gets DATA_LOSS and the stream ends: it
        // must watch again for a fresh snapshot rather than go on with a view that missed changes.
        let live = BroadcastStream::new(changes)
            .map(move |change| match change {
                Ok(c) => {
                    let t = match c.kind {
                        ChangeKind::Join => EventType::Join,
                        ChangeKind::Leave => EventType::Leave,
                        ChangeKind::Update => EventType::Update,
                    };
                    Ok(MemberEvent { r#type: t as i32, member: Some(pb_member(&c.member, &local)) })
                }
                Err(BroadcastStreamRecvError::Lagged(n)) => Err(Status::data_loss(format!(
                    "missed {n} membership events; watch again for a fresh snapshot"
                ))),
            })
            .scan(false, |ended, event| {
                let item = (!*ended).then(|| {
                    *ended = event.is_err();
                    event
                });
                futures::future::ready(item)
            });
        let stream = futures::stream::iter(snapshot).chain(live);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn stats(&self, request: Request<StatsRequest>) -> Result<Response<StatsResponse>, Status> {
        let req = request.into_inner();
        let stats = self.engine.stats(Some(&req.keyspace))?;
        Ok(Response::new(StatsResponse {
            node: self.engine.membership().local().name.clone(),
            members: u32::try_from(self.engine.membership().ring().len()).unwrap_or(u32::MAX),
            keyspaces: stats
                .into_iter()
                .map(|s| KeySpaceStats {
                    name: s.name,
                    hits: s.hits,
                    hot_hits: s.hot_hits,
                    misses: s.misses,
                    source_fetches: s.source_fetches,
                    entries: s.entries,
                    bytes: s.bytes,
                    evictions: s.evictions,
                    forwarded: s.forwarded,
                    owner_fallbacks: s.owner_fallbacks,
                    circuit_state: s.circuit_state,
                    stale_served: s.stale_served,
                    rate_limited: s.rate_limited,
                    hot_keys: s
                        .hot_keys
                        .into_iter()
                        .map(|h| distcache_proto::v1::HotKey { key: h.key, hits: h.hits })
                        .collect(),
                    warm_up: s.warm_up.map(|w| distcache_proto::v1::WarmUp {
                        listed: w.listed,
                        owned: w.owned,
                        loaded: w.loaded,
                        present: w.present,
                        failed: w.failed,
                        done: w.done,
                    }),
                })
                .collect(),
        }))
    }
}

/// The caller a `Load` names, if its address is on the host the call came from: the owner later dials that
/// address (invalidations), and a caller must not be able to point it anywhere else. (On the peer port with TLS,
/// the connection is also a mutually authenticated peer.)
fn vetted_caller(name: &str, address: &str, remote: Option<std::net::SocketAddr>) -> Option<Member> {
    if name.is_empty() || address.is_empty() {
        return None;
    }
    let claimed: std::net::SocketAddr = address.parse().ok()?;
    let remote = remote?;
    let same_host = claimed.ip() == remote.ip() || (claimed.ip().is_loopback() && remote.ip().is_loopback());
    if same_host {
        Some(Member::new(name, address))
    } else {
        tracing::debug!(caller = name, claimed = address, %remote, "Load caller's address is not its own; not recorded");
        None
    }
}

/// The `Peer` service.
#[derive(Clone)]
pub struct PeerService {
    engine: Arc<Engine>,
    advertise: String,
}

impl PeerService {
    /// A service over an engine; `advertise` is returned by `Ping`.
    pub fn new(engine: Arc<Engine>, advertise: String) -> Self {
        Self { engine, advertise }
    }

    /// `Load`, inside its span.
    async fn load_traced(&self, request: Request<LoadRequest>) -> Result<Response<LoadResponse>, Status> {
        let remote = request
            .remote_addr()
            .or_else(|| request.extensions().get::<distcache_tls::TlsConnectInfo>().and_then(|i| i.remote));
        let req = request.into_inner();
        let from = vetted_caller(&req.from, &req.from_address, remote);
        let results = match self.engine.load_for_peer(&req.keyspace, &req.keys, from, req.forwarded).await {
            Ok(r) => value_results(req.keys, r),
            Err(e) => per_key_failure(&req.keys, &e),
        };
        Ok(Response::new(LoadResponse { results }))
    }
}

#[tonic::async_trait]
impl pb::peer_server::Peer for PeerService {
    async fn load(&self, request: Request<LoadRequest>) -> Result<Response<LoadResponse>, Status> {
        let span = if telemetry::sampled(request.metadata()) {
            tracing::info_span!(
                target: telemetry::SPANS,
                "distcache.Peer/Load",
                otel.kind = "server",
                rpc.system = "grpc",
                distcache.keyspace = request.get_ref().keyspace.as_str(),
                distcache.keys = request.get_ref().keys.len(),
                distcache.from = request.get_ref().from.as_str(),
            )
        } else {
            tracing::Span::none()
        };
        telemetry::adopt_parent(&span, request.metadata());
        self.load_traced(request).instrument(span).await
    }

    async fn store(&self, request: Request<StoreRequest>) -> Result<Response<StoreResponse>, Status> {
        let req = request.into_inner();
        let (keys, parsed) = write_entries(req.entries);
        let mut batch = Batch::new(keys.len());
        let (positions, entries): (Vec<usize>, Vec<WriteEntry>) =
            batch.split(parsed, |p| p).into_iter().unzip();
        match self.engine.store_for_peer(&req.keyspace, entries, req.forwarded).await {
            Ok(written) => batch.fill(positions, written),
            Err(e) => return Ok(Response::new(StoreResponse { results: per_key_failure(&keys, &e) })),
        }
        let results = batch.finish();
        Ok(Response::new(StoreResponse { results: unit_results(keys, results) }))
    }

    async fn remove(&self, request: Request<RemoveRequest>) -> Result<Response<RemoveResponse>, Status> {
        let req = request.into_inner();
        let results = match self.engine.remove_for_peer(&req.keyspace, &req.keys, req.forwarded).await {
            Ok(r) => unit_results(req.keys, r),
            Err(e) => per_key_failure(&req.keys, &e),
        };
        Ok(Response::new(RemoveResponse { results }))
    }

    async fn invalidate(
        &self,
        request: Request<InvalidateRequest>,
    ) -> Result<Response<InvalidateResponse>, Status> {
        let req = request.into_inner();
        // An unknown keyspace holds no copies: nothing to invalidate is success.
        let _ = self.engine.invalidate(&req.keyspace, &req.keys);
        Ok(Response::new(InvalidateResponse {}))
    }

    async fn purge(&self, request: Request<PurgeRequest>) -> Result<Response<PurgeResponse>, Status> {
        let req = request.into_inner();
        let _ = self.engine.purge_local(&req.keyspace, req.hot_only);
        Ok(Response::new(PurgeResponse {}))
    }

    async fn ping(&self, _request: Request<PingRequest>) -> Result<Response<PingResponse>, Status> {
        Ok(Response::new(PingResponse {
            name: self.engine.membership().local().name.clone(),
            address: self.advertise.clone(),
            leaving: self.engine.is_leaving(),
        }))
    }

    async fn handoff(&self, request: Request<HandoffRequest>) -> Result<Response<HandoffResponse>, Status> {
        let req = request.into_inner();
        let entries = req.entries.into_iter().map(crate::peer::grpc::held_from_pb).collect();
        let reply = self
            .engine
            .accept_handoff(&req.from, &req.keyspace, entries, (req.leaving, req.admitted), req.stale_before)
            .await;
        Ok(Response::new(HandoffResponse { applied: reply.applied, ignored: reply.ignored }))
    }

    async fn peek(&self, request: Request<PeekRequest>) -> Result<Response<PeekResponse>, Status> {
        let req = request.into_inner();
        let keys: Vec<Arc<str>> = req.keys.into_iter().map(Arc::from).collect();
        let held = self.engine.peek(&req.keyspace, &keys);
        let mut response =
            PeekResponse { entries: Vec::with_capacity(keys.len()), held: Vec::with_capacity(keys.len()) };
        for (key, h) in keys.iter().zip(held) {
            let entry = h.as_ref().and_then(|h| crate::peer::grpc::held_to_pb(key, h));
            response.held.push(entry.is_some());
            response.entries.push(entry.unwrap_or_default());
        }
        Ok(Response::new(response))
    }
}
