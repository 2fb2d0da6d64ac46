//! `distcache-testbed-dns --kubeconfig FILE --listen IP:PORT [--domain cluster.local]`: the real-node test bed's
//! cluster DNS (see `distcache_tests::cluster_dns`). Prints `ready` on stdout once it serves the zone built from
//! the API server's Services and Endpoints; runs until SIGTERM or SIGINT.

use std::{io::Write as _, net::SocketAddr, path::PathBuf};

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,kube=warn".into()),
        )
        .init();
    let mut kubeconfig = None;
    let mut listen: Option<SocketAddr> = None;
    let mut domain = "cluster.local".to_owned();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or_else(|| anyhow::anyhow!("{arg} needs a value"));
        match arg.as_str() {
            "--kubeconfig" => kubeconfig = Some(PathBuf::from(value()?)),
            "--listen" => listen = Some(value()?.parse()?),
            "--domain" => domain = value()?,
            other => anyhow::bail!(
                "unknown argument {other:?}; usage: distcache-testbed-dns --kubeconfig FILE --listen IP:PORT \
                 [--domain cluster.local]"
            ),
        }
    }
    let kubeconfig = kubeconfig.ok_or_else(|| anyhow::anyhow!("--kubeconfig is required"))?;
    let listen = listen.ok_or_else(|| anyhow::anyhow!("--listen is required"))?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async move {
        let file = kube::config::Kubeconfig::read_from(&kubeconfig)?;
        let config =
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default()).await?;
        let client = kube::Client::try_from(config)?;
        let serve = distcache_tests::cluster_dns::serve(client, &domain, listen, || {
            tracing::info!(%listen, %domain, "serving the cluster domain");
            println!("ready");
            let _ = std::io::stdout().flush();
        });
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            result = serve => result,
            _ = tokio::signal::ctrl_c() => Ok(()),
            _ = term.recv() => Ok(()),
        }
    })
}
