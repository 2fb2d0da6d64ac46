//! An authoritative DNS server in-process (hickory-server) on 127.0.0.1, UDP and TCP on one port, serving one
//! zone whose records tests change while nodes resolve them.

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use hickory_proto::rr::{
    LowerName, Name, RData, Record, RecordType, RrKey,
    rdata::{A, SOA, SRV},
};
use hickory_server::{
    Server,
    store::in_memory::InMemoryZoneHandler,
    zone_handler::{AxfrPolicy, Catalog, ZoneType},
};

/// A running zone.
pub struct DnsServer {
    /// Where it answers (UDP and TCP).
    pub addr: SocketAddr,
    origin: Name,
    zone: Arc<InMemoryZoneHandler>,
    serial: AtomicU32,
    task: tokio::task::JoinHandle<()>,
}

fn name(s: &str) -> anyhow::Result<Name> {
    Ok(Name::from_ascii(s)?)
}

impl DnsServer {
    /// Serves an empty zone `origin` (e.g. `distcache.test.`).
    pub async fn start(origin: &str) -> anyhow::Result<Self> {
        let origin = name(origin)?;
        let zone = Arc::new(InMemoryZoneHandler::empty(origin.clone(), ZoneType::Primary, AxfrPolicy::Deny));
        let soa =
            SOA::new(name(&format!("ns.{origin}"))?, name(&format!("admin.{origin}"))?, 1, 60, 60, 600, 0);
        zone.upsert(Record::from_rdata(origin.clone(), 60, RData::SOA(soa)), 1).await;
        let mut catalog = Catalog::new();
        catalog.upsert(LowerName::new(&origin), vec![zone.clone()]);
        let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
        let addr = udp.local_addr()?;
        let tcp = tokio::net::TcpListener::bind(addr).await?;
        let mut server = Server::new(catalog);
        server.register_socket(udp);
        server.register_listener(tcp, Duration::from_secs(5), 4096);
        let task = tokio::spawn(async move {
            let _ = server.block_until_done().await;
        });
        Ok(Self { addr, origin, zone, serial: AtomicU32::new(2), task })
    }

    /// A fully qualified name inside the zone.
    pub fn fqdn(&self, label: &str) -> String {
        format!("{label}.{}", self.origin)
    }

    async fn replace(&self, owner: &str, kind: RecordType, records: Vec<Record>) -> anyhow::Result<()> {
        let owner = name(owner)?;
        self.zone.records_mut().await.remove(&RrKey::new(LowerName::new(&owner), kind));
        for record in records {
            let serial = self.serial.fetch_add(1, Ordering::Relaxed);
            self.zone.upsert(record, serial).await;
        }
        Ok(())
    }

    /// Sets the SRV records of `owner` to `targets` (`(target name, port)`), with `ttl` seconds.
    pub async fn set_srv(&self, owner: &str, targets: &[(String, u16)], ttl: u32) -> anyhow::Result<()> {
        let owner_name = name(owner)?;
        let records = targets
            .iter()
            .map(|(target, port)| {
                Ok(Record::from_rdata(
                    owner_name.clone(),
                    ttl,
                    RData::SRV(SRV::new(10, 10, *port, name(target)?)),
                ))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        self.replace(owner, RecordType::SRV, records).await
    }

    /// Sets the A records of `owner`.
    pub async fn set_a(&self, owner: &str, ips: &[Ipv4Addr], ttl: u32) -> anyhow::Result<()> {
        let owner_name = name(owner)?;
        let records =
            ips.iter().map(|ip| Record::from_rdata(owner_name.clone(), ttl, RData::A(A(*ip)))).collect();
        self.replace(owner, RecordType::A, records).await
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
