//! `distcache-operator`: `run` reconciles DistCache resources; `crd` prints the CustomResourceDefinition.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use distcache_api::DistCache;
use distcache_operator::{
    controller::{self, Context, build::BuildConfig},
    metrics::{self, Metrics},
};
use kube::{Api, Client, api::ListParams, runtime::events::Reporter};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(version, about = "Kubernetes operator for DistCache", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the DistCache CustomResourceDefinition (YAML), e.g. `distcache-operator crd | kubectl apply -f -`.
    Crd {
        /// Leave out the CEL validation rules, for Kubernetes before 1.25 (its kubectl and Helm reject them).
        #[arg(long)]
        without_cel_rules: bool,
    },
    /// Run the controller (credentials: the in-cluster service account, or KUBECONFIG).
    Run(RunArgs),
}

#[derive(Parser)]
struct RunArgs {
    /// Address of the HTTP endpoint: /metrics, /healthz, /readyz.
    #[arg(long, env = "DISTCACHE_OPERATOR_LISTEN", default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// Watch DistCaches in this namespace only (default: all namespaces).
    #[arg(long, env = "DISTCACHE_OPERATOR_NAMESPACE")]
    namespace: Option<String>,
    /// Node image (`repository:tag`) for DistCaches that do not set spec.image.
    #[arg(long, env = "DISTCACHE_OPERATOR_NODE_IMAGE", default_value_t = BuildConfig::default().node_image)]
    node_image: String,
    /// Bind the nodes' ports to their pod IP instead of 0.0.0.0: for pods sharing one network namespace (host
    /// networking, the project's test bed). `kubectl port-forward` to a node needs the default.
    #[arg(long, env = "DISTCACHE_OPERATOR_NODE_LISTEN_ON_POD_IP")]
    node_listen_on_pod_ip: bool,
    /// Seconds a stopping node keeps serving after it turned not-ready, while peers and load balancers notice.
    #[arg(long, env = "DISTCACHE_OPERATOR_NODE_SHUTDOWN_DELAY", default_value_t = 5)]
    node_shutdown_delay: u32,
    /// DNS domain of the cluster (DNS discovery).
    #[arg(long, env = "DISTCACHE_OPERATOR_CLUSTER_DOMAIN", default_value = "cluster.local")]
    cluster_domain: String,
    /// Log format.
    #[arg(long, env = "DISTCACHE_OPERATOR_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// OTLP/gRPC collector for the reconcile spans (such as http://otel-collector.monitoring:4317); default: the
    /// standard OTEL_EXPORTER_OTLP_TRACES_ENDPOINT / OTEL_EXPORTER_OTLP_ENDPOINT; with neither, no traces.
    #[arg(long, env = "DISTCACHE_OPERATOR_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// Share of reconciles traced, 0 to 1.
    #[arg(long, env = "DISTCACHE_OPERATOR_TRACE_SAMPLE_RATIO", default_value_t = 1.0, value_parser = parse_ratio)]
    trace_sample_ratio: f64,
}

fn parse_ratio(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("{s:?} is not a number between 0 and 1")),
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd { without_cel_rules } => {
            print!("{}", distcache_operator::crd_yaml(!without_cel_rules).context("cannot render the CRD")?);
            Ok(())
        }
        Command::Run(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")?
            .block_on(async {
                // Inside the runtime: the trace exporter's connection and batch processor are tasks on it.
                let telemetry = distcache_telemetry::init(&distcache_telemetry::Settings {
                    json: matches!(args.log_format, LogFormat::Json),
                    level: None,
                    otlp_endpoint: args.otlp_endpoint.clone(),
                    sample_ratio: Some(args.trace_sample_ratio),
                    record_keys: false,
                    service: "distcache-operator".to_owned(),
                })
                .context("cannot start: logging or tracing")?;
                let result = run(args).await;
                telemetry.shutdown().await;
                result
            }),
    }
}

async fn shutdown_signal(token: CancellationToken) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the operator");
            let _ = tokio::signal::ctrl_c().await;
            token.cancel();
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("stopping");
    token.cancel();
}

/// Waits until the API server serves the DistCache resource (the CRD may be installed after the operator).
async fn wait_for_crd(client: &Client, namespace: Option<&str>, token: &CancellationToken) -> bool {
    let api: Api<DistCache> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let mut delay = Duration::from_secs(1);
    loop {
        match api.list_metadata(&ListParams::default().limit(1)).await {
            Ok(_) => return true,
            Err(kube::Error::Api(e)) if e.code == 404 => {
                tracing::warn!(
                    "the DistCache CRD (distcaches.distcache.io) is not installed: install the Helm chart with \
                     crds.enabled=true, or `distcache-operator crd | kubectl apply -f -`; retrying in {delay:?}"
                );
            }
            Err(e) => {
                tracing::warn!(error = %controller::chain(&e), "cannot list DistCaches; retrying in {delay:?}");
            }
        }
        tokio::select! {
            () = token.cancelled() => return false,
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let token = CancellationToken::new();
    tokio::spawn(shutdown_signal(token.clone()));
    let client = Client::try_default().await.context("cannot configure the Kubernetes client")?;
    let metrics = Arc::new(Metrics::default());
    let listener = metrics::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {} (--listen)", args.listen))?;
    let served = token.clone();
    let http =
        tokio::spawn(metrics::serve(listener, metrics.clone(), async move { served.cancelled().await }));
    tracing::info!(listen = %args.listen, namespace = args.namespace.as_deref().unwrap_or("(all)"), node_image = %args.node_image, "distcache-operator starting");
    if wait_for_crd(&client, args.namespace.as_deref(), &token).await {
        metrics.set_ready(true);
        let reporter = Reporter {
            controller: distcache_operator::FIELD_MANAGER.to_owned(),
            instance: std::env::var("POD_NAME").ok(),
        };
        let build = BuildConfig {
            node_image: args.node_image,
            listen_on_pod_ip: args.node_listen_on_pod_ip,
            cluster_domain: args.cluster_domain,
            shutdown_delay_seconds: args.node_shutdown_delay,
        };
        let ctx = Arc::new(Context::new(client, build, metrics.clone(), reporter));
        controller::run(ctx, args.namespace, token.clone()).await;
    }
    token.cancel();
    http.await.context("metrics server task")?.context("metrics server")?;
    tracing::info!("stopped");
    Ok(())
}
