//! Data-source protections of a keyspace, with real `distcache-node` processes reading through the `http-json`
//! hook from the in-process origin, which the tests make fail, slow down or answer 503 bursts
//! (`distcache_tests::origin`). What each test proves:
//!
//! - [`the_breaker_opens_rejects_without_calling_the_origin_then_half_opens_and_recovers`]: 5 failures in the
//!   window open the circuit; while it is open reads fail UNAVAILABLE "circuit open" and not one request reaches
//!   the origin; after `openFor` a probe reaches the healed origin and the circuit closes again.
//! - [`a_storm_of_missing_keys_never_opens_the_breaker`]: NOT_FOUND is an answer, not a failure: 200 missing keys
//!   all reach the origin and the circuit stays closed.
//! - [`the_rate_limit_caps_the_request_rate_the_origin_sees`]: measured at the origin, no second holds more
//!   fetches than `burst + fetchesPerSecond`; the reads over the limit fail RESOURCE_EXHAUSTED, saying so.
//! - [`stale_if_error_answers_every_read_during_an_outage`]: a 20 s outage of the origin fails no read; what is
//!   answered after expiry is marked stale.
//! - [`stale_while_revalidate_never_makes_a_reader_wait_for_the_origin`]: after the first loads, every fetch is a
//!   background one (counted, not timed), although the origin takes 300 ms to answer.
//! - [`refresh_ahead_keeps_a_read_key_from_ever_expiring`]: a key read every 50 ms for three TTLs is never a miss
//!   and never stale, and costs the origin about one request per refresh interval.
//! - [`warm_up_loads_each_listed_key_once_across_the_cluster`]: three nodes started together load the listed keys
//!   they own, each key once, and later reads through any node reach the origin no more.
//!
//! Every wait polls with a deadline ([`wait_for`]); every loop is bounded in time and in reads. Run after
//! `cargo build -p distcache-node --bins` (the tests start the built binary) with the `wasm32-wasip2` target
//! installed (the hook is built on first use).

use std::{
    cell::RefCell,
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use distcache_proto::v1::{GetRequest, cache_client::CacheClient};
use distcache_tests::{client, hook_module, http_get, origin::Origin, procs::ProcCluster, wait_for};
use tonic::{Code, transport::Channel};

// ---------------------------------------------------------------------------------------------------------------
// Helpers: the origin's data, keyspaces, reads, metrics and the admin report.
// ---------------------------------------------------------------------------------------------------------------

/// What the origin answers for `key` (`/items/<key>`).
fn value_of(key: &str) -> Bytes {
    Bytes::from(format!("{{\"key\":\"{key}\"}}"))
}

/// An origin serving `items/<key>.json` for each of `keys`.
async fn origin_with(keys: &[String]) -> anyhow::Result<(tempfile::TempDir, Origin)> {
    Ok(distcache_tests::origin::serving_items(keys, |key| value_of(key).to_vec()).await?)
}

fn keys(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

/// A keyspaces file with one keyspace `name` read through the `http-json` hook from `<origin>/items`, plus
/// `settings` (one `field: value` per line, as in the keyspaces file).
fn keyspaces(origin: &Origin, name: &str, settings: &str) -> anyhow::Result<String> {
    let mut yaml = format!(
        "keyspaces:\n  - name: {name}\n    maxBytes: 16Mi\n    hook:\n      module: {{ path: \"{module}\" }}\n      \
         config: {{ baseUrl: \"{base}/items\" }}\n      allowedHosts: [\"{host}\"]\n",
        module = hook_module("http_json")?.display(),
        base = origin.url(),
        host = origin.addr,
    );
    for line in settings.lines().map(str::trim).filter(|l| !l.is_empty()) {
        yaml.push_str("    ");
        yaml.push_str(line);
        yaml.push('\n');
    }
    Ok(yaml)
}

/// One node process serving `keyspaces`, ready and serving `keyspace`.
async fn one_node(keyspaces: &str, keyspace: &str) -> anyhow::Result<ProcCluster> {
    let cluster = ProcCluster::start(1, keyspaces, "")?;
    cluster.wait_views(&[0], &["node-1"], Duration::from_secs(30)).await?;
    wait_serving(&cluster, keyspace).await?;
    Ok(cluster)
}

/// Waits until every node of `cluster` lists `keyspace` on `/admin/keyspaces` (its hook is loaded).
async fn wait_serving(cluster: &ProcCluster, keyspace: &str) -> anyhow::Result<()> {
    for node in &cluster.nodes {
        let waited =
            wait_for(Duration::from_secs(30), &format!("{} serving {keyspace}", node.name), || async {
                Ok(keyspace_report(node.admin, keyspace).await.is_ok())
            })
            .await;
        waited.map_err(|e| e.context(cluster.logs()))?;
    }
    Ok(())
}

/// One Get: the value and whether it was answered stale, or the status.
async fn read(
    c: &mut CacheClient<Channel>,
    keyspace: &str,
    key: &str,
) -> Result<(Bytes, bool), tonic::Status> {
    let request = GetRequest { keyspace: keyspace.into(), key: key.into() };
    c.get(request).await.map(|r| {
        let r = r.into_inner();
        (r.value, r.stale)
    })
}

/// Reads `key` and requires its value; returns the stale flag.
async fn read_ok(c: &mut CacheClient<Channel>, keyspace: &str, key: &str) -> anyhow::Result<bool> {
    let (value, stale) =
        read(c, keyspace, key).await.map_err(|s| anyhow::anyhow!("{keyspace}/{key}: {s:?}"))?;
    anyhow::ensure!(value == value_of(key), "{keyspace}/{key}: wrong value {value:?}");
    Ok(stale)
}

/// `/metrics` of a node.
async fn scrape(admin: SocketAddr) -> anyhow::Result<String> {
    let (status, text) = http_get(admin, "/metrics").await?;
    anyhow::ensure!(status == 200, "/metrics answered {status}");
    Ok(text)
}

/// A sample value written as an integer (`5`, or `5.0` by a float gauge).
fn parse_count(value: &str) -> Option<u64> {
    value.parse().ok().or_else(|| value.strip_suffix(".0")?.parse().ok())
}

/// The samples of the metric `name` in Prometheus text: labels and value. Label values are our keyspace names
/// and reasons, without commas or quotes.
fn samples(text: &str, name: &str) -> Vec<(BTreeMap<String, String>, u64)> {
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            let (labels, value) = match rest.strip_prefix('{') {
                Some(rest) => rest.split_once('}')?,
                None if rest.starts_with(' ') => ("", rest),
                None => return None,
            };
            let labels = labels
                .split(',')
                .filter_map(|pair| {
                    let (k, v) = pair.split_once('=')?;
                    Some((k.trim().to_owned(), v.trim().trim_matches('"').to_owned()))
                })
                .collect();
            Some((labels, parse_count(value.split_whitespace().next()?)?))
        })
        .collect()
}

/// The sum of the samples of `name` whose labels include `labels`; 0 when there is none (a labelled counter
/// appears once it is first incremented).
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> u64 {
    samples(text, name)
        .into_iter()
        .filter(|(have, _)| labels.iter().all(|(k, v)| have.get(*k).is_some_and(|h| h == v)))
        .map(|(_, v)| v)
        .sum()
}

/// `distcache_circuit_state{keyspace}`: 0 closed, 1 open, 2 half-open; `None` while the node does not show it.
fn circuit_state(text: &str, keyspace: &str) -> Option<u64> {
    samples(text, "distcache_circuit_state")
        .into_iter()
        .find(|(labels, _)| labels.get("keyspace").is_some_and(|k| k == keyspace))
        .map(|(_, v)| v)
}

/// Fetches the owner made itself, waiting for them: every fetch minus the background ones.
fn blocking_fetches(text: &str, keyspace: &str) -> u64 {
    let all = metric(text, "distcache_source_fetches_total", &[("keyspace", keyspace)]);
    all - metric(text, "distcache_background_fetches_total", &[("keyspace", keyspace)]).min(all)
}

/// The entry of `keyspace` on `/admin/keyspaces` of a node (an error while the node does not serve it).
async fn keyspace_report(admin: SocketAddr, keyspace: &str) -> anyhow::Result<serde_json::Value> {
    let (status, body) = http_get(admin, "/admin/keyspaces").await?;
    anyhow::ensure!(status == 200, "/admin/keyspaces answered {status}: {body}");
    let report: serde_json::Value = serde_json::from_str(&body)?;
    report["keyspaces"]
        .as_array()
        .and_then(|all| all.iter().find(|k| k["name"] == keyspace))
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("{keyspace} not on /admin/keyspaces: {body}"))
}

/// The `stats` of `keyspace` on `/admin/keyspaces`.
async fn keyspace_stats(admin: SocketAddr, keyspace: &str) -> anyhow::Result<serde_json::Value> {
    Ok(keyspace_report(admin, keyspace).await?["stats"].clone())
}

/// Waits until the node counted as many fetches as the origin received: no fetch is in flight any more, so
/// `distcache_source_fetches_total` and `distcache_background_fetches_total` are final. (Every fetch of these
/// tests reaches the origin: none times out or is refused before it.)
async fn wait_fetches_settled(origin: &Origin, admin: SocketAddr, keyspace: &str) -> anyhow::Result<String> {
    wait_for(Duration::from_secs(10), "the node counted every fetch the origin received", || async move {
        let counted =
            metric(&scrape(admin).await?, "distcache_source_fetches_total", &[("keyspace", keyspace)]);
        Ok(counted == origin.total_hits())
    })
    .await?;
    scrape(admin).await
}

// ---------------------------------------------------------------------------------------------------------------
// 1. The circuit breaker.
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_opens_rejects_without_calling_the_origin_then_half_opens_and_recovers()
-> anyhow::Result<()> {
    const KS: &str = "guarded";
    const OPEN_FOR: Duration = Duration::from_secs(2);
    let all = keys("g", 200);
    let (_data, origin) = origin_with(&all).await?;
    let settings = "ttl: 5m\nfetchTimeout: 2s\n\
                    circuitBreaker: { failureRatio: 0.5, minimumRequests: 5, window: 10s, openFor: 2s }";
    let cluster = one_node(&keyspaces(&origin, KS, settings)?, KS).await?;
    let admin = cluster.nodes[0].admin;
    let c = client(cluster.nodes[0].grpc).await?;
    let next = AtomicUsize::new(0);
    let next_key = || all.get(next.fetch_add(1, Ordering::Relaxed)).cloned().unwrap_or_default();

    // The origin fails: reads fail UNAVAILABLE until the circuit opens, after at least minimumRequests fetches.
    origin.fail_with(Some(503));
    wait_for(Duration::from_secs(15), "the circuit to open (distcache_circuit_state 1)", || {
        let (mut c, key) = (c.clone(), next_key());
        async move {
            let status =
                read(&mut c, KS, &key).await.err().ok_or_else(|| anyhow::anyhow!("{key} was read"))?;
            anyhow::ensure!(status.code() == Code::Unavailable, "{key}: {status:?}");
            Ok(circuit_state(&scrape(admin).await?, KS) == Some(1))
        }
    })
    .await
    .map_err(|e| e.context(cluster.logs()))?;
    let failed_fetches = origin.requests();
    anyhow::ensure!(
        failed_fetches.len() >= 5,
        "opened after {} fetches, minimumRequests 5",
        failed_fetches.len()
    );
    assert_eq!(keyspace_stats(admin, KS).await?["circuit_state"], "open");
    // The circuit opened after the last fetch that reached the origin ended, so it stays open at least until
    // `open_until`: no request may reach the origin before then.
    let last_fetch = failed_fetches.last().map(|(at, _)| *at).ok_or_else(|| anyhow::anyhow!("no fetch"))?;
    let open_until = last_fetch + OPEN_FOR;

    // While open: reads fail at once, UNAVAILABLE, naming the open circuit. (Reads that end after `open_until`
    // may be probes; they are not judged here.)
    let mut c1 = c.clone();
    let mut rejected = 0u64;
    for _ in 0..20 {
        let key = next_key();
        let result = read(&mut c1, KS, &key).await;
        if Instant::now() >= open_until {
            break;
        }
        let status =
            result.err().ok_or_else(|| anyhow::anyhow!("{key} was read while the circuit is open"))?;
        assert_eq!(status.code(), Code::Unavailable, "{key}: {status:?}");
        assert!(
            status.message().contains("circuit open for keyspace") && status.message().contains(KS),
            "{key}: {:?}",
            status.message()
        );
        rejected += 1;
    }
    anyhow::ensure!(
        rejected >= 5,
        "only {rejected} reads made within openFor: the machine is too slow for this test"
    );
    let m = scrape(admin).await?;
    assert!(metric(&m, "distcache_circuit_rejected_total", &[("keyspace", KS)]) >= rejected);

    // Healed: after openFor a probe reaches the origin, succeeds, and the circuit closes.
    origin.fail_with(None);
    wait_for(
        Duration::from_secs(15),
        "a probe to close the circuit again (state 0) and reads to succeed",
        || {
            let (mut c, key) = (c.clone(), next_key());
            async move {
                let ok = match read(&mut c, KS, &key).await {
                    Ok((value, _)) => {
                        anyhow::ensure!(value == value_of(&key), "{key}: {value:?}");
                        true
                    }
                    Err(s) if s.code() == Code::Unavailable => false,
                    Err(s) => anyhow::bail!("{key}: {s:?}"),
                };
                Ok(ok && circuit_state(&scrape(admin).await?, KS) == Some(0))
            }
        },
    )
    .await
    .map_err(|e| e.context(cluster.logs()))?;
    let requests = origin.requests();
    let after_open = &requests[failed_fetches.len()..];
    let (probe_at, probe) =
        after_open.first().ok_or_else(|| anyhow::anyhow!("no probe reached the origin"))?;
    assert!(
        *probe_at >= open_until,
        "{probe} reached the origin {:?} after the circuit opened, before openFor ({OPEN_FOR:?}) passed",
        *probe_at - last_fetch
    );
    for _ in 0..3 {
        read_ok(&mut c1, KS, &next_key()).await?;
    }
    assert_eq!(circuit_state(&scrape(admin).await?, KS), Some(0));
    assert_eq!(keyspace_stats(admin, KS).await?["circuit_state"], "closed");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_missing_keys_never_opens_the_breaker() -> anyhow::Result<()> {
    const KS: &str = "missing";
    let (_data, origin) = origin_with(&[]).await?;
    let settings = "ttl: 5m\nnegativeTtl: 1m\nfetchTimeout: 2s\n\
                    circuitBreaker: { failureRatio: 0.5, minimumRequests: 5, window: 10s, openFor: 2s }";
    let cluster = one_node(&keyspaces(&origin, KS, settings)?, KS).await?;
    let admin = cluster.nodes[0].admin;
    let c = client(cluster.nodes[0].grpc).await?;
    let missing = keys("absent-", 200);
    // 200 distinct missing keys, 20 at a time; the state is checked after each 20.
    for chunk in missing.chunks(20) {
        let reads = chunk.iter().map(|key| {
            let mut c = c.clone();
            async move { (key, read(&mut c, KS, key).await) }
        });
        for (key, result) in futures::future::join_all(reads).await {
            let status = result.err().ok_or_else(|| anyhow::anyhow!("{key} was found"))?;
            assert_eq!(status.code(), Code::NotFound, "{key}: {status:?}");
        }
        let state = circuit_state(&scrape(admin).await?, KS);
        assert!(matches!(state, None | Some(0)), "circuit state {state:?} after NOT_FOUND answers");
    }
    assert_eq!(origin.total_hits(), 200, "every missing key reached the origin once");
    let m = scrape(admin).await?;
    assert_eq!(
        metric(&m, "distcache_source_fetches_total", &[("keyspace", KS), ("result", "not_found")]),
        200
    );
    assert_eq!(metric(&m, "distcache_circuit_rejected_total", &[("keyspace", KS)]), 0);
    assert_eq!(circuit_state(&m, KS), Some(0), "the breaker's gauge is shown, closed");
    assert_eq!(keyspace_stats(admin, KS).await?["circuit_state"], "closed");
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------------
// 2. The rate limit.
// ---------------------------------------------------------------------------------------------------------------

/// The most origin requests that arrived within any one second (a window starting at each request).
fn busiest_second(log: &[(Instant, String)]) -> usize {
    (0..log.len())
        .map(|i| log[i..].iter().take_while(|(at, _)| *at < log[i].0 + Duration::from_secs(1)).count())
        .max()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_caps_the_request_rate_the_origin_sees() -> anyhow::Result<()> {
    const KS: &str = "limited";
    const RATE: usize = 20;
    const BURST: usize = 5;
    const READERS: usize = 16;
    const MAX_READS: usize = 2000;
    const RUN: Duration = Duration::from_secs(3);
    let all = keys("r", MAX_READS);
    let (_data, origin) = origin_with(&all).await?;
    // A short fetchTimeout: a fetch waits that long for a token, then fails RESOURCE_EXHAUSTED.
    let settings =
        format!("ttl: 5m\nfetchTimeout: 250ms\nrateLimit: {{ fetchesPerSecond: {RATE}, burst: {BURST} }}");
    let cluster = one_node(&keyspaces(&origin, KS, &settings)?, KS).await?;
    let c = client(cluster.nodes[0].grpc).await?;

    // Concurrent readers of distinct keys (every read is a miss) for RUN, at most MAX_READS reads in all.
    let all = Arc::new(all);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let readers: Vec<_> = (0..READERS)
        .map(|_| {
            let (mut c, all, next) = (c.clone(), Arc::clone(&all), Arc::clone(&next));
            tokio::spawn(async move {
                let mut outcomes = Vec::new();
                while started.elapsed() < RUN {
                    let Some(key) = all.get(next.fetch_add(1, Ordering::Relaxed)) else { break };
                    let outcome = read(&mut c, KS, key).await.map(|(value, _)| value == value_of(key));
                    outcomes.push((key.clone(), outcome));
                }
                outcomes
            })
        })
        .collect();
    let (mut ok, mut exhausted, mut deadline) = (0u64, 0u64, 0u64);
    for reader in readers {
        for (key, outcome) in reader.await? {
            match outcome {
                Ok(true) => ok += 1,
                Ok(false) => anyhow::bail!("{key}: wrong value"),
                Err(s) if s.code() == Code::ResourceExhausted => {
                    let message = s.message();
                    assert!(
                        message.contains(&format!("source fetch rate limit ({RATE}/s) reached"))
                            && message.contains(KS),
                        "{message:?}"
                    );
                    exhausted += 1;
                }
                // A token granted near the end of the wait leaves too little of fetchTimeout for the fetch.
                Err(s) if s.code() == Code::DeadlineExceeded => deadline += 1,
                Err(s) => anyhow::bail!("{key}: unexpected failure {s:?}"),
            }
        }
    }

    let log = origin.requests();
    let busiest = busiest_second(&log);
    eprintln!(
        "rate limit {RATE}/s burst {BURST}: {ok} reads ok, {exhausted} RESOURCE_EXHAUSTED, {deadline} DEADLINE_EXCEEDED; \
         {} origin requests, busiest second {busiest}",
        log.len()
    );
    // A token bucket of BURST tokens refilled at RATE/s grants at most BURST + RATE fetches in any second. The
    // origin stamps arrivals, not grants: a fetch granted just before a window may arrive just inside it,
    // delayed by up to one token interval (50 ms) of scheduling and connection latency, hence +1.
    assert!(
        busiest <= RATE + BURST + 1,
        "{busiest} origin requests within one second, limit {RATE}/s + {BURST}"
    );
    assert!(log.len() >= RATE, "only {} fetches reached the origin in {RUN:?}: the limit starves", log.len());
    assert!(exhausted > 0, "no read was refused by the rate limit ({ok} ok)");
    let m = scrape(cluster.nodes[0].admin).await?;
    assert_eq!(metric(&m, "distcache_rate_limited_total", &[("keyspace", KS)]), exhausted);
    assert_eq!(keyspace_stats(cluster.nodes[0].admin, KS).await?["rate_limited"], exhausted);
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------------
// 3. Stale serving and refresh ahead.
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_if_error_answers_every_read_during_an_outage() -> anyhow::Result<()> {
    const KS: &str = "outage";
    const TTL: Duration = Duration::from_secs(1);
    const OUTAGE: Duration = Duration::from_secs(20);
    // Past TTL by this much, an entry is expired by any clock the node may use for it (its cache's own clock
    // may tick a little apart from ours).
    const MARGIN: Duration = Duration::from_millis(50);
    let cached = keys("o", 10);
    let (_data, origin) = origin_with(&cached).await?;
    // No circuit breaker here: every read during the outage tries the origin and falls back on its stale value.
    let cluster =
        one_node(&keyspaces(&origin, KS, "ttl: 1s\nstaleIfError: 1m\nfetchTimeout: 2s")?, KS).await?;
    let admin = cluster.nodes[0].admin;
    let mut c = client(cluster.nodes[0].grpc).await?;
    let mut loaded = HashMap::new();
    for key in &cached {
        anyhow::ensure!(!read_ok(&mut c, KS, key).await?, "{key}: stale on its first load");
        loaded.insert(key.clone(), Instant::now());
    }

    // The outage: every key read in turn every 100 ms, for OUTAGE (at most 200 rounds).
    origin.fail_with(Some(503));
    let outage = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_millis(100));
    let (mut reads, mut stale, mut failures) = (0u64, 0u64, Vec::new());
    for _ in 0..200 {
        ticker.tick().await;
        if outage.elapsed() >= OUTAGE {
            break;
        }
        for key in &cached {
            let asked = Instant::now();
            reads += 1;
            match read(&mut c, KS, key).await {
                Ok((value, is_stale)) => {
                    assert_eq!(value, value_of(key), "{key}");
                    // Its entry expired at most TTL after the read that loaded it returned.
                    let expired = asked >= loaded[key] + TTL + MARGIN;
                    assert!(
                        !expired || is_stale,
                        "{key} answered fresh {:?} after it was loaded",
                        asked - loaded[key]
                    );
                    stale += u64::from(is_stale);
                }
                Err(s) => failures.push(format!("{key} at +{:?}: {s:?}", outage.elapsed())),
            }
        }
    }
    eprintln!(
        "stale-if-error: {reads} reads during a {OUTAGE:?} outage, {stale} stale, {} failed",
        failures.len()
    );
    assert!(failures.is_empty(), "reads failed during the outage: {failures:?}");
    assert!(stale > 0, "no stale answer in {reads} reads");
    let m = scrape(admin).await?;
    assert_eq!(
        metric(&m, "distcache_stale_served_total", &[("keyspace", KS), ("reason", "source_error")]),
        stale,
        "every stale answer counted, for the source error"
    );
    assert_eq!(keyspace_stats(admin, KS).await?["stale_served"], stale);

    // The origin is back: the next read fetches a fresh value.
    origin.fail_with(None);
    assert!(!read_ok(&mut c, KS, &cached[0]).await?, "fresh once the origin answers again");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_while_revalidate_never_makes_a_reader_wait_for_the_origin() -> anyhow::Result<()> {
    const KS: &str = "swr";
    let cached = keys("s", 10);
    let (_data, origin) = origin_with(&cached).await?;
    origin.set_delay(Duration::from_millis(300));
    let settings = "ttl: 1s\nstaleWhileRevalidate: 30s\nfetchTimeout: 2s";
    let cluster = one_node(&keyspaces(&origin, KS, settings)?, KS).await?;
    let admin = cluster.nodes[0].admin;
    let c = client(cluster.nodes[0].grpc).await?;

    // The first loads, at once: N blocking fetches.
    let loads = cached.iter().map(|key| {
        let mut c = c.clone();
        async move { read_ok(&mut c, KS, key).await }
    });
    for stale in futures::future::try_join_all(loads).await? {
        anyhow::ensure!(!stale, "stale on the first load");
    }
    // Expired: the first key is answered stale (and revalidated in the background).
    let stale_polls = AtomicU64::new(0);
    wait_for(Duration::from_secs(10), "the first key answered stale", || {
        let (mut c, stale_polls, first) = (c.clone(), &stale_polls, &cached[0]);
        async move {
            let is_stale = read_ok(&mut c, KS, first).await?;
            stale_polls.fetch_add(u64::from(is_stale), Ordering::Relaxed);
            Ok(is_stale)
        }
    })
    .await?;
    let mut stale = stale_polls.load(Ordering::Relaxed);
    let mut c = c.clone();
    // Every key read every 100 ms for 4 s: several TTLs, each key expiring and being revalidated again and again.
    let mut ticker = tokio::time::interval(Duration::from_millis(100));
    for _ in 0..40 {
        ticker.tick().await;
        for key in &cached {
            stale += u64::from(read_ok(&mut c, KS, key).await?);
        }
    }

    let m = wait_fetches_settled(&origin, admin, KS).await?;
    let background =
        metric(&m, "distcache_background_fetches_total", &[("keyspace", KS), ("reason", "revalidate")]);
    eprintln!(
        "stale-while-revalidate: {} origin requests, {} blocking, {background} revalidations, {stale} stale answers",
        origin.total_hits(),
        blocking_fetches(&m, KS)
    );
    assert_eq!(blocking_fetches(&m, KS), 10, "only the first loads made a reader wait for the origin");
    assert!(background >= 10, "every key was revalidated at least once ({background})");
    assert_eq!(
        metric(&m, "distcache_stale_served_total", &[("keyspace", KS), ("reason", "revalidate")]),
        stale,
        "every stale answer counted, for revalidation"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_ahead_keeps_a_read_key_from_ever_expiring() -> anyhow::Result<()> {
    const KS: &str = "ahead";
    const KEY: &str = "popular";
    let (_data, origin) = origin_with(&[KEY.to_owned()]).await?;
    let cluster =
        one_node(&keyspaces(&origin, KS, "ttl: 2s\nrefreshAhead: 0.5\nfetchTimeout: 2s")?, KS).await?;
    let admin = cluster.nodes[0].admin;
    let mut c = client(cluster.nodes[0].grpc).await?;

    // One read every 50 ms for 6 s (three TTLs; at most 150 reads).
    let started = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_millis(50));
    let mut reads = 0;
    while started.elapsed() < Duration::from_secs(6) && reads < 150 {
        ticker.tick().await;
        let stale = read_ok(&mut c, KS, KEY).await?;
        assert!(!stale, "read {reads} at +{:?} answered stale", started.elapsed());
        reads += 1;
    }

    let m = wait_fetches_settled(&origin, admin, KS).await?;
    let requests = origin.hits(&format!("/items/{KEY}"));
    let refreshes =
        metric(&m, "distcache_background_fetches_total", &[("keyspace", KS), ("reason", "refresh_ahead")]);
    eprintln!("refresh-ahead: {reads} reads, {requests} origin requests, {refreshes} refreshes ahead");
    assert_eq!(
        metric(&m, "distcache_cache_misses_total", &[("keyspace", KS)]),
        1,
        "only the first read missed"
    );
    // Refreshed once the entry is half its TTL old, i.e. at most once a second: 1 load + at most 6 refreshes
    // (+1 at the edge). Without a miss in 6 s of a 2 s TTL, at least 2 refreshes.
    assert!((3..=8).contains(&requests), "{requests} origin requests for the key");
    assert_eq!(refreshes, requests - 1, "every request after the first load is a refresh ahead");
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------------
// 4. Warm-up.
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_up_loads_each_listed_key_once_across_the_cluster() -> anyhow::Result<()> {
    const KS: &str = "warm";
    const ALL: [&str; 3] = ["node-1", "node-2", "node-3"];
    let listed = keys("w", 12);
    let (_data, origin) = origin_with(&listed).await?;
    let settings = format!(
        "ttl: 10m\nfetchTimeout: 2s\nwarmUp: {{ keys: [{}], fetchesPerSecond: 50 }}",
        listed.join(", ")
    );
    // One event loop per node (`workerThreads: 1`): warm-up, its rate limit and the peer loads share it.
    let cluster = ProcCluster::start(3, &keyspaces(&origin, KS, &settings)?, "workerThreads: 1")?;
    cluster.wait_views(&[0, 1, 2], &ALL, Duration::from_secs(30)).await?;
    wait_serving(&cluster, KS).await?;

    let mut reports = Vec::new();
    for node in &cluster.nodes {
        let last = RefCell::new(serde_json::Value::Null);
        let waited =
            wait_for(Duration::from_secs(30), &format!("{} to finish its warm-up", node.name), || async {
                let warm_up = keyspace_stats(node.admin, KS).await?["warm_up"].clone();
                let done = warm_up["done"] == true;
                *last.borrow_mut() = warm_up;
                Ok(done)
            })
            .await;
        let last = last.into_inner();
        waited.map_err(|e| e.context(format!("last warm_up {last}\n{}", cluster.logs())))?;
        reports.push(last);
    }
    let mut owned = 0;
    for (node, report) in cluster.nodes.iter().zip(&reports) {
        let count = |field: &str| {
            report[field]
                .as_u64()
                .ok_or_else(|| anyhow::anyhow!("{}: no warm_up.{field} in {report}", node.name))
        };
        assert_eq!(count("listed")?, 12, "{}: {report}", node.name);
        assert_eq!(count("failed")?, 0, "{}: {report}", node.name);
        assert_eq!(
            count("loaded")? + count("present")?,
            count("owned")?,
            "{}: every key it owns is loaded: {report}",
            node.name
        );
        owned += count("owned")?;
    }
    assert_eq!(owned, 12, "each listed key has one owner: {reports:?}");

    // The origin saw exactly the listed keys, each once.
    let mut requested: Vec<String> = origin.requests().into_iter().map(|(_, path)| path).collect();
    requested.sort();
    let mut expected: Vec<String> = listed.iter().map(|k| format!("/items/{k}")).collect();
    expected.sort();
    assert_eq!(requested, expected, "origin requests of the warm-up\n{}", cluster.logs());
    let mut warm_ups = 0;
    for node in &cluster.nodes {
        let m = scrape(node.admin).await?;
        warm_ups +=
            metric(&m, "distcache_background_fetches_total", &[("keyspace", KS), ("reason", "warm_up")]);
    }
    assert_eq!(warm_ups, 12, "warm-up fetches counted as background fetches");

    // Reading them through any node reaches the origin no more.
    for node in &cluster.nodes {
        let mut c = client(node.grpc).await?;
        for key in &listed {
            read_ok(&mut c, KS, key).await?;
        }
    }
    assert_eq!(origin.total_hits(), 12, "reads after the warm-up reached the origin");
    Ok(())
}
