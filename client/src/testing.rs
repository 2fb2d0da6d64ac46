//! An in-process fake of the `distcache.v1.Cache` service, so the client and the bench loop are tested over real
//! gRPC without a node. It serves one keyspace, `users`, with a few scripted behaviours:
//! key `slow` answers after 2 s (deadlines), key `bad` is rejected per key (`INVALID_ARGUMENT`), any other
//! keyspace is `FAILED_PRECONDITION`, and `WatchMembers` sends a two-member snapshot then stays open.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use distcache_proto::v1::{self as pb, cache_server, key_result::Outcome, member_event::Type};
use futures::{StreamExt, stream::BoxStream};
use tonic::{Request, Response, Status};

pub(crate) const KEYSPACE: &str = "users";

#[derive(Default)]
pub(crate) struct FakeCache {
    entries: Mutex<HashMap<String, Bytes>>,
    /// Calls served, to check that work reaches the server.
    pub(crate) calls: AtomicU64,
}

impl FakeCache {
    fn check_keyspace(&self, keyspace: &str) -> Result<(), Status> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if keyspace == KEYSPACE {
            Ok(())
        } else {
            Err(Status::failed_precondition(format!("unknown keyspace {keyspace:?}")))
        }
    }

    fn lookup(&self, key: &str) -> Option<Bytes> {
        self.entries.lock().expect("test lock").get(key).cloned()
    }

    fn store(&self, key: String, value: Bytes) -> Result<(), Status> {
        if key == "bad" {
            return Err(Status::invalid_argument("key \"bad\" is not allowed"));
        }
        self.entries.lock().expect("test lock").insert(key, value);
        Ok(())
    }
}

fn key_result(key: String, result: Result<Outcome, Status>) -> pb::KeyResult {
    let outcome = result.unwrap_or_else(|status| {
        Outcome::Error(pb::KeyError { code: status.code() as i32, message: status.message().to_owned() })
    });
    pb::KeyResult { key, outcome: Some(outcome) }
}

fn member_event(kind: Type, name: &str, local: bool) -> pb::MemberEvent {
    let member = pb::Member { name: name.to_owned(), address: format!("{name}:7420"), local };
    pb::MemberEvent { r#type: kind as i32, member: Some(member) }
}

#[tonic::async_trait]
impl cache_server::Cache for FakeCache {
    async fn get(&self, request: Request<pb::GetRequest>) -> Result<Response<pb::GetResponse>, Status> {
        let request = request.into_inner();
        self.check_keyspace(&request.keyspace)?;
        if request.key == "slow" {
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        let value = self.lookup(&request.key).ok_or_else(|| Status::not_found("no such key"))?;
        let ttl = Some(distcache_proto::from_std_duration(Duration::from_mins(1)));
        Ok(Response::new(pb::GetResponse { value, ttl, stale: false }))
    }

    async fn get_many(
        &self,
        request: Request<pb::GetManyRequest>,
    ) -> Result<Response<pb::GetManyResponse>, Status> {
        let request = request.into_inner();
        self.check_keyspace(&request.keyspace)?;
        let results = request
            .keys
            .into_iter()
            .map(|key| {
                let found = self
                    .lookup(&key)
                    .map(|value| Outcome::Value(pb::GetResponse { value, ttl: None, stale: false }));
                key_result(key, found.ok_or_else(|| Status::not_found("no such key")))
            })
            .collect();
        Ok(Response::new(pb::GetManyResponse { results }))
    }

    async fn put(&self, request: Request<pb::PutRequest>) -> Result<Response<pb::PutResponse>, Status> {
        let request = request.into_inner();
        self.check_keyspace(&request.keyspace)?;
        self.store(request.key, request.value)?;
        Ok(Response::new(pb::PutResponse {}))
    }

    async fn put_many(
        &self,
        request: Request<pb::PutManyRequest>,
    ) -> Result<Response<pb::PutManyResponse>, Status> {
        let request = request.into_inner();
        self.check_keyspace(&request.keyspace)?;
        let results = request
            .entries
            .into_iter()
            .map(|entry| {
                let stored = self.store(entry.key.clone(), entry.value).map(|()| Outcome::Ok(pb::Ok {}));
                key_result(entry.key, stored)
            })
            .collect();
        Ok(Response::new(pb::PutManyResponse { results }))
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let request = request.into_inner();
        self.check_keyspace(&request.keyspace)?;
        self.entries.lock().expect("test lock").remove(&request.key);
        Ok(Response::new(pb::DeleteResponse {}))
    }

    async fn delete_many(
        &self,
        request: Request<pb::DeleteManyRequest>,
    ) -> Result<Response<pb::DeleteManyResponse>, Status> {
        let request = request.into_inner();
        self.check_keyspace(&request.keyspace)?;
        let mut entries = self.entries.lock().expect("test lock");
        let results = request
            .keys
            .into_iter()
            .map(|key| {
                entries.remove(&key);
                key_result(key, Ok(Outcome::Ok(pb::Ok {})))
            })
            .collect();
        Ok(Response::new(pb::DeleteManyResponse { results }))
    }

    async fn list_key_spaces(
        &self,
        _: Request<pb::ListKeySpacesRequest>,
    ) -> Result<Response<pb::ListKeySpacesResponse>, Status> {
        let info = pb::KeySpaceInfo {
            name: KEYSPACE.to_owned(),
            max_bytes: 64 << 20,
            ttl: Some(distcache_proto::from_std_duration(Duration::from_mins(5))),
            negative_ttl: None,
            fetch_timeout: Some(distcache_proto::from_std_duration(Duration::from_secs(2))),
            max_value_bytes: 8 << 20,
            read_through: true,
        };
        Ok(Response::new(pb::ListKeySpacesResponse { keyspaces: vec![info] }))
    }

    async fn purge_key_space(
        &self,
        request: Request<pb::PurgeKeySpaceRequest>,
    ) -> Result<Response<pb::PurgeKeySpaceResponse>, Status> {
        self.check_keyspace(&request.into_inner().keyspace)?;
        self.entries.lock().expect("test lock").clear();
        Ok(Response::new(pb::PurgeKeySpaceResponse { nodes: 3 }))
    }

    type WatchMembersStream = BoxStream<'static, Result<pb::MemberEvent, Status>>;

    async fn watch_members(
        &self,
        _: Request<pb::WatchMembersRequest>,
    ) -> Result<Response<Self::WatchMembersStream>, Status> {
        let events = vec![
            member_event(Type::Join, "node-1", true),
            member_event(Type::Join, "node-2", false),
            pb::MemberEvent { r#type: Type::SnapshotEnd as i32, member: None },
            member_event(Type::Leave, "node-2", false),
        ];
        let events = futures::stream::iter(events.into_iter().map(Ok));
        Ok(Response::new(events.chain(futures::stream::pending()).boxed()))
    }

    async fn stats(&self, request: Request<pb::StatsRequest>) -> Result<Response<pb::StatsResponse>, Status> {
        let request = request.into_inner();
        let stats = pb::KeySpaceStats { name: KEYSPACE.to_owned(), hits: 7, ..Default::default() };
        let keyspaces =
            if request.keyspace.is_empty() || request.keyspace == KEYSPACE { vec![stats] } else { vec![] };
        Ok(Response::new(pb::StatsResponse { node: "node-1".to_owned(), keyspaces, members: 2 }))
    }
}

/// Serves a fresh fake on a free loopback port; returns its address and state. The server lives as long as the
/// test's runtime.
pub(crate) async fn serve() -> (SocketAddr, std::sync::Arc<FakeCache>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
    let addr = listener.local_addr().expect("bound address");
    let fake = std::sync::Arc::new(FakeCache::default());
    let service = cache_server::CacheServer::from_arc(std::sync::Arc::clone(&fake));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (addr, fake)
}

/// Serves a fresh fake over TLS, the way a node serves its client port: the certificate, key and CA bundle of
/// `settings`, client certificates as `settings.client_auth` says.
pub(crate) async fn serve_tls(
    settings: distcache_tls::TlsSettings,
) -> (SocketAddr, std::sync::Arc<FakeCache>) {
    let tls = std::sync::Arc::new(distcache_tls::Tls::load(settings).expect("test TLS material loads"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
    let addr = listener.local_addr().expect("bound address");
    let fake = std::sync::Arc::new(FakeCache::default());
    let service = cache_server::CacheServer::from_arc(std::sync::Arc::clone(&fake));
    let accepted = distcache_tls::accept_loop(listener, move || tls.current().client_port.clone(), "client");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(distcache_tls::incoming(accepted)),
    );
    (addr, fake)
}
