//! `distcache-origin --listen 127.0.0.1:8080 --dir examples/data [--delay 20ms]`: the small origin HTTP service
//! of `make demo` and `make bench` (routes, and the `/_control` endpoint that makes it fail or slow down at run
//! time, in `distcache_tests::origin`). `--delay` holds every data answer that long (a backend's latency, e.g.
//! for the benchmark). Serves until SIGINT or SIGTERM.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

const USAGE: &str = "usage: distcache-origin [--listen ADDR] [--dir DIR] [--delay DURATION (e.g. 20ms)]";

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut listen: SocketAddr = "127.0.0.1:8080".parse()?;
    let mut dir = PathBuf::from("examples/data");
    let mut delay = Duration::ZERO;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => {
                listen = args.next().ok_or_else(|| anyhow::anyhow!("--listen needs ADDR"))?.parse()?;
            }
            "--dir" => dir = args.next().ok_or_else(|| anyhow::anyhow!("--dir needs DIR"))?.into(),
            "--delay" => {
                let value =
                    args.next().ok_or_else(|| anyhow::anyhow!("--delay needs a duration, e.g. 20ms"))?;
                let parsed: distcache_api::DurationString =
                    value.parse().map_err(|e| anyhow::anyhow!("--delay {value}: {e}"))?;
                delay = parsed.get();
            }
            "--help" | "-h" => {
                println!("{USAGE}");
                return Ok(());
            }
            other => anyhow::bail!("unknown argument {other:?}; {USAGE}"),
        }
    }
    anyhow::ensure!(dir.is_dir(), "{} is not a directory", dir.display());
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let origin = distcache_tests::origin::Origin::start(listen, dir.clone()).await?;
        origin.set_delay(delay);
        println!(
            "origin serving {} on http://{} (answers delayed {delay:?}; request counts: GET /_stats; \
             failures and delays: /_control?fail=503|off&delay_ms=N&burst=N)",
            dir.display(),
            origin.addr
        );
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        drop(origin);
        anyhow::Ok(())
    })
}
