//! `distcache-origin --listen 127.0.0.1:8080 --dir examples/data`: the small origin HTTP service of `make demo`
//! (routes in `distcache_tests::origin`). Serves until SIGINT or SIGTERM.

use std::{net::SocketAddr, path::PathBuf};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut listen: SocketAddr = "127.0.0.1:8080".parse()?;
    let mut dir = PathBuf::from("examples/data");
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => {
                listen = args.next().ok_or_else(|| anyhow::anyhow!("--listen needs ADDR"))?.parse()?;
            }
            "--dir" => dir = args.next().ok_or_else(|| anyhow::anyhow!("--dir needs DIR"))?.into(),
            other => anyhow::bail!(
                "unknown argument {other:?}; usage: distcache-origin [--listen ADDR] [--dir DIR]"
            ),
        }
    }
    anyhow::ensure!(dir.is_dir(), "{} is not a directory", dir.display());
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let origin = distcache_tests::origin::Origin::start(listen, dir.clone()).await?;
        println!("origin serving {} on http://{} (request counts: GET /_stats)", dir.display(), origin.addr);
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        drop(origin);
        anyhow::Ok(())
    })
}
