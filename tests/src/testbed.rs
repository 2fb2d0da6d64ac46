//! Test-side access to the Kubernetes test bed (`make testbed-up`, `tests/testbed/testbed.sh`): a client for
//! the bed's API server, and a namespace per test that is deleted afterwards.
//!
//! The bed is started once per `make test` run, before the tests, and always stopped after them: under nextest
//! each test is its own process, so the bed cannot belong to any one of them. The tests that use it form the nextest
//! test group `testbed` (.config/nextest.toml). Without a running bed (or, for a private bed, without the cached
//! binaries) they fail at once with one line that says how to get it, instead of waiting for a server.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api, Client,
    api::{DeleteParams, ObjectMeta, PostParams},
};

/// The bed's directory: `$TESTBED_DIR`, else `target/testbed` of the checkout.
pub fn testbed_dir() -> PathBuf {
    std::env::var_os("TESTBED_DIR")
        .map_or_else(|| crate::repo_root().join("target").join("testbed"), PathBuf::from)
}

/// Starts the bed (`tests/testbed/testbed.sh up`; what `make testbed-up` does after building the binaries).
pub fn up() -> anyhow::Result<()> {
    run_script("up")
}

/// Stops the bed (`tests/testbed/testbed.sh down`).
pub fn down() -> anyhow::Result<()> {
    run_script("down")
}

fn run_script(command: &str) -> anyhow::Result<()> {
    let status = std::process::Command::new("bash")
        .arg(crate::repo_root().join("tests/testbed/testbed.sh"))
        .arg(command)
        .status()
        .with_context(|| format!("running testbed.sh {command}"))?;
    anyhow::ensure!(status.success(), "testbed.sh {command} failed ({status})");
    Ok(())
}

/// The directory of a pod run by the test kubelet (`volumes/`, `kubeconfig`, `container.log`, `pid`).
pub fn pod_dir(namespace: &str, name: &str, uid: &str) -> PathBuf {
    testbed_dir().join("kubelet").join("pods").join(format!("{namespace}_{name}_{uid}"))
}

/// Where the bed's binaries are cached (`$TESTBED_CACHE`, default `/var/cache/distcache/testbed`).
pub fn cache_dir() -> PathBuf {
    std::env::var_os("TESTBED_CACHE")
        .map_or_else(|| PathBuf::from("/var/cache/distcache/testbed"), PathBuf::from)
}

/// kubectl v1.20.2, built with the bed.
pub fn kubectl() -> PathBuf {
    cache_dir().join("kubernetes-v1.20.2/bin/kubectl")
}

/// helm 3.17.2, installed with the bed (`tests/testbed/install-helm.sh`).
pub fn helm() -> PathBuf {
    cache_dir().join("helm-v3.17.2/helm")
}

/// The binaries `tests/testbed/testbed.sh up` runs, cached by `make setup`: kube-apiserver, kube-controller-manager
/// and kubectl v1.20.2, apiextensions-apiserver 1.36.4 and helm 3.17.2.
fn cached_binaries() -> [PathBuf; 5] {
    let kube = cache_dir().join("kubernetes-v1.20.2/bin");
    [
        kube.join("kube-apiserver"),
        kube.join("kube-controller-manager"),
        kubectl(),
        cache_dir().join("apiextensions-1.36.4/bin/apiextensions-apiserver"),
        helm(),
    ]
}

/// Fails at once, with one line, unless the bed's binaries are cached: `testbed.sh up` would otherwise start a
/// build of several minutes inside the test.
fn ensure_installed() -> anyhow::Result<()> {
    let missing: Vec<String> =
        cached_binaries().iter().filter(|p| !p.exists()).map(|p| p.display().to_string()).collect();
    anyhow::ensure!(
        missing.is_empty(),
        "the Kubernetes test bed's binaries are not installed ({} missing): install them with `make setup` (or run \
         `make test`)",
        missing.join(", ")
    );
    Ok(())
}

/// The one line a test fails with when the shared bed is not running.
const NOT_RUNNING: &str =
    "the Kubernetes test bed is not running: start it with `make testbed-up` (or run `make test`)";

/// Fails at once, with one line, unless the shared bed in `dir` runs: its kubeconfig, PID list and ports file are
/// there (`testbed.sh up` writes them, `down` removes the PID list) and its API server accepts a connection (a bed
/// left behind by a killed run or a reboot has the files but no server, and a client would only time out).
fn ensure_running(dir: &Path) -> anyhow::Result<()> {
    let ports = std::fs::read_to_string(dir.join("ports")).unwrap_or_default();
    let value = |name: &str| ports.lines().find_map(|line| line.strip_prefix(name)).map(str::trim);
    let api_port = value("API_PORT=").and_then(|port| port.parse::<u16>().ok());
    // A bed with a real node serves the API on its namespace's address (API_ADDR), others on 127.0.0.1.
    let api_addr =
        value("API_ADDR=").and_then(|addr| addr.parse::<Ipv4Addr>().ok()).unwrap_or(Ipv4Addr::LOCALHOST);
    let running = dir.join("kubeconfig").exists()
        && dir.join("pids").exists()
        && api_port.is_some_and(|port| {
            TcpStream::connect_timeout(&SocketAddr::from((api_addr, port)), Duration::from_secs(2)).is_ok()
        });
    anyhow::ensure!(running, "{NOT_RUNNING} (no bed answers in {})", dir.display());
    Ok(())
}

/// A bed of one test's own (its own directory, ports and pod subnet), for tests that break the bed on purpose,
/// such as restarting its API server. Stopped when dropped.
pub struct PrivateBed {
    dir: tempfile::TempDir,
    subnet: String,
    /// A connection to it.
    pub bed: Testbed,
}

impl PrivateBed {
    /// Starts a bed whose pods get `127.0.<octet>.x` (the shared bed's pods use 127.0.0.x).
    pub async fn start(octet: u8) -> anyhow::Result<Self> {
        ensure_installed()?;
        // Without the test kubelet the bed would start but run no pod.
        crate::built_binary("distcache-test-kubelet")?;
        let dir = tempfile::tempdir()?;
        let subnet = format!("127.0.{octet}");
        let script = crate::repo_root().join("tests/testbed/testbed.sh");
        let status = tokio::process::Command::new("bash")
            .arg(&script)
            .arg("up")
            .env("TESTBED_DIR", dir.path())
            .env("TESTBED_POD_SUBNET", &subnet)
            .stdout(std::process::Stdio::null())
            .status()
            .await?;
        anyhow::ensure!(status.success(), "starting a private test bed failed ({status})");
        let kubeconfig = dir.path().join("kubeconfig");
        let file = kube::config::Kubeconfig::read_from(&kubeconfig)?;
        let config =
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default()).await?;
        let bed = Testbed { client: Client::try_from(config)?, kubeconfig };
        Ok(Self { dir, subnet, bed })
    }

    /// Stops one component and starts it again (`testbed.sh restart NAME`).
    pub async fn restart(&self, component: &str) -> anyhow::Result<()> {
        let status = tokio::process::Command::new("bash")
            .arg(crate::repo_root().join("tests/testbed/testbed.sh"))
            .arg("restart")
            .arg(component)
            .env("TESTBED_DIR", self.dir.path())
            .env("TESTBED_POD_SUBNET", &self.subnet)
            .stdout(std::process::Stdio::null())
            .status()
            .await?;
        anyhow::ensure!(status.success(), "restarting {component} failed ({status})");
        Ok(())
    }
}

impl Drop for PrivateBed {
    fn drop(&mut self) {
        let _ = std::process::Command::new("bash")
            .arg(crate::repo_root().join("tests/testbed/testbed.sh"))
            .arg("down")
            .env("TESTBED_DIR", self.dir.path())
            .stdout(std::process::Stdio::null())
            .status();
    }
}

/// A connection to the running test bed.
pub struct Testbed {
    /// Admin client (system:masters).
    pub client: Client,
    /// The admin kubeconfig file.
    pub kubeconfig: PathBuf,
}

impl Testbed {
    /// Connects to the running bed, or fails at once with one line that says how to start it.
    pub async fn connect() -> anyhow::Result<Self> {
        let dir = testbed_dir();
        ensure_running(&dir)?;
        let kubeconfig = dir.join("kubeconfig");
        let file = kube::config::Kubeconfig::read_from(&kubeconfig)?;
        let config =
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default()).await?;
        let client = Client::try_from(config)?;
        Ok(Self { client, kubeconfig })
    }

    /// A client of the bed's apiextensions-apiserver 1.36.4 (CRDs with CEL rules; `testbed.sh crd-up`).
    pub async fn crd_server(&self) -> anyhow::Result<Client> {
        let kubeconfig = testbed_dir().join("kubeconfig-crd");
        anyhow::ensure!(
            kubeconfig.exists(),
            "the bed's apiextensions-apiserver is not running ({} missing): `make testbed-crd-up`",
            kubeconfig.display()
        );
        let file = kube::config::Kubeconfig::read_from(&kubeconfig)?;
        let config =
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default()).await?;
        Ok(Client::try_from(config)?)
    }

    /// Creates a fresh namespace `<prefix>-<suffix>` for one test.
    pub async fn namespace(&self, prefix: &str) -> anyhow::Result<TestNamespace> {
        let suffix = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos())
            % 1_000_000_007;
        let name = format!("{prefix}-{suffix:x}-{}", std::process::id());
        let api: Api<Namespace> = Api::all(self.client.clone());
        let ns = Namespace {
            metadata: ObjectMeta { name: Some(name.clone()), ..ObjectMeta::default() },
            ..Namespace::default()
        };
        api.create(&PostParams::default(), &ns)
            .await
            .with_context(|| format!("creating namespace {name}"))?;
        // The service-account controller creates `default` shortly after; pods need it for their token.
        crate::wait_for(Duration::from_secs(20), "the default ServiceAccount of the test namespace", || {
            let sa: Api<k8s_openapi::api::core::v1::ServiceAccount> =
                Api::namespaced(self.client.clone(), &name);
            async move { Ok(sa.get_opt("default").await?.is_some()) }
        })
        .await?;
        Ok(TestNamespace { name, client: self.client.clone() })
    }
}

/// A namespace owned by one test; [`TestNamespace::delete`] removes it (and so every object in it).
pub struct TestNamespace {
    /// Namespace name.
    pub name: String,
    client: Client,
}

impl TestNamespace {
    /// Deletes the namespace (the garbage collector and the kubelet remove what is in it).
    pub async fn delete(self) -> anyhow::Result<()> {
        let api: Api<Namespace> = Api::all(self.client.clone());
        api.delete(&self.name, &DeleteParams::background()).await?;
        Ok(())
    }
}

/// A StatefulSet of `distcache-node` pods as the test bed runs them: config from ConfigMap `<name>-config` mounted
/// at `/etc/distcache` (`node.yaml` and what it names), member name = pod name, listening on the podIP (pods
/// share the host network), readiness from `/readyz`, label `app=<name>`.
pub fn node_statefulset(name: &str, replicas: i32, service_account: Option<&str>) -> serde_json::Value {
    let mut set = serde_json::json!({
        "metadata": { "name": name },
        "spec": {
            "replicas": replicas,
            "serviceName": format!("{name}-peers"),
            "podManagementPolicy": "Parallel",
            "selector": { "matchLabels": { "app": name } },
            "template": {
                "metadata": { "labels": { "app": name } },
                "spec": {
                    "terminationGracePeriodSeconds": 5,
                    "containers": [{
                        "name": "node",
                        "image": "example.invalid/distcache-node:test",
                        "args": ["--config", "/etc/distcache/node.yaml"],
                        "env": [
                            { "name": "POD_NAME", "valueFrom": { "fieldRef": { "fieldPath": "metadata.name" } } },
                            { "name": "POD_IP", "valueFrom": { "fieldRef": { "fieldPath": "status.podIP" } } },
                            { "name": "DISTCACHE_NAME", "value": "$(POD_NAME)" },
                            { "name": "DISTCACHE_LISTEN", "value": "$(POD_IP):7420" },
                            { "name": "DISTCACHE_PEER_LISTEN", "value": "$(POD_IP):7422" },
                            { "name": "DISTCACHE_ADVERTISE", "value": "$(POD_IP):7422" },
                            { "name": "DISTCACHE_ADMIN", "value": "$(POD_IP):7421" }
                        ],
                        "ports": [
                            { "name": "grpc", "containerPort": 7420 },
                            { "name": "peer", "containerPort": 7422 },
                            { "name": "admin", "containerPort": 7421 }
                        ],
                        "readinessProbe": { "httpGet": { "path": "/readyz", "port": "admin" }, "periodSeconds": 1 },
                        "volumeMounts": [{ "name": "config", "mountPath": "/etc/distcache" }]
                    }],
                    "volumes": [{ "name": "config", "configMap": { "name": format!("{name}-config") } }]
                }
            }
        }
    });
    if let Some(sa) = service_account {
        set["spec"]["template"]["spec"]["serviceAccountName"] = sa.into();
    }
    set
}

/// Whether a pod is Ready and not being deleted (the rule the nodes and the operator use).
pub use distcache_api::pod_is_serving as is_ready;
