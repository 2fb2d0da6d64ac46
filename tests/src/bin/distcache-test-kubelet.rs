//! `distcache-test-kubelet --kubeconfig FILE --dir DIR --binaries DIR [--node-name NAME] [--selector k=v,...]`:
//! the test bed's kubelet (see `distcache_tests::kubelet`). Runs until SIGTERM or SIGINT, then stops every pod
//! process it started.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use distcache_tests::kubelet::{Kubelet, KubeletConfig};

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,kube=warn".into()),
        )
        .init();
    let mut kubeconfig = None;
    let mut dir = None;
    let mut binaries = None;
    let mut node_name = "testbed-node".to_owned();
    let mut selector = BTreeMap::new();
    let mut pod_subnet = [127, 0, 0];
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or_else(|| anyhow::anyhow!("{arg} needs a value"));
        match arg.as_str() {
            "--kubeconfig" => kubeconfig = Some(PathBuf::from(value()?)),
            "--dir" => dir = Some(PathBuf::from(value()?)),
            "--binaries" => binaries = Some(PathBuf::from(value()?)),
            "--node-name" => node_name = value()?,
            "--pod-subnet" => {
                let text = value()?;
                let octets: Vec<u8> = text.split('.').map(str::parse).collect::<Result<_, _>>()?;
                pod_subnet = <[u8; 3]>::try_from(octets)
                    .map_err(|_| anyhow::anyhow!("--pod-subnet {text:?} is not three octets like 127.0.1"))?;
            }
            "--selector" => {
                for pair in value()?.split(',').filter(|p| !p.is_empty()) {
                    let (k, v) = pair
                        .split_once('=')
                        .ok_or_else(|| anyhow::anyhow!("selector {pair:?} is not k=v"))?;
                    selector.insert(k.to_owned(), v.to_owned());
                }
            }
            other => anyhow::bail!(
                "unknown argument {other:?}; usage: distcache-test-kubelet --kubeconfig FILE --dir DIR --binaries DIR \
                 [--node-name NAME] [--selector k=v,...] [--pod-subnet 127.0.0]"
            ),
        }
    }
    let kubeconfig = kubeconfig.ok_or_else(|| anyhow::anyhow!("--kubeconfig is required"))?;
    let dir = dir.ok_or_else(|| anyhow::anyhow!("--dir is required"))?;
    let binaries = binaries.ok_or_else(|| anyhow::anyhow!("--binaries is required"))?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async move {
        let file = kube::config::Kubeconfig::read_from(&kubeconfig)?;
        let config =
            kube::Config::from_custom_kubeconfig(file.clone(), &kube::config::KubeConfigOptions::default())
                .await?;
        let server = config.cluster_url.to_string().trim_end_matches('/').to_owned();
        let ca_pem = distcache_tests::kubelet::ca_pem(&file)?;
        let client = kube::Client::try_from(config)?;
        let kubelet = Kubelet::new(
            client,
            KubeletConfig {
                node_name,
                dir,
                binaries,
                selector,
                server,
                ca_pem,
                interval: Duration::from_millis(300),
                pod_subnet,
            },
        );
        let stop = tokio_util::sync::CancellationToken::new();
        let signal_stop = stop.clone();
        tokio::spawn(async move {
            let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            else {
                return;
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            signal_stop.cancel();
        });
        kubelet.run(stop).await
    })
}
