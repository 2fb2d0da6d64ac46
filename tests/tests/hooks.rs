//! WebAssembly data-source hooks in real nodes: the example `http-json` hook against a real local HTTP origin,
//! and deliberately misbehaving hooks (built from `hooks/` during the test run), each of which must end in its
//! typed error within its limit while other keyspaces on the same node keep answering.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use distcache_proto::v1::{GetManyRequest, GetRequest, key_result::Outcome};
use distcache_tests::{Cluster, hook_module, http_get, origin::Origin, wait_for};
use tonic::Code;

fn get(ks: &str, key: &str) -> GetRequest {
    GetRequest { keyspace: ks.into(), key: key.into() }
}

/// A data directory for the origin: `users/<id>.json` for ids 1..=20.
fn origin_data() -> anyhow::Result<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    std::fs::create_dir_all(dir.path().join("users"))?;
    for id in 1..=20 {
        std::fs::write(
            dir.path().join("users").join(format!("{id}.json")),
            format!("{{\"id\":{id},\"name\":\"user {id}\"}}"),
        )?;
    }
    Ok(dir)
}

fn user_json(id: u32) -> Vec<u8> {
    format!("{{\"id\":{id},\"name\":\"user {id}\"}}").into_bytes()
}

/// Starts a cluster whose hook artifacts are cached in `cache`.
async fn cluster(n: usize, keyspaces: &str, cache: &Path) -> anyhow::Result<Cluster> {
    let cache = cache.to_owned();
    Cluster::start_with(n, keyspaces, Duration::ZERO, move |c| c.hooks.cache_dir = Some(cache.clone())).await
}

fn test_hook() -> anyhow::Result<String> {
    Ok(hook_module("distcache_test_hook")?.display().to_string())
}

fn http_json() -> anyhow::Result<String> {
    Ok(hook_module("http_json")?.display().to_string())
}

async fn metrics(admin: SocketAddr) -> anyhow::Result<String> {
    Ok(http_get(admin, "/metrics").await?.1)
}

/// The value of a metric line that starts with `prefix` (labels included), 0 when absent.
fn metric(text: &str, prefix: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_json_hook_reads_through_from_a_real_origin() -> anyhow::Result<()> {
    let data = origin_data()?;
    let origin = Origin::start("127.0.0.1:0".parse()?, data.path()).await?;
    let cache = tempfile::tempdir()?;
    let keyspaces = format!(
        r#"keyspaces:
  - name: users
    maxBytes: 16Mi
    ttl: 5m
    negativeTtl: 2s
    fetchTimeout: 3s
    hook:
      module: {{ path: "{module}" }}
      config: {{ baseUrl: "{base}/users" }}
      allowedHosts: ["{host}"]
  - name: flaky
    maxBytes: 1Mi
    hook:
      module: {{ path: "{module}" }}
      config: {{ baseUrl: "{base}/status/503" }}
      allowedHosts: ["{host}"]
"#,
        module = http_json()?,
        base = origin.url(),
        host = origin.addr,
    );
    let cluster = cluster(3, &keyspaces, cache.path()).await?;
    let mut clients = Vec::new();
    for i in 0..3 {
        clients.push(cluster.client(i).await?);
    }

    // Every key read through every node: the origin sees one request per key.
    for id in 1..=10u32 {
        for c in &mut clients {
            let v = c.get(get("users", &id.to_string())).await?.into_inner();
            assert_eq!(v.value, user_json(id), "user {id}");
        }
        assert_eq!(origin.hits(&format!("/users/{id}")), 1, "user {id}: one origin request for 3 nodes");
    }

    // 404 → NOT_FOUND, cached for negativeTtl: the second Get does not reach the origin.
    for _ in 0..2 {
        for c in &mut clients {
            let err = c.get(get("users", "404")).await.expect_err("missing user");
            assert_eq!(err.code(), Code::NotFound, "{err:?}");
        }
    }
    assert_eq!(origin.hits("/users/404"), 1, "NOT_FOUND is negatively cached");

    // 5xx → UNAVAILABLE, not cached: every Get tries again.
    for attempt in 1..=2 {
        let err = clients[0].get(get("flaky", "k")).await.expect_err("origin fails");
        assert_eq!(err.code(), Code::Unavailable, "{err:?}");
        assert!(err.message().contains("503"), "{}", err.message());
        assert_eq!(origin.hits("/status/503/k"), attempt, "failures are not cached");
    }

    // The owner counted its fetches by result.
    let mut ok = 0;
    let mut not_found = 0;
    for n in &cluster.nodes {
        let m = metrics(n.admin).await?;
        ok += metric(&m, "distcache_source_fetches_total{keyspace=\"users\",result=\"ok\"}");
        not_found += metric(&m, "distcache_source_fetches_total{keyspace=\"users\",result=\"not_found\"}");
    }
    assert_eq!((ok, not_found), (10, 1));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_misses_call_fetch_many_once() -> anyhow::Result<()> {
    let cache = tempfile::tempdir()?;
    let keyspaces = format!(
        r#"keyspaces:
  - name: echo
    maxBytes: 16Mi
    hook:
      module: {{ path: "{module}" }}
      config: {{ mode: echo, prefix: "v:" }}
"#,
        module = test_hook()?,
    );
    let cluster = cluster(1, &keyspaces, cache.path()).await?;
    let mut c = cluster.client(0).await?;
    let keys: Vec<String> = (0..50).map(|i| format!("key-{i}")).collect();
    let res = c.get_many(GetManyRequest { keyspace: "echo".into(), keys: keys.clone() }).await?.into_inner();
    for (key, r) in keys.iter().zip(&res.results) {
        assert_eq!(&r.key, key);
        match &r.outcome {
            Some(Outcome::Value(v)) => assert_eq!(v.value, format!("v:{key}").into_bytes()),
            other => panic!("{key}: {other:?}"),
        }
    }
    let m = metrics(cluster.nodes[0].admin).await?;
    assert_eq!(metric(&m, "distcache_hook_calls_total{keyspace=\"echo\",export=\"fetch-many\"}"), 1, "{m}");
    assert_eq!(metric(&m, "distcache_hook_calls_total{keyspace=\"echo\",export=\"fetch\"}"), 0);
    // A second GetMany is served from memory.
    c.get_many(GetManyRequest { keyspace: "echo".into(), keys }).await?;
    let m = metrics(cluster.nodes[0].admin).await?;
    assert_eq!(metric(&m, "distcache_hook_calls_total{keyspace=\"echo\",export=\"fetch-many\"}"), 1);
    Ok(())
}

/// What a background reader saw: successful reads and the failures.
type Reader = tokio::task::JoinHandle<anyhow::Result<(u64, Vec<String>)>>;

/// Reads `echo` until stopped, counting successes and failures: proves a keyspace keeps answering while
/// another keyspace's hook misbehaves on the same node.
fn keep_reading(cluster: &Cluster, stop: Arc<AtomicBool>) -> Reader {
    let addr = cluster.nodes[0].grpc;
    tokio::spawn(async move {
        let mut c = distcache_tests::client(addr).await?;
        let mut ok = 0u64;
        let mut failures = Vec::new();
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) {
            i += 1;
            // Fresh keys: every read is a miss served by the echo hook.
            match c.get(get("echo", &format!("alive-{i}"))).await {
                Ok(_) => ok += 1,
                Err(e) => failures.push(format!("{e:?}")),
            }
        }
        Ok((ok, failures))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_hooks_end_in_typed_errors_while_other_keyspaces_keep_answering() -> anyhow::Result<()> {
    let data = origin_data()?;
    let origin = Origin::start("127.0.0.1:0".parse()?, data.path()).await?;
    // A second server that no hook may reach.
    let forbidden = Origin::start("127.0.0.1:0".parse()?, data.path()).await?;
    let cache = tempfile::tempdir()?;
    let module = test_hook()?;
    let ks = |name: &str, config: &str, limits: &str| {
        format!(
            "  - name: {name}\n    maxBytes: 16Mi\n    maxValueBytes: 1Mi\n    fetchTimeout: 20s\n    hook:\n      \
             module: {{ path: \"{module}\" }}\n      config: {config}\n      allowedHosts: [\"{}\"]\n      \
             limits: {limits}\n",
            origin.addr
        )
    };
    let base = origin.url();
    let mut keyspaces = String::from("keyspaces:\n");
    keyspaces += &ks("echo", "{ mode: echo }", "{ poolSize: 4 }");
    keyspaces += &ks("spin-fuel", "{ mode: loop }", "{ fuel: 20000000, timeout: 10s }");
    keyspaces += &ks("spin-time", "{ mode: loop }", "{ fuel: 1000000000000000, timeout: 400ms }");
    keyspaces += &ks("hog", "{ mode: memory }", "{ memory: 16Mi }");
    keyspaces += &ks("crash", "{ mode: panic }", "{}");
    keyspaces += &ks("huge", "{ mode: oversized, bytes: \"4194304\" }", "{}");
    keyspaces +=
        &ks("escape", &format!("{{ mode: egress, url: \"http://{}/users/{{key}}\" }}", forbidden.addr), "{}");
    keyspaces += &ks(
        "bounce",
        &format!("{{ mode: egress, url: \"{base}/redirect/x?to=http://{}/users/1\" }}", forbidden.addr),
        "{}",
    );
    keyspaces += &ks(
        "vhost",
        &format!("{{ mode: egress, url: \"{base}/users/{{key}}\", hostHeader: \"admin.internal\" }}"),
        "{}",
    );
    let cluster = cluster(1, &keyspaces, cache.path()).await?;
    let mut c = cluster.client(0).await?;

    let stop = Arc::new(AtomicBool::new(false));
    let reader = keep_reading(&cluster, Arc::clone(&stop));

    // (keyspace, expected code, text the message must contain)
    let cases = [
        ("spin-fuel", Code::Internal, "ran out of fuel"),
        ("spin-time", Code::DeadlineExceeded, "timed out (its own time limit)"),
        ("hog", Code::Internal, "memory limit of 16Mi"),
        ("crash", Code::Internal, "panicked: test hook panicked on purpose"),
        ("huge", Code::Internal, "more than the keyspace's maxValueBytes"),
        ("escape", Code::Internal, "not in the keyspace's allowedHosts"),
        ("bounce", Code::Internal, "redirect"),
        ("vhost", Code::Internal, "Host header"),
    ];
    for (keyspace, code, text) in cases {
        // Twice: a trapped instance is discarded and the next call gets a fresh one, failing the same way.
        for attempt in 1..=2 {
            let started = Instant::now();
            let err = c.get(get(keyspace, "1")).await.expect_err(keyspace);
            assert_eq!(err.code(), code, "{keyspace} attempt {attempt}: {err:?}");
            assert!(err.message().contains(text), "{keyspace}: {:?} lacks {text:?}", err.message());
            // Stopped by the hook's own limit, long before the keyspace's 20 s fetch timeout.
            assert!(started.elapsed() < Duration::from_secs(10), "{keyspace} took {:?}", started.elapsed());
        }
    }
    assert_eq!(forbidden.total_hits(), 0, "no request reached a host outside allowedHosts");
    assert_eq!(origin.hits("/users/1"), 0, "the request with a forged Host header was never sent");
    assert_eq!(origin.hits("/redirect/x"), 2, "the redirecting request itself was allowed");

    stop.store(true, Ordering::Relaxed);
    let (ok, failures) = reader.await??;
    assert!(failures.is_empty(), "echo failed while other hooks misbehaved: {failures:?}");
    assert!(ok > 0, "echo answered nothing");

    let m = metrics(cluster.nodes[0].admin).await?;
    for (keyspace, reason) in [
        ("spin-fuel", "fuel"),
        ("spin-time", "timeout"),
        ("hog", "memory"),
        ("crash", "panic"),
        ("huge", "oversized"),
    ] {
        let line = format!("distcache_hook_traps_total{{keyspace=\"{keyspace}\",reason=\"{reason}\"}}");
        assert_eq!(metric(&m, &line), 2, "{line} in\n{m}");
    }
    Ok(())
}

fn write_keyspace_file(path: &Path, module: &str, config: &str, sha: Option<&str>) -> anyhow::Result<()> {
    let sha = sha.map(|s| format!(", sha256: \"{s}\"")).unwrap_or_default();
    let text = format!(
        "keyspaces:\n  - name: users\n    maxBytes: 16Mi\n    hook:\n      module: {{ path: \"{module}\"{sha} }}\n      \
         config: {config}\n"
    );
    // Atomically, as a ConfigMap update appears.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

fn copy_atomically(from: &Path, to: &Path) -> anyhow::Result<()> {
    let tmp = to.with_extension("tmp");
    std::fs::copy(from, &tmp)?;
    std::fs::rename(&tmp, to)?;
    Ok(())
}

async fn last_reload_error(cluster: &Cluster) -> anyhow::Result<String> {
    let (_, body) = http_get(cluster.nodes[0].admin, "/admin/keyspaces").await?;
    let v: serde_json::Value = serde_json::from_str(&body)?;
    Ok(v.pointer("/lastError").and_then(|e| e.as_str()).unwrap_or_default().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_swapped_in_place_under_load_loses_no_request() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    // The origin the new module (http-json) reads: "new-<i>" for every key the readers use.
    std::fs::create_dir_all(data.path().join("swap"))?;
    for i in 0..10_000 {
        std::fs::write(data.path().join("swap").join(format!("k{i}.json")), format!("new-k{i}"))?;
    }
    let origin = Origin::start("127.0.0.1:0".parse()?, data.path()).await?;
    let cache = tempfile::tempdir()?;
    let modules = tempfile::tempdir()?;
    let module = modules.path().join("users.wasm");
    copy_atomically(Path::new(&test_hook()?), &module)?;
    // One config both modules accept: the test hook echoes "old-<key>", http-json reads the origin.
    let keyspaces = format!(
        "keyspaces:\n  - name: swap\n    maxBytes: 64Mi\n    hook:\n      module: {{ path: \"{}\" }}\n      \
         config: {{ mode: echo, prefix: \"old-\", baseUrl: \"{}/swap\" }}\n      allowedHosts: [\"{}\"]\n",
        module.display(),
        origin.url(),
        origin.addr
    );
    let cluster = cluster(1, &keyspaces, cache.path()).await?;
    let addr = cluster.nodes[0].grpc;
    let next = Arc::new(AtomicU64::new(0));
    let seen_new = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    for _ in 0..8 {
        let (next, seen_new, stop) = (Arc::clone(&next), Arc::clone(&seen_new), Arc::clone(&stop));
        readers.push(tokio::spawn(async move {
            let mut c = distcache_tests::client(addr).await?;
            let mut failures = Vec::new();
            let mut reads = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= 10_000 {
                    break;
                }
                let key = format!("k{i}");
                reads += 1;
                match c.get(get("swap", &key)).await {
                    Ok(v) if v.get_ref().value == format!("old-{key}").into_bytes() => {}
                    Ok(v) if v.get_ref().value == format!("new-{key}").into_bytes() => {
                        seen_new.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(v) => failures.push(format!("{key}: unexpected value {:?}", v.get_ref().value)),
                    Err(e) => failures.push(format!("{key}: {e:?}")),
                }
            }
            anyhow::Ok((reads, failures))
        }));
    }
    // Let the readers run on the old module, then replace the module file in place.
    wait_for(Duration::from_secs(20), "reads on the old module", || {
        let n = Arc::clone(&next);
        async move { Ok(n.load(Ordering::Relaxed) >= 300) }
    })
    .await?;
    copy_atomically(Path::new(&http_json()?), &module)?;
    wait_for(Duration::from_secs(20), "reads served by the new module", || {
        let s = Arc::clone(&seen_new);
        async move { Ok(s.load(Ordering::Relaxed) >= 100) }
    })
    .await?;
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for r in readers {
        let (reads, failures) = r.await??;
        assert!(failures.is_empty(), "requests failed during the swap: {failures:?}");
        total += reads;
    }
    assert!(total >= 400, "only {total} reads");
    assert!(origin.total_hits() >= 100, "the new module reads the origin");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_wrong_sha_or_failing_modules_are_refused_and_the_old_one_keeps_serving()
-> anyhow::Result<()> {
    let cache = tempfile::tempdir()?;
    let modules = tempfile::tempdir()?;
    let module = modules.path().join("users.wasm");
    copy_atomically(Path::new(&test_hook()?), &module)?;
    let good = std::fs::read(&module)?;
    let sha = distcache_node::hooks::module::sha256_hex(&good);
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("keyspaces.yaml");
    let path = module.display().to_string();
    write_keyspace_file(&file, &path, "{ mode: echo, prefix: \"v1:\" }", Some(&sha))?;
    let keyspaces = std::fs::read_to_string(&file)?;
    let cluster = cluster(1, &keyspaces, cache.path()).await?;
    let file = cluster.keyspaces_file.clone();
    let mut c = cluster.client(0).await?;
    assert_eq!(c.get(get("users", "a")).await?.into_inner().value, &b"v1:a"[..]);
    let (_, status) = http_get(cluster.nodes[0].admin, "/admin/keyspaces").await?;
    assert!(status.contains(&format!("\"moduleSha256\":\"{sha}\"")), "hook state shown: {status}");

    let refused_with = |needle: &'static str| {
        let cluster = &cluster;
        async move {
            wait_for(Duration::from_secs(10), needle, || async move {
                Ok(last_reload_error(cluster).await?.contains(needle))
            })
            .await
        }
    };

    // 1. A wrong sha256 in the keyspaces file.
    let wrong = "0".repeat(64);
    write_keyspace_file(&file, &path, "{ mode: echo, prefix: \"v2:\" }", Some(&wrong))?;
    refused_with("but the keyspace expects 0000").await?;
    assert_eq!(
        c.get(get("users", "b")).await?.into_inner().value,
        &b"v1:b"[..],
        "the old hook keeps serving"
    );

    // 2. The module file corrupted in place (no sha256 pinned): not a component.
    write_keyspace_file(&file, &path, "{ mode: echo, prefix: \"v1:\" }", None)?;
    wait_for(Duration::from_secs(10), "the unpinned keyspaces file applied", || async {
        Ok(last_reload_error(&cluster).await?.is_empty())
    })
    .await?;
    let mut corrupt = good.clone();
    corrupt.truncate(good.len() / 2);
    std::fs::write(modules.path().join("half.wasm"), &corrupt)?;
    std::fs::rename(modules.path().join("half.wasm"), &module)?;
    refused_with("not a valid WebAssembly component").await?;
    assert_eq!(
        c.get(get("users", "c")).await?.into_inner().value,
        &b"v1:c"[..],
        "the old hook keeps serving"
    );

    // 3. A module whose init refuses its config.
    copy_atomically(Path::new(&test_hook()?), &module)?;
    write_keyspace_file(&file, &path, "{ mode: fail-init }", None)?;
    refused_with("test hook refused its config").await?;
    assert_eq!(
        c.get(get("users", "d")).await?.into_inner().value,
        &b"v1:d"[..],
        "the old hook keeps serving"
    );

    // 4. Fixed: the new config applies without a restart.
    write_keyspace_file(&file, &path, "{ mode: echo, prefix: \"v3:\" }", Some(&sha))?;
    wait_for(Duration::from_secs(10), "the fixed keyspaces file applied", || async {
        Ok(last_reload_error(&cluster).await?.is_empty())
    })
    .await?;
    assert_eq!(c.get(get("users", "e")).await?.into_inner().value, &b"v3:e"[..]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn url_modules_are_downloaded_once_verified_and_compiled_once() -> anyhow::Result<()> {
    // The origin serves the module itself.
    let data = tempfile::tempdir()?;
    let wasm = std::fs::read(test_hook()?)?;
    std::fs::write(data.path().join("hook.wasm"), &wasm)?;
    let origin = Origin::start("127.0.0.1:0".parse()?, data.path()).await?;
    let sha = distcache_node::hooks::module::sha256_hex(&wasm);
    let cache = tempfile::tempdir()?;
    let keyspaces = |sha: &str| {
        format!(
            "keyspaces:\n  - name: remote\n    maxBytes: 1Mi\n    hook:\n      module: {{ url: \"{}/hook.wasm\", \
             sha256: \"{sha}\" }}\n      config: {{ mode: echo, prefix: \"r:\" }}\n",
            origin.url()
        )
    };
    let compiled = |cache: &Path| -> anyhow::Result<Vec<PathBuf>> {
        let dir = cache.join("compiled");
        Ok(std::fs::read_dir(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "cwasm"))
            .collect())
    };
    {
        let cluster = cluster(1, &keyspaces(&sha), cache.path()).await?;
        let mut c = cluster.client(0).await?;
        assert_eq!(c.get(get("remote", "x")).await?.into_inner().value, &b"r:x"[..]);
    }
    assert_eq!(origin.hits("/hook.wasm"), 1);
    let artifacts = compiled(cache.path())?;
    assert_eq!(artifacts.len(), 1, "{artifacts:?}");
    // An artifact of another wasmtime version or engine settings is useless: pruned on the next compile.
    let stale = cache.path().join("compiled").join(format!("{sha}-0000000000000000.cwasm"));
    std::fs::write(&stale, b"stale")?;
    let modified = std::fs::metadata(&artifacts[0])?.modified()?;

    // A restart with the same cache: no download, no compile (the artifact is deserialized).
    {
        let cluster = cluster(1, &keyspaces(&sha), cache.path()).await?;
        let mut c = cluster.client(0).await?;
        assert_eq!(c.get(get("remote", "y")).await?.into_inner().value, &b"r:y"[..]);
    }
    assert_eq!(origin.hits("/hook.wasm"), 1, "downloaded once");
    assert_eq!(std::fs::metadata(&artifacts[0])?.modified()?, modified, "compiled once");
    assert!(stale.exists(), "nothing is pruned when nothing is compiled");

    // Another module compiled into the same cache: the stale artifact goes, the current ones stay.
    let other = format!(
        "keyspaces:\n  - name: users\n    maxBytes: 1Mi\n    hook:\n      module: {{ path: \"{}\" }}\n      \
         config: {{ baseUrl: \"{}/users\" }}\n",
        http_json()?,
        origin.url()
    );
    drop(cluster(1, &other, cache.path()).await?);
    assert!(!stale.exists(), "the artifact of another engine is pruned");
    assert_eq!(compiled(cache.path())?.len(), 2, "both current artifacts are kept");

    // A wrong sha256 on the first load: the node starts (a pod must not crash-loop over one keyspace) without
    // that keyspace, and says why on /admin/keyspaces, naming both digests.
    let wrong = "ab".repeat(32);
    let node = cluster(1, &keyspaces(&wrong), tempfile::tempdir()?.path()).await?;
    let (_, body) = http_get(node.nodes[0].admin, "/admin/keyspaces").await?;
    let report: serde_json::Value = serde_json::from_str(&body)?;
    let error = report["lastError"].as_str().unwrap_or_default();
    assert!(error.contains(&sha) && error.contains(&wrong) && error.contains("refused"), "{report}");
    assert_eq!(
        report["keyspaces"].as_array().map(Vec::len),
        Some(0),
        "the module was not accepted: {report}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configmap_module_is_read_from_its_mount_and_swapped_when_kubernetes_updates_it()
-> anyhow::Result<()> {
    let data = origin_data()?;
    let origin = Origin::start("127.0.0.1:0".parse()?, data.path()).await?;
    let cache = tempfile::tempdir()?;
    // A ConfigMap volume as the kubelet writes it: the key is a symlink into `..data`, itself a symlink to a
    // timestamped directory; an update writes a new directory and swaps `..data` atomically.
    let mounts = tempfile::tempdir()?;
    let volume = mounts.path().join("users-hook");
    std::fs::create_dir_all(volume.join("..2026_11_29_a"))?;
    std::fs::copy(test_hook()?, volume.join("..2026_11_29_a").join("hook.wasm"))?;
    std::os::unix::fs::symlink("..2026_11_29_a", volume.join("..data"))?;
    std::os::unix::fs::symlink("..data/hook.wasm", volume.join("hook.wasm"))?;
    let keyspaces = format!(
        "keyspaces:\n  - name: users\n    maxBytes: 16Mi\n    hook:\n      module: {{ configMap: {{ name: users-hook, \
         key: hook.wasm }} }}\n      config: {{ mode: echo, prefix: \"cm:\", baseUrl: \"{}/users\" }}\n      \
         allowedHosts: [\"{}\"]\n",
        origin.url(),
        origin.addr
    );
    let (cache_dir, mount_dir) = (cache.path().to_owned(), mounts.path().to_owned());
    let cluster = Cluster::start_with(1, &keyspaces, Duration::ZERO, move |c| {
        c.hooks.cache_dir = Some(cache_dir.clone());
        c.hooks.config_map_dir.clone_from(&mount_dir);
    })
    .await?;
    let mut c = cluster.client(0).await?;
    assert_eq!(c.get(get("users", "7")).await?.into_inner().value, &b"cm:7"[..]);

    // The ConfigMap now holds the http-json hook.
    std::fs::create_dir_all(volume.join("..2026_11_29_b"))?;
    std::fs::copy(http_json()?, volume.join("..2026_11_29_b").join("hook.wasm"))?;
    std::os::unix::fs::symlink("..2026_11_29_b", volume.join("..data_tmp"))?;
    std::fs::rename(volume.join("..data_tmp"), volume.join("..data"))?;
    let new_sha = distcache_node::hooks::module::sha256_hex(&std::fs::read(http_json()?)?);
    let admin = cluster.nodes[0].admin;
    wait_for(Duration::from_secs(10), "the updated ConfigMap module swapped in", || {
        let needle = format!("\"moduleSha256\":\"{new_sha}\"");
        async move { Ok(http_get(admin, "/admin/keyspaces").await?.1.contains(&needle)) }
    })
    .await?;
    // A key not read before: served by the new module, from the origin.
    assert_eq!(c.get(get("users", "8")).await?.into_inner().value, user_json(8));
    assert!(origin.total_hits() >= 1, "the new module reads the origin");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_refused_because_a_module_download_failed_is_retried() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let origin = Origin::start("127.0.0.1:0".parse()?, data.path()).await?;
    let wasm = std::fs::read(test_hook()?)?;
    let sha = distcache_node::hooks::module::sha256_hex(&wasm);
    let cache = tempfile::tempdir()?;
    let cluster = cluster(1, "keyspaces: []\n", cache.path()).await?;
    // The artifact server does not have the module yet: the change is refused (404).
    let keyspaces = format!(
        "keyspaces:\n  - name: remote\n    maxBytes: 1Mi\n    hook:\n      module: {{ url: \"{}/hook.wasm\", \
         sha256: \"{sha}\" }}\n      config: {{ mode: echo, prefix: \"late:\" }}\n",
        origin.url()
    );
    std::fs::write(&cluster.keyspaces_file, keyspaces)?;
    wait_for(Duration::from_secs(10), "the refused download", || async {
        Ok(last_reload_error(&cluster).await?.contains("404"))
    })
    .await?;
    // Once it is published, the unchanged keyspaces file applies without anyone touching it (retried after 30
    // poll intervals of 100 ms here).
    std::fs::write(data.path().join("hook.wasm"), &wasm)?;
    let mut c = cluster.client(0).await?;
    wait_for(Duration::from_secs(15), "the retried reload applied", || {
        let mut c = c.clone();
        async move { Ok(c.get(get("remote", "k")).await.is_ok()) }
    })
    .await?;
    assert_eq!(c.get(get("remote", "x")).await?.into_inner().value, &b"late:x"[..]);
    assert!(origin.hits("/hook.wasm") >= 2, "downloaded on the retry");
    assert!(last_reload_error(&cluster).await?.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_starts_without_a_module_that_is_not_mounted_yet_and_loads_it_when_it_appears()
-> anyhow::Result<()> {
    // A pod whose hook ConfigMap does not exist yet (an optional volume): the node must not crash-loop; it
    // serves its other keyspaces and loads the hook once the kubelet mounts the ConfigMap.
    let cache = tempfile::tempdir()?;
    let mounts = tempfile::tempdir()?;
    let keyspaces = "keyspaces:\n  - name: users\n    maxBytes: 16Mi\n    hook:\n      module: { configMap: { name: \
                     late-hook, key: hook.wasm } }\n      config: { mode: echo, prefix: \"late:\" }\n  - name: \
                     sessions\n    maxBytes: 1Mi\n";
    let (cache_dir, mount_dir) = (cache.path().to_owned(), mounts.path().to_owned());
    let cluster = Cluster::start_with(1, keyspaces, Duration::ZERO, move |c| {
        c.hooks.cache_dir = Some(cache_dir.clone());
        c.hooks.config_map_dir.clone_from(&mount_dir);
    })
    .await?;
    let mut c = cluster.client(0).await?;
    c.put(distcache_proto::v1::PutRequest {
        keyspace: "sessions".into(),
        key: "s".into(),
        value: b"v".to_vec().into(),
        ttl: None,
    })
    .await?;
    assert_eq!(c.get(get("sessions", "s")).await?.into_inner().value, &b"v"[..], "the other keyspace serves");
    let error = last_reload_error(&cluster).await?;
    assert!(error.contains("late-hook/hook.wasm"), "the missing module is reported: {error}");
    // Not served yet: an unknown keyspace, as on nodes that refused the change.
    assert_eq!(
        c.get(get("users", "1")).await.map_err(|s| s.code()).err(),
        Some(tonic::Code::FailedPrecondition)
    );

    // The kubelet mounts the ConfigMap: the watched module path appears and the keyspace is loaded.
    std::fs::create_dir_all(mounts.path().join("late-hook"))?;
    std::fs::copy(test_hook()?, mounts.path().join("late-hook").join("hook.wasm"))?;
    wait_for(Duration::from_secs(15), "the late module loaded", || {
        let mut c = c.clone();
        async move { Ok(c.get(get("users", "1")).await.is_ok()) }
    })
    .await?;
    assert_eq!(c.get(get("users", "2")).await?.into_inner().value, &b"late:2"[..]);
    assert!(last_reload_error(&cluster).await?.is_empty(), "the refusal is cleared");
    Ok(())
}
