//! `distcache-node --config FILE`: runs one cache node until SIGTERM or Ctrl-C.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use distcache_node::{NodeConfig, NodeOptions};

// glibc malloc was a fifth of the node's instructions on the GetMany path (callgrind): every request allocates
// and frees protobuf messages, header maps and futures. mimalloc's thread-local free lists are far cheaper.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// DistCache cache node.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None, after_help = "Every config field can also be set by an environment \
variable DISTCACHE_<FIELD> (nested fields joined by __, values in YAML), e.g. DISTCACHE_ADVERTISE=10.0.0.7:7420.\n\
Logging: log.format and log.level in the config; RUST_LOG overrides the level, DISTCACHE_LOG=json selects JSON \
lines.\nTraces: tracing.otlpEndpoint, or the standard OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT.")]
struct Args {
    /// Node configuration file (YAML). Without it, defaults and DISTCACHE_* variables apply.
    #[arg(long, short = 'c', env = "DISTCACHE_CONFIG")]
    config: Option<PathBuf>,
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let env = std::env::vars().filter(|(k, _)| k != "DISTCACHE_CONFIG");
    // A bad configuration is reported on stderr before any logging is set up (logging is configured by it).
    let config = NodeConfig::load(args.config.as_deref(), env).context("cannot start: bad configuration")?;
    runtime(config.worker_threads)?.block_on(async {
        // Inside the runtime: the trace exporter's connection and batch processor are tasks on it.
        let telemetry = distcache_node::telemetry::init_node(&config.log, &config.tracing)
            .context("cannot start: logging or tracing")?;
        let result = run(config).await;
        telemetry.shutdown().await;
        result
    })
}

/// The async runtime for `workerThreads`. One worker is tokio's current-thread scheduler: a single event loop,
/// like Redis's, without the work-stealing machinery a multi-thread runtime of one worker still pays for (in
/// interleaved runs of the miss-path benchmark it used 4–12 % less CPU per request and cut the p99 by 7–26 %).
/// More than one, or none given (one per CPU), is the multi-thread scheduler.
fn runtime(worker_threads: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = match worker_threads {
        Some(0) => anyhow::bail!("cannot start: workerThreads must be at least 1"),
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(n);
            builder
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    builder.enable_all().thread_name("distcache-worker").build().context("cannot start the async runtime")
}

async fn run(config: NodeConfig) -> anyhow::Result<()> {
    let node = distcache_node::start(NodeOptions::new(config)).await.context("cannot start the node")?;
    shutdown_signal().await;
    tracing::info!("stopping");
    node.stop().await;
    tracing::info!("stopped");
    Ok(())
}
