//! [`Client`]: one cheap, cloneable handle to a `DistCache` cluster over one or more HTTP/2 connections.

use std::{
    fmt,
    path::PathBuf,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::Bytes;
use distcache_proto::{
    from_std_duration, to_std_duration,
    v1::{self as pb, cache_client::CacheClient, key_result::Outcome},
};
use futures::{Stream, StreamExt};
use tonic::{
    Code,
    transport::{Channel, Endpoint},
};

use crate::{
    Error,
    tls::{Target, TlsOptions},
};

/// The endpoint the CLI and examples use when none is given: a node on this machine, default gRPC port.
pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:7420";

/// How long [`ClientBuilder::connect`] waits for a TCP connection (and then for the node's first answer) unless
/// told otherwise.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest response the client decodes. tonic's default (4 MiB) is below the server's default largest value
/// (8 MiB), and a `GetMany` answer carries many values, so the limit is raised well past both.
const MAX_RESPONSE_BYTES: usize = 1 << 30;

/// A value read from the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Value {
    /// The bytes exactly as stored (or as the keyspace's data source returned them).
    pub value: Bytes,
    /// Time left before the entry expires; `None` when it does not expire (zero for a stale value).
    pub ttl: Option<Duration>,
    /// True when the value has expired and the node answered it anyway: within the keyspace's
    /// `staleWhileRevalidate` window while a background fetch refreshes it, or within its `staleIfError` window
    /// because the data source failed, its circuit breaker is open or its fetch rate limit was reached.
    pub stale: bool,
}

impl From<pb::GetResponse> for Value {
    fn from(response: pb::GetResponse) -> Self {
        Self {
            value: response.value,
            ttl: response.ttl.as_ref().and_then(to_std_duration),
            stale: response.stale,
        }
    }
}

/// A keyspace as the node applies it (from `ListKeySpaces`), so tools can show effective settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyspaceInfo {
    /// Keyspace name, the first argument of every key operation.
    pub name: String,
    /// Byte budget of the keyspace on each node.
    pub max_bytes: u64,
    /// Default entry TTL; `None` = entries do not expire.
    pub ttl: Option<Duration>,
    /// How long a `NOT_FOUND` from the data source is cached; `None` = not cached.
    pub negative_ttl: Option<Duration>,
    /// Deadline for one fetch from the data source.
    pub fetch_timeout: Option<Duration>,
    /// Largest value `put` accepts.
    pub max_value_bytes: u64,
    /// True when a data source backs the keyspace (read-through); false for a pure cache-aside keyspace.
    pub read_through: bool,
}

impl From<pb::KeySpaceInfo> for KeyspaceInfo {
    fn from(info: pb::KeySpaceInfo) -> Self {
        Self {
            name: info.name,
            max_bytes: info.max_bytes,
            ttl: info.ttl.as_ref().and_then(to_std_duration),
            negative_ttl: info.negative_ttl.as_ref().and_then(to_std_duration),
            fetch_timeout: info.fetch_timeout.as_ref().and_then(to_std_duration),
            max_value_bytes: info.max_value_bytes,
            read_through: info.read_through,
        }
    }
}

/// Counters of one node (not cluster-wide), from `Stats`: what `distcache stats` shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stats {
    /// Name of the node that answered.
    pub node: String,
    /// Members of the ring as this node sees them.
    pub members: u32,
    /// One entry per keyspace (or just the one asked for).
    pub keyspaces: Vec<KeyspaceStats>,
}

/// Counters of one keyspace on one node since the node started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyspaceStats {
    /// Keyspace name.
    pub name: String,
    /// Hits in the owner's main cache.
    pub hits: u64,
    /// Hits in this node's hot cache (copies of keys owned by other nodes).
    pub hot_hits: u64,
    /// Misses in the cache tier that was asked.
    pub misses: u64,
    /// Calls to the data source made by this node.
    pub source_fetches: u64,
    /// Entries held now (main + hot).
    pub entries: u64,
    /// Bytes held now (main + hot), as weighed against `max_bytes`.
    pub bytes: u64,
    /// Entries evicted to stay within `max_bytes`.
    pub evictions: u64,
    /// Requests forwarded to the owner of the key.
    pub forwarded: u64,
    /// Loads this node did itself because the owner could not be reached.
    pub owner_fallbacks: u64,
    /// State of the data source's circuit breaker on this node: `closed`, `open` or `half_open`; empty when the
    /// keyspace has no `circuitBreaker`.
    pub circuit_state: String,
    /// Expired values answered stale (stale-while-revalidate and stale-if-error).
    pub stale_served: u64,
    /// Fetches refused by the keyspace's `rateLimit`.
    pub rate_limited: u64,
    /// The keys this node served most often recently, hottest first: an estimate (a count-min sketch with a
    /// top-K, counts halving as time passes), for this node only.
    pub hot_keys: Vec<HotKey>,
    /// Progress of the keyspace's warm-up on this node; `None` when the keyspace has no `warmUp`.
    pub warm_up: Option<WarmUp>,
}

/// A frequently read key and its estimated recent reads on one node (see [`KeyspaceStats::hot_keys`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HotKey {
    /// The key.
    pub key: String,
    /// Estimated recent reads (not an exact count: the estimate halves as time passes).
    pub hits: u64,
}

/// Warm-up progress of one keyspace on one node: the listed keys it owns are loaded at the warm-up rate after
/// the node starts and after ownership moves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WarmUp {
    /// Keys listed in the keyspace's `warmUp.keys`.
    pub listed: u32,
    /// Of those, the keys this node owns now.
    pub owned: u32,
    /// Loaded from the data source (or a previous owner) by the warm-up.
    pub loaded: u32,
    /// Already in memory when the warm-up reached them.
    pub present: u32,
    /// Whose load failed (they are loaded on first read instead).
    pub failed: u32,
    /// True when the last warm-up pass has finished.
    pub done: bool,
}

impl From<pb::HotKey> for HotKey {
    fn from(h: pb::HotKey) -> Self {
        Self { key: h.key, hits: h.hits }
    }
}

impl From<pb::WarmUp> for WarmUp {
    fn from(w: pb::WarmUp) -> Self {
        Self {
            listed: w.listed,
            owned: w.owned,
            loaded: w.loaded,
            present: w.present,
            failed: w.failed,
            done: w.done,
        }
    }
}

impl From<pb::KeySpaceStats> for KeyspaceStats {
    fn from(s: pb::KeySpaceStats) -> Self {
        Self {
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
            hot_keys: s.hot_keys.into_iter().map(HotKey::from).collect(),
            warm_up: s.warm_up.map(WarmUp::from),
        }
    }
}

/// A member of the cluster, as seen by the node that answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Unique member name (the pod name in Kubernetes).
    pub name: String,
    /// Address peers dial: `host:port` of the member's gRPC listener.
    pub address: String,
    /// True for the node that serves the stream.
    pub local: bool,
}

impl From<pb::Member> for Member {
    fn from(m: pb::Member) -> Self {
        Self { name: m.name, address: m.address, local: m.local }
    }
}

/// One membership change from [`Client::watch_members`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberEvent {
    /// The member joined the ring, or was already in it when the stream started (snapshot).
    Join(Member),
    /// The member left the ring.
    Leave(Member),
    /// The member is still in the ring but its address changed.
    Update(Member),
    /// The initial snapshot is complete; every later event is a live change.
    SnapshotEnd,
}

impl MemberEvent {
    /// Decodes a wire event. Unknown event types (from a newer server) give `Ok(None)` so old clients skip them.
    fn from_proto(event: pb::MemberEvent) -> Result<Option<Self>, Error> {
        use pb::member_event::Type;
        let Ok(kind) = Type::try_from(event.r#type) else {
            return Ok(None);
        };
        let member = move || {
            event.member.map(Member::from).ok_or_else(|| {
                Error::Protocol(format!("member event {} without a member", kind.as_str_name()))
            })
        };
        Ok(match kind {
            Type::Unspecified => None,
            Type::Join => Some(Self::Join(member()?)),
            Type::Leave => Some(Self::Leave(member()?)),
            Type::Update => Some(Self::Update(member()?)),
            Type::SnapshotEnd => Some(Self::SnapshotEnd),
        })
    }
}

/// The stream returned by [`Client::watch_members`]: live membership events until it is dropped (which cancels
/// the call) or the server ends it.
pub struct MemberEvents {
    inner: tonic::Streaming<pb::MemberEvent>,
}

impl fmt::Debug for MemberEvents {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemberEvents").finish_non_exhaustive()
    }
}

impl Stream for MemberEvents {
    type Item = Result<MemberEvent, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            match ready!(Pin::new(&mut self.inner).poll_next(cx)) {
                None => return Poll::Ready(None),
                Some(Err(status)) => return Poll::Ready(Some(Err(Error::from_status(status)))),
                Some(Ok(event)) => {
                    if let Some(event) = MemberEvent::from_proto(event).transpose() {
                        return Poll::Ready(Some(event));
                    }
                }
            }
        }
    }
}

/// Options for opening a [`Client`]; start from [`Client::builder`].
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    endpoint: String,
    connections: usize,
    timeout: Option<Duration>,
    connect_timeout: Duration,
    tls: TlsOptions,
}

impl ClientBuilder {
    /// Number of HTTP/2 connections to open (at least 1). One connection multiplexes many concurrent calls, but
    /// a single TCP stream and the one task driving it become the bottleneck under heavy load; a few connections
    /// spread that work.
    #[must_use]
    pub fn connections(mut self, connections: usize) -> Self {
        self.connections = connections.max(1);
        self
    }

    /// Deadline of every unary call (sent to the server as `grpc-timeout` and enforced locally); an expired
    /// deadline is [`Error::DeadlineExceeded`]. Not applied to the long-lived [`Client::watch_members`] stream.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// How long to wait for each TCP connection (with its TLS handshake), and then for the node's answer to the
    /// first call; default [`DEFAULT_CONNECT_TIMEOUT`].
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// PEM bundle of the CA certificates the server's certificate must chain to. Required for an `https://`
    /// endpoint (there are no built-in roots: a cluster's certificates come from its own CA); an error with an
    /// `http://` one.
    #[must_use]
    pub fn tls_ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.tls.ca_file = Some(path.into());
        self
    }

    /// PEM file of the client certificate (then any intermediates), for nodes that ask clients for one
    /// (`clientAuth: optional|required`). Needs [`ClientBuilder::tls_key_file`] too.
    #[must_use]
    pub fn tls_cert_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.tls.cert_file = Some(path.into());
        self
    }

    /// PEM file of the client certificate's private key (PKCS#8, PKCS#1 or SEC1).
    #[must_use]
    pub fn tls_key_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.tls.key_file = Some(path.into());
        self
    }

    /// The name the server's certificate must be valid for, instead of the endpoint's host: for a node dialled
    /// by an address its certificate does not carry (a port-forward, a load balancer's IP).
    #[must_use]
    pub fn tls_server_name(mut self, name: impl Into<String>) -> Self {
        self.tls.server_name = Some(name.into());
        self
    }

    /// Opens the connections now and makes one call (`ListKeySpaces`) on the first, so an unreachable endpoint,
    /// a TLS failure or a node that does not answer fails here with [`Error::Connect`], [`Error::Tls`] or
    /// [`Error::Unavailable`] rather than on the first call. Options that cannot work fail with
    /// [`Error::Config`] before anything is sent. Broken connections are re-established by tonic on later calls.
    ///
    /// The call is needed for TLS 1.3: a server that requires a client certificate accepts the handshake and
    /// sends its refusal (`certificate_required`) right after it, so only a first request sees it.
    pub async fn connect(self) -> Result<Client, Error> {
        let target = Target::resolve(&self.endpoint, &self.tls)?;
        let connect_error = |source| Error::Connect { endpoint: target.endpoint.clone(), source };
        let endpoint = Endpoint::from_shared(target.dial.clone())
            .map_err(connect_error)?
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true);
        // Separate `connect` calls give separate connections; `Channel::balance_list` would not reliably keep
        // N connections to one identical address.
        let dial = |_| async {
            match &target.tls {
                Some(tls) => {
                    endpoint.connect_with_connector(Target::connector(tls, self.connect_timeout)).await
                }
                None => endpoint.connect().await,
            }
        };
        let channels = match futures::future::try_join_all((0..self.connections).map(dial)).await {
            Ok(channels) => channels,
            Err(err) => return Err(target.explain(&err, true).unwrap_or_else(|| connect_error(err))),
        };
        let client = Client::with_channels(channels, self.timeout, Some(target));
        client.probe(self.connect_timeout).await?;
        Ok(client)
    }
}

/// A handle to a `DistCache` cluster: typed calls to the `distcache.v1.Cache` service of one node, which routes
/// every key to its owner.
///
/// Cloning is cheap (an `Arc`) and clones share the connections, so one `Client` per process is the intended
/// use. With several connections ([`Client::connect_many`]) calls are spread over them round-robin.
///
/// ```no_run
/// use std::time::Duration;
///
/// # async fn demo() -> Result<(), distcache_client::Error> {
/// let client = distcache_client::Client::connect("127.0.0.1:7420").await?;
/// client.put("users", "42", "alice", Some(Duration::from_mins(5))).await?;
/// match client.get("users", "42").await? {
///     Some(found) => println!("{}", String::from_utf8_lossy(&found.value)),
///     None => println!("no such user"),
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    clients: Box<[CacheClient<Channel>]>,
    next: AtomicUsize,
    timeout: Option<Duration>,
    /// The endpoint connected to, to explain TLS failures of later calls (none for [`Client::from_channel`]).
    target: Option<Target>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("connections", &self.inner.clients.len())
            .field("timeout", &self.inner.timeout)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Starts configuring a client for `endpoint`: connections, timeouts, TLS. `https://host:port` is TLS (give
    /// the CA bundle with [`ClientBuilder::tls_ca_file`]); `http://host:port` and `host:port` are plain.
    pub fn builder(endpoint: impl AsRef<str>) -> ClientBuilder {
        ClientBuilder {
            endpoint: endpoint.as_ref().to_owned(),
            connections: 1,
            timeout: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            tls: TlsOptions::default(),
        }
    }

    /// Connects to one node over a single plain HTTP/2 connection, enough for most applications.
    /// `endpoint` is `http://host:port` or just `host:port`; for TLS use [`Client::builder`].
    pub async fn connect(endpoint: impl AsRef<str>) -> Result<Self, Error> {
        Self::builder(endpoint).connect().await
    }

    /// Connects with `connections` separate HTTP/2 connections to the same endpoint and spreads calls over them
    /// round-robin — for load generators and very busy clients.
    pub async fn connect_many(endpoint: impl AsRef<str>, connections: usize) -> Result<Self, Error> {
        Self::builder(endpoint).connections(connections).connect().await
    }

    /// Wraps a channel configured elsewhere (TLS, custom connector, a balanced channel over several nodes).
    pub fn from_channel(channel: Channel) -> Self {
        Self::with_channels(vec![channel], None, None)
    }

    fn with_channels(channels: Vec<Channel>, timeout: Option<Duration>, target: Option<Target>) -> Self {
        let clients = channels
            .into_iter()
            .map(|channel| CacheClient::new(channel).max_decoding_message_size(MAX_RESPONSE_BYTES))
            .collect();
        Self { inner: Arc::new(Inner { clients, next: AtomicUsize::new(0), timeout, target }) }
    }

    /// The first call of [`ClientBuilder::connect`]: any answer of the server, even an error status, shows that
    /// the connection works; a failure of the connection itself is explained when it is about TLS.
    async fn probe(&self, timeout: Duration) -> Result<(), Error> {
        let mut request = tonic::Request::new(pb::ListKeySpacesRequest {});
        request.set_timeout(timeout);
        let Err(status) = self.inner.clients[0].clone().list_key_spaces(request).await else {
            return Ok(());
        };
        // A status the server sent has no source; one made from a transport failure has its cause.
        if std::error::Error::source(&status).is_none() {
            return Ok(());
        }
        let Some(target) = &self.inner.target else {
            return Err(Error::from_status(status));
        };
        if let Some(explained) = target.explain(&status, false) {
            return Err(explained);
        }
        if crate::error::caused_by_timeout(&status) {
            return Err(Error::DeadlineExceeded(format!(
                "{} accepted the connection but did not answer within {timeout:?}",
                target.endpoint
            )));
        }
        if let Some(explained) = target.explain_plain(timeout).await {
            return Err(explained);
        }
        Err(Error::Unavailable(format!("{}: {}", target.endpoint, Error::from_status(status))))
    }

    /// Maps the status of a failed call; a TLS failure (a reconnection refused after a certificate rotation, an
    /// alert from the server) is explained like at connect time.
    fn error(&self, status: tonic::Status) -> Error {
        if std::error::Error::source(&status).is_some()
            && let Some(explained) = self.inner.target.as_ref().and_then(|t| t.explain(&status, false))
        {
            return explained;
        }
        Error::from_status(status)
    }

    /// Where this client connected, and how (none for [`Client::from_channel`]).
    pub(crate) fn target(&self) -> Option<&Target> {
        self.inner.target.as_ref()
    }

    /// Number of HTTP/2 connections calls are spread over.
    pub fn connections(&self) -> usize {
        self.inner.clients.len()
    }

    /// The generated tonic client of the next connection, for calls this wrapper does not cover.
    pub fn raw(&self) -> CacheClient<Channel> {
        let clients = &self.inner.clients;
        let index = if clients.len() == 1 {
            0
        } else {
            self.inner.next.fetch_add(1, Ordering::Relaxed) % clients.len()
        };
        clients[index].clone()
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(timeout) = self.inner.timeout {
            request.set_timeout(timeout);
        }
        request
    }

    /// Reads one key. A miss in a read-through keyspace is loaded from the data source by the key's owner (once,
    /// however many clients ask). A key with no value is `Ok(None)`, not an error.
    ///
    /// A read whose connection broke before the node answered (the node shut down: a rolling update, a
    /// scale-in) is sent once more on a new connection; reads change nothing, so this is safe. Writes are not
    /// sent twice.
    pub async fn get(
        &self,
        keyspace: impl Into<String>,
        key: impl Into<String>,
    ) -> Result<Option<Value>, Error> {
        let message = pb::GetRequest { keyspace: keyspace.into(), key: key.into() };
        let mut result = self.raw().get(self.request(message.clone())).await;
        if let Err(status) = &result
            && crate::error::connection_lost(status)
        {
            result = self.raw().get(self.request(message)).await;
        }
        match result {
            Ok(response) => Ok(Some(response.into_inner().into())),
            Err(status) if status.code() == Code::NotFound => Ok(None),
            Err(status) => Err(self.error(status)),
        }
    }

    /// Reads many keys of one keyspace in one call; the cluster makes one internal call per owner node.
    ///
    /// The outer error is a failure of the whole call; otherwise there is one result per key, in the order of
    /// `keys` (duplicates included): `Ok(None)` for a key with no value, `Err` for a key that failed alone.
    pub async fn get_many<K>(
        &self,
        keyspace: impl Into<String>,
        keys: impl IntoIterator<Item = K>,
    ) -> Result<Vec<Result<Option<Value>, Error>>, Error>
    where
        K: Into<String>,
    {
        let keys: Vec<String> = keys.into_iter().map(Into::into).collect();
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let expected = keys.len();
        let message = pb::GetManyRequest { keyspace: keyspace.into(), keys };
        // Sent once more when the connection broke before the answer, as `get` does.
        let mut result = self.raw().get_many(self.request(message.clone())).await;
        if let Err(status) = &result
            && crate::error::connection_lost(status)
        {
            result = self.raw().get_many(self.request(message)).await;
        }
        let results = result.map_err(|status| self.error(status))?.into_inner().results;
        check_count(expected, results.len())?;
        Ok(results
            .into_iter()
            .map(|result| match result.outcome {
                Some(Outcome::Value(value)) => Ok(Some(value.into())),
                Some(Outcome::Error(error)) => match Error::from_code(error.code, error.message) {
                    Error::NotFound(_) => Ok(None),
                    other => Err(other),
                },
                Some(Outcome::Ok(_)) | None => {
                    Err(Error::Protocol(format!("GetMany result for key {:?} has no value", result.key)))
                }
            })
            .collect())
    }

    /// Stores a value. Returns once the key's owner stored it and copies on other nodes were invalidated.
    /// `ttl: None` uses the keyspace's default TTL (or no expiry when it has none).
    pub async fn put(
        &self,
        keyspace: impl Into<String>,
        key: impl Into<String>,
        value: impl Into<Bytes>,
        ttl: Option<Duration>,
    ) -> Result<(), Error> {
        let request = self.request(pb::PutRequest {
            keyspace: keyspace.into(),
            key: key.into(),
            value: value.into(),
            ttl: ttl.map(from_std_duration),
        });
        self.raw().put(request).await.map_err(|status| self.error(status))?;
        Ok(())
    }

    /// Stores many `(key, value, ttl)` entries of one keyspace in one call: one result per entry, in order.
    pub async fn put_many(
        &self,
        keyspace: impl Into<String>,
        entries: impl IntoIterator<Item = (String, Bytes, Option<Duration>)>,
    ) -> Result<Vec<Result<(), Error>>, Error> {
        let entries: Vec<pb::Entry> = entries
            .into_iter()
            .map(|(key, value, ttl)| pb::Entry { key, value, ttl: ttl.map(from_std_duration) })
            .collect();
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let expected = entries.len();
        let request = self.request(pb::PutManyRequest { keyspace: keyspace.into(), entries });
        let results =
            self.raw().put_many(request).await.map_err(|status| self.error(status))?.into_inner().results;
        check_count(expected, results.len())?;
        Ok(results.into_iter().map(|result| unit_outcome("PutMany", result)).collect())
    }

    /// Removes a key from the cache cluster-wide. It does not touch the data source: the next read of a
    /// read-through keyspace fetches the key again.
    pub async fn delete(&self, keyspace: impl Into<String>, key: impl Into<String>) -> Result<(), Error> {
        let request = self.request(pb::DeleteRequest { keyspace: keyspace.into(), key: key.into() });
        self.raw().delete(request).await.map_err(|status| self.error(status))?;
        Ok(())
    }

    /// Removes many keys of one keyspace in one call: one result per key, in order.
    pub async fn delete_many<K>(
        &self,
        keyspace: impl Into<String>,
        keys: impl IntoIterator<Item = K>,
    ) -> Result<Vec<Result<(), Error>>, Error>
    where
        K: Into<String>,
    {
        let keys: Vec<String> = keys.into_iter().map(Into::into).collect();
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let expected = keys.len();
        let request = self.request(pb::DeleteManyRequest { keyspace: keyspace.into(), keys });
        let results =
            self.raw().delete_many(request).await.map_err(|status| self.error(status))?.into_inner().results;
        check_count(expected, results.len())?;
        Ok(results.into_iter().map(|result| unit_outcome("DeleteMany", result)).collect())
    }

    /// Lists the keyspaces the node serves, with their effective settings.
    pub async fn keyspaces(&self) -> Result<Vec<KeyspaceInfo>, Error> {
        let request = self.request(pb::ListKeySpacesRequest {});
        let response =
            self.raw().list_key_spaces(request).await.map_err(|status| self.error(status))?.into_inner();
        Ok(response.keyspaces.into_iter().map(KeyspaceInfo::from).collect())
    }

    /// Drops every entry of a keyspace on every node; returns how many nodes purged (the answering one included).
    pub async fn purge(&self, keyspace: impl Into<String>) -> Result<u32, Error> {
        let request = self.request(pb::PurgeKeySpaceRequest { keyspace: keyspace.into() });
        Ok(self.raw().purge_key_space(request).await.map_err(|status| self.error(status))?.into_inner().nodes)
    }

    /// Counters of the answering node, for all keyspaces or only `keyspace`.
    pub async fn stats(&self, keyspace: Option<&str>) -> Result<Stats, Error> {
        let request = self.request(pb::StatsRequest { keyspace: keyspace.unwrap_or_default().to_owned() });
        let response = self.raw().stats(request).await.map_err(|status| self.error(status))?.into_inner();
        Ok(Stats {
            node: response.node,
            members: response.members,
            keyspaces: response.keyspaces.into_iter().map(KeyspaceStats::from).collect(),
        })
    }

    /// Streams membership as the node sees it: one [`MemberEvent::Join`] per current member, then
    /// [`MemberEvent::SnapshotEnd`], then one event per change until the stream is dropped.
    pub async fn watch_members(&self) -> Result<MemberEvents, Error> {
        // No deadline: the stream is meant to stay open.
        let request = tonic::Request::new(pb::WatchMembersRequest {});
        let inner =
            self.raw().watch_members(request).await.map_err(|status| self.error(status))?.into_inner();
        Ok(MemberEvents { inner })
    }

    /// The current members: the snapshot part of [`Client::watch_members`], after which the stream is dropped.
    /// Bounded by the client's timeout, if one is set.
    pub async fn members(&self) -> Result<Vec<Member>, Error> {
        let collect = async {
            let mut events = self.watch_members().await?;
            let mut members = Vec::new();
            while let Some(event) = events.next().await {
                match event? {
                    MemberEvent::SnapshotEnd => return Ok(members),
                    change => apply_event(&mut members, change),
                }
            }
            Err(Error::Protocol("membership stream ended before the end of the snapshot".to_owned()))
        };
        match self.inner.timeout {
            Some(timeout) => tokio::time::timeout(timeout, collect).await.unwrap_or_else(|_| {
                Err(Error::DeadlineExceeded(
                    "membership snapshot not complete within the client timeout".into(),
                ))
            }),
            None => collect.await,
        }
    }
}

/// Folds one membership change into a member list (by name), so a snapshot that races with changes stays right.
fn apply_event(members: &mut Vec<Member>, event: MemberEvent) {
    match event {
        MemberEvent::Join(member) | MemberEvent::Update(member) => {
            match members.iter_mut().find(|m| m.name == member.name) {
                Some(existing) => *existing = member,
                None => members.push(member),
            }
        }
        MemberEvent::Leave(member) => members.retain(|m| m.name != member.name),
        MemberEvent::SnapshotEnd => {}
    }
}

fn check_count(expected: usize, got: usize) -> Result<(), Error> {
    if expected == got {
        Ok(())
    } else {
        Err(Error::Protocol(format!("asked for {expected} keys, got {got} results")))
    }
}

fn unit_outcome(call: &str, result: pb::KeyResult) -> Result<(), Error> {
    match result.outcome {
        Some(Outcome::Ok(_)) => Ok(()),
        Some(Outcome::Error(error)) => Err(Error::from_code(error.code, error.message)),
        Some(Outcome::Value(_)) | None => {
            Err(Error::Protocol(format!("{call} result for key {:?} is neither ok nor an error", result.key)))
        }
    }
}

#[cfg(test)]
mod tests;
