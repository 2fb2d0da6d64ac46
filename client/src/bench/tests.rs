use super::*;

#[test]
fn keys_are_zero_padded() {
    assert_eq!(key_name(0), "key-00000000");
    assert_eq!(key_name(99_999), "key-00099999");
    assert_eq!(key_name(123_456_789), "key-123456789");
}

#[test]
fn key_draws_cover_the_range_uniformly() {
    const BUCKETS: usize = 10;
    const DRAWS: usize = 200_000;
    let mut rng = XorShift64::seeded(7);
    let mut counts = [0usize; BUCKETS];
    for _ in 0..DRAWS {
        let i = rng.below(100_000);
        assert!(i < 100_000);
        counts[i * BUCKETS / 100_000] += 1;
    }
    let expected = DRAWS / BUCKETS;
    for (bucket, count) in counts.iter().enumerate() {
        // ±5 % of 20 000 is > 7 standard deviations: a real bias fails, chance does not.
        assert!(
            count.abs_diff(expected) < expected / 20,
            "bucket {bucket}: {count} draws, expected ~{expected}"
        );
    }
}

#[test]
fn workers_draw_different_sequences() {
    let mut a = XorShift64::seeded(0);
    let mut b = XorShift64::seeded(1);
    let a: Vec<_> = (0..8).map(|_| a.below(1_000_000)).collect();
    let b: Vec<_> = (0..8).map(|_| b.below(1_000_000)).collect();
    assert_ne!(a, b);
    // Small ranges still produce every value.
    let mut rng = XorShift64::seeded(3);
    let mut seen = [false; 10];
    for _ in 0..1_000 {
        seen[rng.below(10)] = true;
    }
    assert!(seen.iter().all(|s| *s));
}

#[test]
fn unique_keys_never_repeat() {
    let unique = UniqueKeys::new();
    let keys: Vec<String> = (0..10_000).map(|_| unique.next_key()).collect();
    let distinct: std::collections::HashSet<&String> = keys.iter().collect();
    assert_eq!(distinct.len(), keys.len());
    assert!(keys.iter().all(|k| k.starts_with(&unique.prefix)), "{:?}", &keys[..3]);
    // Another run (in this process or a later one) starts from another prefix, so its keys are fresh too.
    assert_ne!(UniqueKeys::new().prefix, unique.prefix);
}

#[test]
fn ops_parse_and_print() {
    for op in [Op::Get, Op::Put, Op::Mixed] {
        assert_eq!(op.to_string().parse::<Op>(), Ok(op));
    }
    assert!("scan".parse::<Op>().is_err());
}

#[test]
fn connections_default_to_at_most_four() {
    assert_eq!(default_connections(1), 1);
    assert_eq!(default_connections(3), 3);
    assert_eq!(default_connections(50), 4);
}

#[test]
fn invalid_configs_are_rejected() {
    assert!(BenchConfig::default().validate().is_ok());
    for config in [
        BenchConfig { concurrency: 0, ..BenchConfig::default() },
        BenchConfig { batch: 0, ..BenchConfig::default() },
        BenchConfig { keys: 0, ..BenchConfig::default() },
        BenchConfig { duration: Duration::ZERO, ..BenchConfig::default() },
    ] {
        assert!(matches!(config.validate(), Err(BenchError::InvalidConfig(_))), "{config:?}");
    }
}

fn tally(latencies_us: &[u64], errors: u64, misses: u64) -> Tally {
    let mut tally = Tally::new().expect("constant bounds are valid");
    for &us in latencies_us {
        tally.record(Duration::from_micros(us), CallOutcome { errors: 0, misses: 0, first_error: None });
    }
    tally.errors = errors;
    tally.misses = misses;
    tally
}

#[test]
fn tallies_merge_into_one_report() {
    let config = BenchConfig { batch: 4, ..BenchConfig::default() };
    // 1000 calls: 990 fast ones in one task, 10 slow ones in another.
    let fast = tally(&[100; 990], 3, 5);
    let mut slow = tally(&[5_000; 10], 0, 1);
    slow.first_error = Some("unavailable".to_owned());
    let report = summarize(&config, 2, Duration::from_secs(2), vec![fast, slow]).expect("merge");
    assert_eq!(report.requests, 1000);
    assert!((report.ops_per_sec - 500.0).abs() < f64::EPSILON);
    assert!((report.keys_per_sec - 2000.0).abs() < f64::EPSILON);
    assert_eq!(report.p50_us, 100);
    assert!((4_990..=5_010).contains(&report.p999_us), "p99.9 {}", report.p999_us);
    assert!((4_990..=5_010).contains(&report.max_us), "max {}", report.max_us);
    assert_eq!((report.errors, report.misses), (3, 6));
    assert_eq!(report.first_error.as_deref(), Some("unavailable"));
    assert!(!report.all_failed());
}

#[test]
fn report_renders_as_text_and_json() {
    let config = BenchConfig::default();
    let report =
        summarize(&config, 4, Duration::from_secs(10), vec![tally(&[250; 100], 0, 0)]).expect("merge");
    let text = report.to_string();
    assert!(
        text.starts_with("op           get\nconcurrency  50\ntransport    client\nconnections  4\n"),
        "{text}"
    );
    assert!(text.contains("ops/s        10.0\n"), "{text}");
    assert!(text.contains("p50          250 µs\n"), "{text}");
    let json = serde_json::to_value(&report).expect("serializable");
    let fields: Vec<&str> = json.as_object().expect("object").keys().map(String::as_str).collect();
    let mut expected = vec![
        "op",
        "concurrency",
        "transport",
        "connections",
        "batch",
        "value_size",
        "keys",
        "unique_keys",
        "duration_s",
        "requests",
        "ops_per_sec",
        "keys_per_sec",
        "p50_us",
        "p99_us",
        "p999_us",
        "max_us",
        "errors",
        "misses",
    ];
    expected.sort_unstable();
    let mut fields = fields;
    fields.sort_unstable();
    assert_eq!(fields, expected);
    assert_eq!(json["op"], "get");
    assert_eq!(json["transport"], "client");
    assert_eq!(json["p50_us"], 250);
}

#[test]
fn all_failed_means_no_successful_key() {
    let config = BenchConfig { batch: 2, ..BenchConfig::default() };
    let empty = summarize(&config, 1, Duration::from_secs(1), vec![]).expect("merge");
    assert!(empty.all_failed());
    assert_eq!(empty.p99_us, 0);
    let failing = summarize(&config, 1, Duration::from_secs(1), vec![tally(&[10; 5], 10, 0)]).expect("merge");
    assert!(failing.all_failed());
    let partly = summarize(&config, 1, Duration::from_secs(1), vec![tally(&[10; 5], 9, 0)]).expect("merge");
    assert!(!partly.all_failed());
}

// Short runs against the in-process fake service: the loop, preload and accounting over real gRPC.

fn quick(op: Op, keyspace: &str) -> BenchConfig {
    BenchConfig {
        op,
        concurrency: 4,
        duration: Duration::from_millis(300),
        warmup: Duration::from_millis(50),
        keys: 1_200,
        keyspace: keyspace.to_owned(),
        ..BenchConfig::default()
    }
}

#[tokio::test]
async fn preloaded_reads_all_hit() {
    let (addr, _fake) = crate::testing::serve().await;
    let client = Client::connect_many(addr.to_string(), 2).await.expect("connect");
    let phases = std::sync::Mutex::new(Vec::new());
    let report = run_with_progress(&client, &quick(Op::Get, crate::testing::KEYSPACE), |phase| {
        phases.lock().expect("test lock").push(phase);
    })
    .await
    .expect("bench runs");
    let phases = phases.into_inner().expect("test lock");
    assert!(report.requests > 0, "{report:?}");
    assert_eq!((report.errors, report.misses), (0, 0), "{report:?}");
    assert_eq!(report.connections, 2);
    assert!(report.p50_us > 0 && report.p50_us <= report.p99_us && report.p99_us <= report.max_us);
    assert!(report.duration_s >= 0.3, "{report:?}");
    assert!(!report.all_failed());
    assert_eq!(phases[0], Phase::Preloading { keys: 1_200 });
    assert!(matches!(phases[1..], [Phase::WarmingUp(_), Phase::Measuring(_)]), "{phases:?}");
}

#[tokio::test]
async fn reads_without_preload_are_misses_not_errors() {
    let (addr, _fake) = crate::testing::serve().await;
    let client = Client::connect(addr.to_string()).await.expect("connect");
    let config = BenchConfig { preload: false, batch: 8, ..quick(Op::Get, crate::testing::KEYSPACE) };
    let report = run(&client, &config).await.expect("bench runs");
    assert!(report.requests > 0);
    assert_eq!(report.errors, 0);
    assert_eq!(report.misses, report.requests * 8, "every key of every batch missed");
    assert!((report.keys_per_sec - report.ops_per_sec * 8.0).abs() < 1.0);
}

#[tokio::test]
async fn unique_keys_make_every_read_a_miss_and_skip_preload() {
    let (addr, _fake) = crate::testing::serve().await;
    let client = Client::connect(addr.to_string()).await.expect("connect");
    // Ten keys, preload on: with drawn keys every read would hit; with unique keys none does.
    let config = BenchConfig { keys: 10, unique_keys: true, ..quick(Op::Get, crate::testing::KEYSPACE) };
    let phases = std::sync::Mutex::new(Vec::new());
    let report = run_with_progress(&client, &config, |phase| phases.lock().expect("test lock").push(phase))
        .await
        .expect("bench runs");
    assert!(report.requests > 10, "{report:?}");
    assert_eq!(report.errors, 0, "{report:?}");
    assert_eq!(report.misses, report.requests, "every read used a key never written: {report:?}");
    assert!(report.unique_keys);
    assert!(report.to_string().contains("keys         unique"), "{report}");
    let phases = phases.into_inner().expect("test lock");
    assert!(matches!(phases[..], [Phase::WarmingUp(_), Phase::Measuring(_)]), "no preload: {phases:?}");

    // Mixed: the writes go to fresh keys too, so they never turn a later read into a hit.
    let config = BenchConfig { unique_keys: true, ..quick(Op::Mixed, crate::testing::KEYSPACE) };
    let report = run(&client, &config).await.expect("bench runs");
    assert_eq!(report.errors, 0, "{report:?}");
    assert!(report.misses > 0 && report.misses < report.requests, "{report:?}");
}

#[tokio::test]
async fn mixed_writes_make_later_reads_hit() {
    let (addr, _fake) = crate::testing::serve().await;
    let client = Client::connect(addr.to_string()).await.expect("connect");
    let config = BenchConfig { preload: false, keys: 10, ..quick(Op::Mixed, crate::testing::KEYSPACE) };
    let report = run(&client, &config).await.expect("bench runs");
    assert_eq!(report.errors, 0);
    assert!(report.misses < report.requests, "writes of 10 keys turn reads into hits: {report:?}");
}

#[tokio::test]
async fn failures_are_counted_and_explained() {
    let (addr, _fake) = crate::testing::serve().await;
    let client = Client::connect(addr.to_string()).await.expect("connect");
    let err = run(&client, &quick(Op::Get, "nope")).await.expect_err("preload fails");
    assert!(matches!(&err, BenchError::Preload { source: Error::UnknownKeyspace(_), .. }), "{err:?}");

    let report = run(&client, &quick(Op::Put, "nope")).await.expect("bench runs");
    assert!(report.requests > 0);
    assert_eq!(report.errors, report.requests);
    assert!(report.all_failed());
    assert!(report.first_error.as_deref().is_some_and(|e| e.contains("unknown keyspace")), "{report:?}");
}

// The h2 transport speaks to the same tonic service as the client library: every kind of call, and the same
// accounting of hits, misses and errors.

#[tokio::test]
async fn the_h2_transport_reads_writes_and_counts_like_the_client_library() {
    let (addr, _fake) = crate::testing::serve().await;
    let client = Client::connect_many(addr.to_string(), 2).await.expect("connect");
    let h2 = |config: BenchConfig| BenchConfig { transport: Transport::H2, ..config };

    // Get and GetMany of preloaded keys: all hit.
    for batch in [1, 16] {
        let report = run(&client, &h2(BenchConfig { batch, ..quick(Op::Get, crate::testing::KEYSPACE) }))
            .await
            .expect("runs");
        assert!(report.requests > 0, "{report:?}");
        assert_eq!((report.errors, report.misses), (0, 0), "batch {batch}: {report:?}");
        assert_eq!(report.transport, Transport::H2);
        assert_eq!(report.connections, 2);
        assert!(report.to_string().contains("transport    h2"), "{report}");
    }

    // Keys never written: misses (NOT_FOUND, alone or per key of a batch), not errors.
    for batch in [1, 8] {
        let config = h2(BenchConfig { unique_keys: true, batch, ..quick(Op::Get, crate::testing::KEYSPACE) });
        let report = run(&client, &config).await.expect("runs");
        assert_eq!(report.errors, 0, "{report:?}");
        assert_eq!(report.misses, report.requests * batch as u64, "batch {batch}: {report:?}");
    }

    // Put and PutMany store what later reads find.
    for batch in [1, 4] {
        let config =
            h2(BenchConfig { preload: false, keys: 10, batch, ..quick(Op::Mixed, crate::testing::KEYSPACE) });
        let report = run(&client, &config).await.expect("runs");
        assert_eq!(report.errors, 0, "{report:?}");
        assert!(report.misses < report.requests * batch as u64, "writes turn reads into hits: {report:?}");
    }

    // An error status (here in a trailers-only answer) is counted and explained as the client library does.
    for op in [Op::Get, Op::Put] {
        let config = h2(BenchConfig { preload: false, ..quick(op, "nope") });
        let report = run(&client, &config).await.expect("runs");
        assert!(report.all_failed(), "{report:?}");
        assert!(report.first_error.as_deref().is_some_and(|e| e.contains("unknown keyspace")), "{report:?}");
    }
}

#[tokio::test]
async fn the_h2_transport_fails_clearly_when_the_server_is_gone() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
    let addr = listener.local_addr().expect("bound address");
    let service = distcache_proto::v1::cache_server::CacheServer::new(crate::testing::FakeCache::default());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server =
        tokio::spawn(tonic::transport::Server::builder().add_service(service).serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            async {
                let _ = stopped.await;
            },
        ));
    let client = Client::connect(addr.to_string()).await.expect("connect");
    let _ = stop.send(());
    drop(client.clone());
    server.await.expect("server task").expect("server stops cleanly");
    let config =
        BenchConfig { preload: false, transport: Transport::H2, ..quick(Op::Get, crate::testing::KEYSPACE) };
    match run(&client, &config).await {
        Err(BenchError::Connect(Error::Unavailable(message))) => {
            assert!(message.contains(&addr.to_string()), "{message}");
        }
        other => panic!("expected a connect error, got {other:?}"),
    }
}
