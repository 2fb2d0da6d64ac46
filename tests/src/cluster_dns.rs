//! The real-node test bed's cluster DNS: an authoritative server (hickory-server) for the cluster domain whose
//! records follow the API server's Services and Endpoints (kube-runtime reflectors), as CoreDNS's `kubernetes`
//! plugin answers them:
//!
//! - `<svc>.<ns>.svc.<domain>` A: the ClusterIP, or for a headless Service the ready endpoint addresses;
//! - `<host>.<svc>.<ns>.svc.<domain>` A for each ready address of a headless Service, `<host>` being the address's
//!   hostname (a StatefulSet's pod whose subdomain is the Service) or its IP with dashes (`10-213-128-5`);
//! - SRV `_<port>._<proto>.<svc>.<ns>.svc.<domain>` for each named port, and SRV at the Service's own name for
//!   all its ports: to the ClusterIP name, or to each ready address's name for a headless Service.
//!
//! Any other name in the domain is NXDOMAIN (authoritative, so resolvers walk their search list); names outside
//! it are refused (the bed has no upstream). IPv4 only; no ExternalName, no pod A records. The zone is swapped
//! whole on every change, so a query never sees a half-built zone.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use futures::{FutureExt as _, StreamExt as _, TryStreamExt as _};
use hickory_proto::rr::{
    LowerName, Name, RData, Record,
    rdata::{A, SOA, SRV},
};
use hickory_server::{
    Server,
    store::in_memory::InMemoryZoneHandler,
    zone_handler::{AxfrPolicy, Catalog, ZoneType},
};
use k8s_openapi::api::core::v1::{Endpoints, Service, ServiceSpec};
use kube::{
    Api, Client,
    runtime::{WatchStreamExt as _, reflector, watcher},
};

/// TTL of every answer (and of negative answers, through the SOA): short, since membership follows it.
pub const TTL: u32 = 5;

fn name(text: &str) -> anyhow::Result<Name> {
    Name::from_ascii(text).with_context(|| format!("{text:?} is not a DNS name"))
}

/// The zone's records for these Services and Endpoints, SOA first. A Service whose names cannot be made (none
/// should: its name and namespace are DNS labels) is left out with a warning; the others are served.
pub fn zone_records(
    domain: &Name,
    services: &[Service],
    endpoints: &[Endpoints],
) -> anyhow::Result<Vec<Record>> {
    let soa = SOA::new(
        name(&format!("ns.dns.{domain}"))?,
        name(&format!("hostmaster.{domain}"))?,
        1,
        60,
        60,
        600,
        TTL,
    );
    let mut records = vec![Record::from_rdata(domain.clone(), TTL, RData::SOA(soa))];
    let by_key: BTreeMap<(String, String), &Endpoints> = endpoints
        .iter()
        .filter_map(|e| Some(((e.metadata.namespace.clone()?, e.metadata.name.clone()?), e)))
        .collect();
    for service in services {
        let (Some(ns), Some(svc), Some(spec)) =
            (service.metadata.namespace.as_deref(), service.metadata.name.as_deref(), service.spec.as_ref())
        else {
            continue;
        };
        let endpoints = by_key.get(&(ns.to_owned(), svc.to_owned())).copied();
        match service_records(domain, ns, svc, spec, endpoints) {
            Ok(found) => records.extend(found),
            Err(error) => {
                let error = format!("{error:#}");
                tracing::warn!(namespace = ns, service = svc, %error, "Service left out of the zone");
            }
        }
    }
    Ok(records)
}

/// The records of one Service (`spec`), with its Endpoints when it has some.
fn service_records(
    domain: &Name,
    ns: &str,
    svc: &str,
    spec: &ServiceSpec,
    endpoints: Option<&Endpoints>,
) -> anyhow::Result<Vec<Record>> {
    let mut records = Vec::new();
    let service_name = name(&format!("{svc}.{ns}.svc.{domain}"))?;
    let a = |owner: &Name, ip: Ipv4Addr| Record::from_rdata(owner.clone(), TTL, RData::A(A(ip)));
    let srv = |owner: Name, port: u16, target: &Name| {
        Record::from_rdata(owner, TTL, RData::SRV(SRV::new(0, 100, port, target.clone())))
    };
    let port_owner = |port: &str, protocol: Option<&str>| {
        name(&format!("_{port}._{}.{service_name}", protocol.unwrap_or("TCP").to_ascii_lowercase()))
    };
    match spec.cluster_ip.as_deref() {
        Some("None") => {
            let Some(endpoints) = endpoints else { return Ok(records) };
            for subset in endpoints.subsets.iter().flatten() {
                let mut targets = Vec::new();
                for address in subset.addresses.iter().flatten() {
                    let Ok(ip) = address.ip.parse::<Ipv4Addr>() else { continue };
                    let host = match address.hostname.as_deref() {
                        Some(h) if !h.is_empty() => h.to_owned(),
                        _ => address.ip.replace('.', "-"),
                    };
                    let target = name(&format!("{host}.{service_name}"))?;
                    records.push(a(&service_name, ip));
                    records.push(a(&target, ip));
                    targets.push(target);
                }
                for port in subset.ports.iter().flatten() {
                    let Ok(number) = u16::try_from(port.port) else { continue };
                    for target in &targets {
                        records.push(srv(service_name.clone(), number, target));
                        if let Some(port_name) = port.name.as_deref().filter(|n| !n.is_empty()) {
                            records.push(srv(
                                port_owner(port_name, port.protocol.as_deref())?,
                                number,
                                target,
                            ));
                        }
                    }
                }
            }
        }
        Some(ip) => {
            let Ok(ip) = ip.parse::<Ipv4Addr>() else { return Ok(records) };
            records.push(a(&service_name, ip));
            for port in spec.ports.iter().flatten() {
                let Ok(number) = u16::try_from(port.port) else { continue };
                records.push(srv(service_name.clone(), number, &service_name));
                if let Some(port_name) = port.name.as_deref().filter(|n| !n.is_empty()) {
                    records.push(srv(
                        port_owner(port_name, port.protocol.as_deref())?,
                        number,
                        &service_name,
                    ));
                }
            }
        }
        None => {}
    }
    Ok(records)
}

/// A zone handler holding exactly `records`.
fn build_zone(domain: &Name, records: Vec<Record>) -> InMemoryZoneHandler {
    let mut zone = InMemoryZoneHandler::empty(domain.clone(), ZoneType::Primary, AxfrPolicy::Deny);
    for record in records {
        zone.upsert_mut(record, 1);
    }
    zone
}

/// Serves the cluster domain `domain` (`cluster.local`) on `listen` (UDP and TCP) until the task is dropped or
/// the watches fail for good; `ready` is called once the first zone built from the API's state is served.
pub async fn serve(
    client: Client,
    domain: &str,
    listen: SocketAddr,
    ready: impl FnOnce(),
) -> anyhow::Result<()> {
    let domain = name(&format!("{}.", domain.trim_end_matches('.')))?;
    let zone = Arc::new(build_zone(&domain, zone_records(&domain, &[], &[])?));
    let mut catalog = Catalog::new();
    catalog.upsert(LowerName::new(&domain), vec![zone.clone()]);
    let udp =
        tokio::net::UdpSocket::bind(listen).await.with_context(|| format!("cannot bind UDP {listen}"))?;
    let tcp =
        tokio::net::TcpListener::bind(listen).await.with_context(|| format!("cannot bind TCP {listen}"))?;
    let mut server = Server::new(catalog);
    server.register_socket(udp);
    server.register_listener(tcp, Duration::from_secs(5), 4096);

    let (services, services_writer) = reflector::store::<Service>();
    let (endpoints, endpoints_writer) = reflector::store::<Endpoints>();
    let service_events =
        reflector(services_writer, watcher(Api::<Service>::all(client.clone()), watcher::Config::default()))
            .default_backoff()
            .map_ok(|_| ());
    let endpoint_events =
        reflector(endpoints_writer, watcher(Api::<Endpoints>::all(client), watcher::Config::default()))
            .default_backoff()
            .map_ok(|_| ());
    let mut changes = std::pin::pin!(futures::stream::select(service_events, endpoint_events));
    let mut server_task = tokio::spawn(async move { server.block_until_done().await });
    let mut ready = Some(ready);
    let mut serving: Option<BTreeSet<String>> = None;
    loop {
        tokio::select! {
            change = changes.next() => match change {
                Some(Ok(())) => {}
                Some(Err(error)) => {
                    tracing::warn!(%error, "watch failed; retrying with backoff");
                    continue;
                }
                None => anyhow::bail!("the Service and Endpoints watches ended"),
            },
            result = &mut server_task => {
                result.context("the DNS server panicked")?.context("the DNS server stopped")?;
                anyhow::bail!("the DNS server stopped");
            }
        }
        // Both stores hold a full list (their first Init..InitDone) before a zone is built from them.
        let pending = |ready: Option<Result<(), _>>| !matches!(ready, Some(Ok(())));
        if pending(services.wait_until_ready().now_or_never())
            || pending(endpoints.wait_until_ready().now_or_never())
        {
            continue;
        }
        let services: Vec<Service> = services.state().iter().map(|s| (**s).clone()).collect();
        let endpoints: Vec<Endpoints> = endpoints.state().iter().map(|e| (**e).clone()).collect();
        let records = zone_records(&domain, &services, &endpoints)?;
        let summary: BTreeSet<String> = records.iter().map(ToString::to_string).collect();
        if serving.as_ref() == Some(&summary) {
            continue;
        }
        let mut fresh = build_zone(&domain, records);
        *zone.records_mut().await = std::mem::take(fresh.records_get_mut());
        tracing::info!(records = summary.len(), "zone updated");
        serving = Some(summary);
        if let Some(ready) = ready.take() {
            ready();
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{
        EndpointAddress, EndpointPort, EndpointSubset, ServicePort, ServiceSpec,
    };
    use kube::api::ObjectMeta;

    use super::*;

    fn meta(name: &str) -> ObjectMeta {
        ObjectMeta { name: Some(name.into()), namespace: Some("default".into()), ..Default::default() }
    }

    fn answers(records: &[Record], owner: &str) -> Vec<String> {
        let mut found: Vec<String> = records
            .iter()
            .filter(|r| r.name.to_string() == owner)
            .map(|r| format!("{} {}", r.record_type(), r.data))
            .collect();
        found.sort();
        found
    }

    #[test]
    fn cluster_ip_and_headless_services_answer_as_coredns_does() {
        let domain = Name::from_ascii("cluster.local.").expect("domain");
        let port = |name: &str, number: i32| ServicePort {
            name: Some(name.into()),
            port: number,
            protocol: Some("TCP".into()),
            ..Default::default()
        };
        let services = vec![
            Service {
                metadata: meta("demo"),
                spec: Some(ServiceSpec {
                    cluster_ip: Some("10.213.64.20".into()),
                    ports: Some(vec![port("grpc", 7420)]),
                    ..Default::default()
                }),
                ..Default::default()
            },
            Service {
                metadata: meta("demo-peers"),
                spec: Some(ServiceSpec {
                    cluster_ip: Some("None".into()),
                    ports: Some(vec![port("peer", 7422)]),
                    ..Default::default()
                }),
                ..Default::default()
            },
            // Headless without Endpoints yet: no records at all (NXDOMAIN), not an error.
            Service {
                metadata: meta("pending"),
                spec: Some(ServiceSpec { cluster_ip: Some("None".into()), ..Default::default() }),
                ..Default::default()
            },
        ];
        let address = |ip: &str, hostname: Option<&str>| EndpointAddress {
            ip: ip.into(),
            hostname: hostname.map(Into::into),
            ..Default::default()
        };
        let endpoints = vec![Endpoints {
            metadata: meta("demo-peers"),
            subsets: Some(vec![EndpointSubset {
                addresses: Some(vec![address("10.213.128.5", Some("demo-0")), address("10.213.128.6", None)]),
                not_ready_addresses: Some(vec![address("10.213.128.7", Some("demo-2"))]),
                ports: Some(vec![EndpointPort {
                    name: Some("peer".into()),
                    port: 7422,
                    protocol: Some("TCP".into()),
                    ..Default::default()
                }]),
            }]),
        }];
        let records = zone_records(&domain, &services, &endpoints).expect("records");
        assert_eq!(
            answers(&records, "demo.default.svc.cluster.local."),
            ["A 10.213.64.20", "SRV 0 100 7420 demo.default.svc.cluster.local."]
        );
        assert_eq!(
            answers(&records, "_grpc._tcp.demo.default.svc.cluster.local."),
            ["SRV 0 100 7420 demo.default.svc.cluster.local."]
        );
        assert_eq!(
            answers(&records, "demo-peers.default.svc.cluster.local."),
            [
                "A 10.213.128.5",
                "A 10.213.128.6",
                "SRV 0 100 7422 10-213-128-6.demo-peers.default.svc.cluster.local.",
                "SRV 0 100 7422 demo-0.demo-peers.default.svc.cluster.local.",
            ],
            "ready addresses only"
        );
        assert_eq!(
            answers(&records, "_peer._tcp.demo-peers.default.svc.cluster.local."),
            [
                "SRV 0 100 7422 10-213-128-6.demo-peers.default.svc.cluster.local.",
                "SRV 0 100 7422 demo-0.demo-peers.default.svc.cluster.local.",
            ]
        );
        assert_eq!(answers(&records, "demo-0.demo-peers.default.svc.cluster.local."), ["A 10.213.128.5"]);
        assert!(answers(&records, "demo-2.demo-peers.default.svc.cluster.local.").is_empty(), "not ready");
        assert!(answers(&records, "pending.default.svc.cluster.local.").is_empty());
    }
}
