use super::*;
use crate::{
    testing::{self, KEYSPACE},
    tls::normalize_endpoint,
};

fn member(name: &str, address: &str) -> Member {
    Member { name: name.to_owned(), address: address.to_owned(), local: false }
}

#[test]
fn endpoints_without_scheme_get_http() {
    assert_eq!(normalize_endpoint("127.0.0.1:7420"), "http://127.0.0.1:7420");
    assert_eq!(normalize_endpoint(" http://node:7420 "), "http://node:7420");
    assert_eq!(normalize_endpoint("https://node:443"), "https://node:443");
}

#[test]
fn membership_changes_fold_by_name() {
    let mut members = Vec::new();
    apply_event(&mut members, MemberEvent::Join(member("a", "1")));
    apply_event(&mut members, MemberEvent::Join(member("b", "2")));
    apply_event(&mut members, MemberEvent::Update(member("a", "3")));
    apply_event(&mut members, MemberEvent::Join(member("c", "4")));
    apply_event(&mut members, MemberEvent::Leave(member("b", "2")));
    apply_event(&mut members, MemberEvent::SnapshotEnd);
    assert_eq!(members, vec![member("a", "3"), member("c", "4")]);
}

#[test]
fn member_events_decode() {
    use pb::member_event::Type;
    let wire = |kind: Type, member: Option<pb::Member>| pb::MemberEvent { r#type: kind as i32, member };
    let m = pb::Member { name: "n".into(), address: "a:1".into(), local: true };
    let decoded = MemberEvent::from_proto(wire(Type::Join, Some(m.clone()))).ok().flatten();
    assert_eq!(
        decoded,
        Some(MemberEvent::Join(Member { name: "n".into(), address: "a:1".into(), local: true }))
    );
    assert_eq!(
        MemberEvent::from_proto(wire(Type::SnapshotEnd, None)).ok().flatten(),
        Some(MemberEvent::SnapshotEnd)
    );
    assert!(matches!(MemberEvent::from_proto(wire(Type::Leave, None)), Err(Error::Protocol(_))));
    // Unknown types from a newer server are skipped, not fatal.
    let unknown = pb::MemberEvent { r#type: 42, member: Some(m) };
    assert!(matches!(MemberEvent::from_proto(unknown), Ok(None)));
}

#[test]
fn batch_outcomes_map_per_key() {
    let ok = pb::KeyResult { key: "k".into(), outcome: Some(Outcome::Ok(pb::Ok {})) };
    assert!(unit_outcome("PutMany", ok).is_ok());
    let failed = pb::KeyResult {
        key: "k".into(),
        outcome: Some(Outcome::Error(pb::KeyError { code: 3, message: "value too large".into() })),
    };
    assert!(
        matches!(unit_outcome("PutMany", failed), Err(Error::InvalidArgument(m)) if m == "value too large")
    );
    let empty = pb::KeyResult { key: "k".into(), outcome: None };
    assert!(matches!(unit_outcome("PutMany", empty), Err(Error::Protocol(_))));
    assert!(check_count(2, 1).is_err());
}

// End to end over real gRPC, against the in-process fake of the service.

#[tokio::test]
async fn connect_accepts_host_port_and_reports_unreachable_endpoints() {
    let (addr, _fake) = testing::serve().await;
    let client = Client::connect(addr.to_string()).await.expect("host:port connects");
    assert_eq!(client.connections(), 1);

    // A port nobody listens on: bind, note the port, close.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr");
    let err = Client::connect(format!("http://{closed}")).await.expect_err("nothing listens there");
    assert!(
        matches!(&err, Error::Connect { endpoint, .. } if *endpoint == format!("http://{closed}")),
        "{err:?}"
    );
    assert!(std::error::Error::source(&err).is_some(), "the cause is kept as the source");
}

#[tokio::test]
async fn single_key_round_trip() {
    let (addr, _fake) = testing::serve().await;
    let client = Client::connect(format!("http://{addr}")).await.expect("connect");
    assert_eq!(client.get(KEYSPACE, "42").await.expect("get"), None, "NOT_FOUND is Ok(None)");
    client.put(KEYSPACE, "42", "alice", Some(Duration::from_secs(30))).await.expect("put");
    let value = client.get(KEYSPACE, "42").await.expect("get").expect("stored");
    assert_eq!(value.value, Bytes::from_static(b"alice"));
    assert_eq!(value.ttl, Some(Duration::from_mins(1)));
    client.delete(KEYSPACE, "42").await.expect("delete");
    assert_eq!(client.get(KEYSPACE, "42").await.expect("get"), None);

    let err = client.get("nope", "42").await.expect_err("unknown keyspace");
    assert!(matches!(&err, Error::UnknownKeyspace(m) if m.contains("nope")), "{err:?}");
    let err = client.put(KEYSPACE, "bad", "x", None).await.expect_err("rejected");
    assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
}

#[tokio::test]
async fn batches_keep_order_and_per_key_outcomes() {
    let (addr, _fake) = testing::serve().await;
    let client = Client::connect_many(addr.to_string(), 3).await.expect("connect");
    assert_eq!(client.connections(), 3);
    let entries = ["a", "bad", "c"].map(|k| (k.to_owned(), Bytes::from(k.to_uppercase()), None));
    let stored = client.put_many(KEYSPACE, entries).await.expect("put_many");
    assert!(stored[0].is_ok() && stored[2].is_ok());
    assert!(matches!(&stored[1], Err(Error::InvalidArgument(m)) if m.contains("bad")), "{stored:?}");

    let read = client.get_many(KEYSPACE, ["c", "missing", "a", "c"]).await.expect("get_many");
    let values: Vec<Option<&[u8]>> =
        read.iter().map(|r| r.as_ref().expect("no per-key error").as_ref().map(|v| &v.value[..])).collect();
    assert_eq!(values, [Some(&b"C"[..]), None, Some(&b"A"[..]), Some(&b"C"[..])]);

    let deleted =
        client.delete_many(KEYSPACE, vec!["a".to_owned(), "c".to_owned()]).await.expect("delete_many");
    assert_eq!(deleted.len(), 2);
    assert!(
        client.get_many(KEYSPACE, ["a", "c"]).await.expect("get_many").iter().all(|r| matches!(r, Ok(None)))
    );
    assert!(client.get_many(KEYSPACE, Vec::<String>::new()).await.expect("empty batch").is_empty());
    let err = client.get_many("nope", ["a"]).await.expect_err("whole call fails");
    assert!(matches!(err, Error::UnknownKeyspace(_)), "{err:?}");
}

#[tokio::test]
async fn connections_are_used_round_robin() {
    let (addr, fake) = testing::serve().await;
    let client = Client::connect_many(addr.to_string(), 2).await.expect("connect");
    let calls: Vec<_> = (0..20).map(|i| client.get(KEYSPACE, format!("k{i}"))).collect();
    for result in futures::future::join_all(calls).await {
        assert_eq!(result.expect("get"), None);
    }
    assert_eq!(fake.calls.load(std::sync::atomic::Ordering::Relaxed), 20);
    assert_eq!(client.inner.next.load(Ordering::Relaxed), 20, "every call picked the next connection");
}

#[tokio::test]
async fn admin_calls_decode() {
    let (addr, _fake) = testing::serve().await;
    let client = Client::connect(addr.to_string()).await.expect("connect");
    let keyspaces = client.keyspaces().await.expect("keyspaces");
    assert_eq!(keyspaces.len(), 1);
    assert_eq!(keyspaces[0].ttl, Some(Duration::from_mins(5)));
    assert_eq!(keyspaces[0].negative_ttl, None);
    assert!(keyspaces[0].read_through);
    assert_eq!(client.purge(KEYSPACE).await.expect("purge"), 3);
    let stats = client.stats(Some(KEYSPACE)).await.expect("stats");
    assert_eq!((stats.node.as_str(), stats.members, stats.keyspaces[0].hits), ("node-1", 2, 7));
    let users = &stats.keyspaces[0];
    assert_eq!((users.circuit_state.as_str(), users.stale_served, users.rate_limited), ("closed", 1, 2));
    assert_eq!(users.hot_keys[0], HotKey { key: "42".to_owned(), hits: 12 });
    assert_eq!(
        users.warm_up,
        Some(WarmUp { listed: 30, owned: 12, loaded: 10, present: 2, failed: 0, done: true })
    );
    let err = client.stats(Some("other")).await.expect_err("unknown keyspace");
    assert!(matches!(&err, Error::UnknownKeyspace(m) if m.contains("other")), "{err:?}");
}

#[tokio::test]
async fn stale_values_are_marked() {
    let (addr, _fake) = testing::serve().await;
    let client = Client::connect(addr.to_string()).await.expect("connect");
    let value = client.get(KEYSPACE, testing::STALE_KEY).await.expect("get").expect("a stale value");
    assert!(value.stale);
    assert_eq!((&value.value[..], value.ttl), (testing::STALE_VALUE, Some(Duration::ZERO)));
    client.put(KEYSPACE, "fresh", "v", None).await.expect("put");
    assert!(!client.get(KEYSPACE, "fresh").await.expect("get").expect("stored").stale);
    let read = client.get_many(KEYSPACE, ["fresh", testing::STALE_KEY]).await.expect("get_many");
    let stale: Vec<bool> = read.iter().map(|r| matches!(r, Ok(Some(v)) if v.stale)).collect();
    assert_eq!(stale, [false, true]);
}

#[tokio::test]
async fn stats_and_members_come_from_the_node_asked() {
    let (addr, fake) = testing::serve().await;
    fake.set_cluster("node-b", &[("node-a", addr), ("node-b", addr)], &[("k", 5)]);
    let client =
        Client::builder(addr.to_string()).timeout(Duration::from_secs(5)).connect().await.expect("connect");
    let stats = client.stats(None).await.expect("stats");
    assert_eq!((stats.node.as_str(), stats.members), ("node-b", 2));
    assert_eq!(stats.keyspaces[0].hot_keys, [HotKey { key: "k".to_owned(), hits: 5 }]);
    let members = client.members().await.expect("members");
    let local: Vec<(&str, bool)> = members.iter().map(|m| (m.name.as_str(), m.local)).collect();
    assert_eq!(local, [("node-a", false), ("node-b", true)]);
}

#[tokio::test]
async fn members_stop_at_the_snapshot_and_watch_continues() {
    let (addr, _fake) = testing::serve().await;
    let client =
        Client::builder(addr.to_string()).timeout(Duration::from_secs(5)).connect().await.expect("connect");
    let members = client.members().await.expect("members");
    assert_eq!(members.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(), ["node-1", "node-2"]);
    assert!(members[0].local && !members[1].local);

    let events: Vec<MemberEvent> =
        client.watch_members().await.expect("watch").take(4).map(|e| e.expect("event")).collect().await;
    assert_eq!(events[2], MemberEvent::SnapshotEnd);
    assert!(matches!(&events[3], MemberEvent::Leave(m) if m.name == "node-2"));
}

#[tokio::test]
async fn client_timeout_is_deadline_exceeded() {
    let (addr, _fake) = testing::serve().await;
    let client = Client::builder(addr.to_string())
        .timeout(Duration::from_millis(100))
        .connect()
        .await
        .expect("connect");
    let started = std::time::Instant::now();
    let err = client.get(KEYSPACE, "slow").await.expect_err("times out");
    assert!(matches!(err, Error::DeadlineExceeded(_)), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(1), "the deadline cut the call short");
}
