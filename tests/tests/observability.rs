//! Observability. Traces across nodes, the hook and the origin: real `distcache-node` processes exporting over OTLP/gRPC to an
//! in-process collector (`distcache_tests::otlp`), the `http-json` hook reading from the in-process origin.
//!
//! - [`a_cold_get_through_a_non_owner_is_one_trace_from_the_caller_to_the_origin`]: the caller's `traceparent`
//!   is continued by the Cache/Get span of the node it asked, which forwards to the owner (Peer/Load), whose
//!   single flight fetches through the hook; the hook's HTTP request carries the same trace to the origin. Every
//!   span is the child of the one before, and the key is not recorded (`recordKeys` off). The nodes log JSON
//!   lines, and a warning logged inside a traced request carries its `trace_id` and `span_id`.
//! - [`a_dead_collector_costs_no_read_and_is_said_once`]: with the exporter pointed at a closed port, every read
//!   succeeds and the node says once that it cannot export, also after more failed exports at its stop.
//! - [`the_dashboard_and_the_alerts_query_metrics_a_node_serves`]: the chart's Grafana dashboard parses, every
//!   panel has a query, and every metric family the dashboard and the PrometheusRule name is on a running node's
//!   `/metrics`.
//!
//! Run after `cargo build -p distcache-node --bins`, with the `wasm32-wasip2` target installed.

use std::time::Duration;

use distcache_proto::v1::GetRequest;
use distcache_tests::{hook_module, origin::serving_items, otlp::Collector, procs::ProcCluster, wait_for};

/// The caller's own trace: a fixed trace id and parent span id, sampled.
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

fn keyspaces(origin_url: &str, origin_addr: std::net::SocketAddr) -> anyhow::Result<String> {
    Ok(format!(
        "keyspaces:\n  - name: users\n    maxBytes: 16Mi\n    hook:\n      module: {{ path: \"{module}\" }}\n      \
         config: {{ baseUrl: \"{origin_url}/items\" }}\n      allowedHosts: [\"{origin_addr}\"]\n",
        module = hook_module("http_json")?.display(),
    ))
}

#[tokio::test]
async fn a_cold_get_through_a_non_owner_is_one_trace_from_the_caller_to_the_origin() -> anyhow::Result<()> {
    let keys: Vec<String> = (0..64).map(|i| format!("user{i}")).collect();
    let (_data, origin) = serving_items(&keys, |key| format!("{{\"id\":\"{key}\"}}").into_bytes()).await?;
    let collector = Collector::start().await?;
    let extra = format!(
        "tracing: {{ otlpEndpoint: \"{}\", sampleRatio: 1.0 }}\nlog: {{ format: json }}",
        collector.url()
    );
    let cluster = ProcCluster::start(2, &keyspaces(&origin.url(), origin.addr)?, &extra)?;
    cluster.wait_views(&[0, 1], &["node-1", "node-2"], Duration::from_secs(30)).await?;
    // A key node 2 owns, asked of node 1.
    let key =
        keys.iter().find(|k| cluster.owner_of(k) == 1).ok_or_else(|| anyhow::anyhow!("no key on node 2"))?;
    let mut client = distcache_tests::client(cluster.nodes[0].grpc).await?;
    let mut request = tonic::Request::new(GetRequest { keyspace: "users".into(), key: key.clone() });
    request.metadata_mut().insert("traceparent", format!("00-{TRACE_ID}-{CALLER_SPAN}-01").parse()?);
    let got = wait_for(Duration::from_secs(30), "the hook to be loaded", || {
        let mut client = client.clone();
        let request = GetRequest { keyspace: "users".into(), key: "warm-up-never-read".into() };
        async move {
            Ok(!matches!(client.get(request).await, Err(s) if s.code() == tonic::Code::FailedPrecondition))
        }
    })
    .await;
    got.map_err(|e| e.context(cluster.logs()))?;
    let value = client.get(request).await.map_err(|s| anyhow::anyhow!("{s:?}\n{}", cluster.logs()))?;
    assert_eq!(value.into_inner().value, format!("{{\"id\":\"{key}\"}}").into_bytes());

    // The chain, from the caller's span down to the hook's HTTP request.
    let chain = [
        "distcache.Cache/Get",
        "distcache.forward",
        "distcache.Peer/Load",
        "distcache.singleflight",
        "distcache.source.fetch",
        "distcache.hook.http",
    ];
    let waited = wait_for(Duration::from_secs(30), "the spans of the Get at the collector", || async {
        let spans = collector.spans();
        Ok(chain.iter().all(|name| spans.iter().any(|s| s.trace_id == TRACE_ID && s.name == *name)))
    })
    .await;
    waited.map_err(|e| e.context(format!("spans: {:#?}\n{}", collector.spans(), cluster.logs())))?;
    let spans: Vec<_> = collector.spans().into_iter().filter(|s| s.trace_id == TRACE_ID).collect();
    let mut parent = CALLER_SPAN.to_owned();
    for name in chain {
        let matching: Vec<_> = spans.iter().filter(|s| s.name == name).collect();
        assert_eq!(matching.len(), 1, "one {name} span in the trace: {spans:#?}");
        let span = matching[0];
        assert_eq!(span.parent_span_id, parent, "{name} is the child of the span before it: {spans:#?}");
        assert_eq!(span.service, "distcache-node");
        parent = span.span_id.clone();
    }
    let get = spans.iter().find(|s| s.name == "distcache.Cache/Get").expect("found above");
    assert_eq!(get.attributes.get("distcache.keyspace").map(String::as_str), Some("users"));
    assert_eq!(get.attributes.get("distcache.outcome").map(String::as_str), Some("forwarded"));
    assert!(!get.attributes.contains_key("distcache.key"), "keys are not recorded by default: {get:?}");
    let forward = spans.iter().find(|s| s.name == "distcache.forward").expect("found above");
    assert_eq!(forward.attributes.get("distcache.owner").map(String::as_str), Some("node-2"));

    // The origin saw the same trace, as the child of the hook's HTTP span.
    let http = spans.iter().find(|s| s.name == "distcache.hook.http").expect("found above");
    let path = format!("/items/{key}");
    let seen: Vec<_> =
        origin.traceparents().into_iter().filter(|(p, _)| *p == path).map(|(_, t)| t).collect();
    assert_eq!(
        seen,
        vec![format!("00-{TRACE_ID}-{}-01", http.span_id)],
        "traceparents at the origin: {:?}, requests {:?}",
        origin.traceparents(),
        origin.requests()
    );

    // A log line inside a traced request carries its ids: the hook's warning about an origin error, on the owner.
    let failing = keys
        .iter()
        .find(|k| cluster.owner_of(k) == 1 && *k != key)
        .ok_or_else(|| anyhow::anyhow!("no second key on node 2"))?;
    origin.fail_next(1, 418);
    let mut request = tonic::Request::new(GetRequest { keyspace: "users".into(), key: failing.clone() });
    let other_trace = "0af7651916cd43dd8448eb211c80319c";
    request.metadata_mut().insert("traceparent", format!("00-{other_trace}-{CALLER_SPAN}-01").parse()?);
    let _ = client.get(request).await;
    let warned = wait_for(Duration::from_secs(30), "the hook's warning in the owner's JSON log", || async {
        Ok(cluster.nodes[1].log_text().lines().any(|line| {
            serde_json::from_str::<serde_json::Value>(line).is_ok_and(|v| {
                v["message"].as_str().is_some_and(|m| m.contains("unexpected status 418"))
                    && v["trace_id"] == other_trace
                    && v["span_id"].as_str().is_some_and(|id| id.len() == 16)
            })
        }))
    })
    .await;
    warned.map_err(|e| e.context(cluster.logs()))?;
    // Every line of the log is one JSON object.
    for line in cluster.nodes[0].log_text().lines().filter(|l| !l.trim().is_empty()) {
        serde_json::from_str::<serde_json::Value>(line).map_err(|e| anyhow::anyhow!("{e}: {line}"))?;
    }
    Ok(())
}

#[tokio::test]
async fn a_dead_collector_costs_no_read_and_is_said_once() -> anyhow::Result<()> {
    let keys: Vec<String> = (0..20).map(|i| format!("user{i}")).collect();
    let (_data, origin) = serving_items(&keys, |key| key.as_bytes().to_vec()).await?;
    // A port nothing listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let extra = format!("tracing: {{ otlpEndpoint: \"http://{dead}\", sampleRatio: 1.0 }}");
    let mut cluster = ProcCluster::start(1, &keyspaces(&origin.url(), origin.addr)?, &extra)?;
    cluster.wait_views(&[0], &["node-1"], Duration::from_secs(30)).await?;
    let mut client = distcache_tests::client(cluster.nodes[0].grpc).await?;
    let said = "traces: cannot export";
    let log = || cluster.nodes[0].log_text();
    let read_all = |mut client: distcache_proto::v1::cache_client::CacheClient<tonic::transport::Channel>| {
        let keys = keys.clone();
        async move {
            for key in &keys {
                let value = client.get(GetRequest { keyspace: "users".into(), key: key.clone() }).await?;
                anyhow::ensure!(value.into_inner().value == key.as_bytes(), "{key}: wrong value");
            }
            anyhow::Ok(())
        }
    };
    // Reads succeed while the exports fail, until the node has said so.
    let waited = wait_for(Duration::from_mins(1), "the node to say it cannot export", || {
        let client = client.clone();
        async move {
            read_all(client).await?;
            Ok(log().contains(said))
        }
    })
    .await;
    waited.map_err(|e| e.context(cluster.logs()))?;
    read_all(client.clone()).await?;
    let _ = client.get(GetRequest { keyspace: "users".into(), key: keys[0].clone() }).await?;
    // The stop exports what is queued (and fails again): still said once.
    cluster.nodes[0].stop(Duration::from_secs(30)).await?;
    let log = cluster.nodes[0].log_text();
    assert_eq!(log.matches(said).count(), 1, "said once:\n{log}");
    Ok(())
}

/// The metric families a query names (`distcache_…`), without the `_total`, `_bucket`, `_sum` and `_count` of
/// their series.
fn families_in(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("distcache_") {
        let tail = &rest[at..];
        let end = tail.find(|c: char| !(c.is_ascii_lowercase() || c == '_')).unwrap_or(tail.len());
        let name = &tail[..end];
        let family = ["_total", "_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(name);
        names.insert(family.to_owned());
        rest = &tail[end..];
    }
    names
}

#[tokio::test]
async fn the_dashboard_and_the_alerts_query_metrics_a_node_serves() -> anyhow::Result<()> {
    let chart = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/distcache");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(chart.join("dashboards/distcache.json"))?)?;
    let panels = dashboard["panels"].as_array().ok_or_else(|| anyhow::anyhow!("no panels"))?;
    let mut ids = std::collections::BTreeSet::new();
    let mut queries = String::new();
    for panel in panels {
        anyhow::ensure!(ids.insert(panel["id"].as_u64()), "panel ids are unique: {panel}");
        let targets = panel["targets"].as_array().ok_or_else(|| anyhow::anyhow!("no targets in {panel}"))?;
        anyhow::ensure!(!targets.is_empty(), "{} has no query", panel["title"]);
        for target in targets {
            let expr = target["expr"].as_str().unwrap_or_default();
            anyhow::ensure!(
                expr.contains("distcache_"),
                "{}: {expr:?} queries no DistCache metric",
                panel["title"]
            );
            queries.push_str(expr);
            queries.push('\n');
        }
    }
    for want in [
        "distcache_requests_total",
        "distcache_cache_hits_total",
        "distcache_source_fetch_seconds_bucket",
        "distcache_hook_traps_total",
        "distcache_members",
        "distcache_evictions_total",
        "distcache_bytes",
    ] {
        anyhow::ensure!(queries.contains(want), "the dashboard shows {want}");
    }
    let alerts = std::fs::read_to_string(chart.join("templates/monitoring.yaml"))?;

    let cluster = ProcCluster::start(1, "keyspaces:\n  - name: users\n    maxBytes: 1Mi\n", "")?;
    cluster.wait_views(&[0], &["node-1"], Duration::from_secs(30)).await?;
    let (status, metrics) = distcache_tests::http_get(cluster.nodes[0].admin, "/metrics").await?;
    anyhow::ensure!(status == 200, "/metrics answered {status}");
    let served: std::collections::BTreeSet<String> = metrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    for (what, text) in [("the dashboard", &queries), ("the alerts", &alerts)] {
        let missing: Vec<_> = families_in(text).into_iter().filter(|f| !served.contains(f)).collect();
        assert!(
            missing.is_empty(),
            "{what} query metrics a node does not serve: {missing:?}\nserved: {served:?}"
        );
    }
    Ok(())
}
