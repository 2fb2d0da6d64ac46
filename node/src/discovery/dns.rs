//! DNS discovery, for headless Services: the name's SRV records (target and port of every member) when it has
//! some, else its A/AAAA records with the configured port. The name is resolved again every `interval`, sooner
//! when the records' TTL ends earlier; the resolved addresses are health-checked like a static list (which also
//! learns each member's name, the ring identity), so a member leaves when it stops answering even before DNS
//! drops it.
//!
//! A failed resolution (server unreachable, SERVFAIL) keeps the last resolved addresses and is reported through
//! `DiscoveryStatus`; an authoritative "no such records" is an empty member set. The first member set is reported
//! once the first resolution succeeded and the addresses were probed (see `Prober`), so nodes started together
//! agree.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use async_trait::async_trait;
use hickory_resolver::{
    TokioResolver,
    config::{NameServerConfig, ResolverConfig, ResolverOpts},
    net::runtime::TokioRuntimeProvider,
    proto::rr::RData,
};

use super::{Discovery, DiscoveryContext, StaticListSettings, static_list::Prober};

/// Shortest pause between two resolutions, whatever the TTL says.
const MIN_REFRESH: Duration = Duration::from_secs(1);

/// DNS discovery settings.
#[derive(Clone, Debug)]
pub struct DnsSettings {
    /// The name to resolve (a headless Service: `demo-peers.default.svc.cluster.local`).
    pub name: String,
    /// Port of A/AAAA answers (SRV answers carry their own).
    pub port: u16,
    /// Longest time between two resolutions.
    pub interval: Duration,
    /// Name servers to ask (`ip:port`); empty = the system's (`/etc/resolv.conf`).
    pub nameservers: Vec<SocketAddr>,
    /// Health checks of the resolved addresses.
    pub probes: StaticListSettings,
}

/// DNS discovery.
pub struct Dns {
    settings: DnsSettings,
}

impl Dns {
    /// A backend with these settings.
    pub fn new(settings: DnsSettings) -> Self {
        Self { settings }
    }
}

fn resolver(nameservers: &[SocketAddr]) -> Result<TokioResolver, String> {
    let mut opts = ResolverOpts::default();
    // Membership must follow the records: no answers kept beyond their TTL, no negative caching.
    opts.cache_size = 0;
    opts.timeout = Duration::from_secs(2);
    opts.attempts = 2;
    let builder = if nameservers.is_empty() {
        TokioResolver::builder_tokio()
            .map_err(|e| format!("cannot read the system's DNS configuration: {e}"))?
    } else {
        let servers = nameservers
            .iter()
            .map(|addr| {
                let mut server = NameServerConfig::udp_and_tcp(addr.ip());
                for connection in &mut server.connections {
                    connection.port = addr.port();
                }
                server
            })
            .collect();
        TokioResolver::builder_with_config(
            ResolverConfig::from_name_servers(servers),
            TokioRuntimeProvider::default(),
        )
    };
    builder.with_options(opts).build().map_err(|e| format!("cannot build a DNS resolver: {e}"))
}

fn join(ip: IpAddr, port: u16) -> String {
    SocketAddr::new(ip, port).to_string()
}

/// The addresses `name` stands for, and until when the answer is valid.
async fn resolve(resolver: &TokioResolver, name: &str, port: u16) -> Result<(Vec<String>, Instant), String> {
    match resolver.srv_lookup(name).await {
        Ok(srv) => {
            let mut addresses = BTreeSet::new();
            let mut valid_until = srv.valid_until();
            for record in srv.answers() {
                let RData::SRV(srv) = &record.data else { continue };
                let target = srv.target.to_utf8();
                let ips = resolver
                    .lookup_ip(target.as_str())
                    .await
                    .map_err(|e| format!("resolving SRV target {target} of {name}: {e}"))?;
                valid_until = valid_until.min(ips.valid_until());
                addresses.extend(ips.iter().map(|ip| join(ip, srv.port)));
            }
            Ok((addresses.into_iter().collect(), valid_until))
        }
        Err(e) if e.is_no_records_found() || e.is_nx_domain() => match resolver.lookup_ip(name).await {
            Ok(ips) => {
                let addresses: BTreeSet<String> = ips.iter().map(|ip| join(ip, port)).collect();
                Ok((addresses.into_iter().collect(), ips.valid_until()))
            }
            // No SRV and no A/AAAA: a headless Service without ready endpoints. No peers.
            Err(e) if e.is_no_records_found() || e.is_nx_domain() => Ok((Vec::new(), Instant::now())),
            Err(e) => Err(format!("resolving {name}: {e}")),
        },
        Err(e) => Err(format!("resolving SRV records of {name}: {e}")),
    }
}

#[async_trait]
impl Discovery for Dns {
    fn name(&self) -> &'static str {
        "dns"
    }

    async fn run(self: Box<Self>, ctx: DiscoveryContext) {
        let settings = self.settings;
        let resolver = match resolver(&settings.nameservers) {
            Ok(r) => r,
            Err(e) => {
                ctx.status.problem(e);
                ctx.shutdown.cancelled().await;
                return;
            }
        };
        let mut prober = Prober::new(settings.probes.clone(), "dns");
        let mut peers: Option<Vec<String>> = None;
        let mut next_resolve = Instant::now();
        let mut ticker = tokio::time::interval(settings.probes.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = ctx.shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            if Instant::now() >= next_resolve {
                match resolve(&resolver, &settings.name, settings.port).await {
                    Ok((mut addresses, valid_until)) => {
                        ctx.status.healthy();
                        addresses.retain(|a| *a != ctx.local.address);
                        if peers.as_ref() != Some(&addresses) {
                            tracing::info!(name = %settings.name, addresses = ?addresses, "DNS answer changed");
                        }
                        peers = Some(addresses);
                        let ttl = valid_until.saturating_duration_since(Instant::now());
                        next_resolve =
                            Instant::now() + ttl.clamp(MIN_REFRESH, settings.interval.max(MIN_REFRESH));
                    }
                    Err(e) => {
                        // Keep the last answer; try again soon.
                        ctx.status.problem(e);
                        next_resolve =
                            Instant::now() + MIN_REFRESH.max(settings.interval.min(Duration::from_secs(5)));
                    }
                }
            }
            if let Some(peers) = &peers
                && !prober.round(peers, &ctx).await
            {
                return;
            }
        }
    }
}
