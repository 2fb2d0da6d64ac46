//! `distcache-otlp-sink [--listen 127.0.0.1:4317]`: an OTLP/gRPC trace collector that counts what it receives
//! and keeps nothing (`distcache_tests::otlp::Collector::start_counting_on`), for `make bench`'s tracing runs: it
//! shares the cores with the nodes measured, so it must cost next to nothing. Prints the address it serves on, then
//! `spans received: N` each second the count changed. Serves until SIGINT or SIGTERM.

use std::net::SocketAddr;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut listen: SocketAddr = "127.0.0.1:4317".parse()?;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => {
                listen = args.next().ok_or_else(|| anyhow::anyhow!("--listen needs ADDR"))?.parse()?;
            }
            other => anyhow::bail!("unknown argument {other:?}; usage: distcache-otlp-sink [--listen ADDR]"),
        }
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let collector = distcache_tests::otlp::Collector::start_counting_on(listen).await?;
        println!("OTLP sink on http://{}", collector.addr);
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        let mut said = 0;
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
                _ = tick.tick() => {
                    let received = collector.count();
                    if received != said {
                        println!("spans received: {received}");
                        said = received;
                    }
                }
            }
        }
        anyhow::Ok(())
    })
}
