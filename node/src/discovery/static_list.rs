//! A fixed list of peer addresses, health-checked: a peer is a member while it answers `Peer.Ping`, leaves the
//! ring after `failure_threshold` consecutive failed probes, and rejoins when it answers again. Probing also
//! learns each peer's member name, which is the ring identity.
//!
//! Settling: the first member set is reported (which makes the node ready) once every listed peer has answered,
//! or after `failure_threshold` rounds, whichever comes first, so nodes started together become ready with the
//! same ring instead of each with whatever answered in the first second.
//!
//! Timing: a probe round starts every `interval` and each probe is bounded by `timeout` (< interval), so a dead
//! peer leaves after at most `failure_threshold × interval + timeout` (1 s × 3 + 0.8 s by default, under 5 s).

use std::{collections::HashMap, time::Duration};

use async_trait::async_trait;

use super::{Discovery, DiscoveryContext};
use crate::ring::Member;

/// Probe settings of static discovery.
#[derive(Clone, Debug)]
pub struct StaticListSettings {
    /// Time between probe rounds.
    pub interval: Duration,
    /// Deadline of one probe.
    pub timeout: Duration,
    /// Consecutive failures before a peer leaves.
    pub failure_threshold: u32,
}

impl Default for StaticListSettings {
    fn default() -> Self {
        Self { interval: Duration::from_secs(1), timeout: Duration::from_millis(800), failure_threshold: 3 }
    }
}

/// Static peer list discovery.
pub struct StaticList {
    peers: Vec<String>,
    settings: StaticListSettings,
}

impl StaticList {
    /// Peers as `host:port`; the node's own advertise address may be in the list (it is skipped).
    pub fn new(peers: Vec<String>, settings: StaticListSettings) -> Self {
        Self { peers, settings }
    }
}

struct PeerState {
    member: Option<Member>,
    failures: u32,
}

#[async_trait]
impl Discovery for StaticList {
    fn name(&self) -> &'static str {
        "static"
    }

    async fn run(self: Box<Self>, ctx: DiscoveryContext) {
        let peers: Vec<String> = self.peers.into_iter().filter(|p| *p != ctx.local.address).collect();
        let mut prober = Prober::new(self.settings.clone(), "static");
        let mut ticker = tokio::time::interval(self.settings.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = ctx.shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            if !prober.round(&peers, &ctx).await {
                return;
            }
        }
    }
}

/// Health-checks a set of peer addresses (which may change between rounds) and reports the members they
/// answer as: shared by static discovery (a fixed list) and DNS discovery (the resolved addresses).
pub(crate) struct Prober {
    settings: StaticListSettings,
    backend: &'static str,
    state: HashMap<String, PeerState>,
    rounds: u32,
    last_sent: Option<Vec<Member>>,
}

impl Prober {
    pub(crate) fn new(settings: StaticListSettings, backend: &'static str) -> Self {
        Self { settings, backend, state: HashMap::new(), rounds: 0, last_sent: None }
    }

    /// Probes every address of `peers` once and sends the member set when it has settled and changed.
    /// Addresses no longer listed are forgotten. Returns false when nobody listens for updates any more.
    pub(crate) async fn round(&mut self, peers: &[String], ctx: &DiscoveryContext) -> bool {
        let backend = self.backend;
        self.state.retain(|addr, _| peers.contains(addr));
        for p in peers {
            self.state.entry(p.clone()).or_insert(PeerState { member: None, failures: 0 });
        }
        let probes = peers.iter().map(|addr| {
            let transport = ctx.transport.clone();
            let timeout = self.settings.timeout;
            async move {
                let r = tokio::time::timeout(timeout, transport.ping(addr)).await;
                (addr.clone(), r)
            }
        });
        for (addr, result) in futures::future::join_all(probes).await {
            let Some(s) = self.state.get_mut(&addr) else { continue };
            match result {
                Ok(Ok(pong)) if pong.member.name == ctx.local.name => {
                    // The list names this node under another address: not a peer.
                    s.member = None;
                }
                Ok(Ok(pong)) if pong.leaving => {
                    // It hands its entries off and stops: out of the ring at once, not after missed probes.
                    if let Some(m) = s.member.take() {
                        tracing::info!(backend, peer = %addr, name = %m.name, "peer is leaving; leaving the ring");
                    }
                }
                Ok(Ok(crate::peer::Pong { member: m, .. })) => {
                    if s.member.is_none() {
                        tracing::info!(backend, peer = %addr, name = %m.name, "peer answers; joining the ring");
                    }
                    // Dial the address from the list: it is the one known to be reachable from here.
                    s.member = Some(Member::new(m.name, addr.clone()));
                    s.failures = 0;
                }
                Ok(Err(e)) => {
                    s.failures = s.failures.saturating_add(1);
                    tracing::debug!(backend, peer = %addr, error = %e, failures = s.failures, "peer probe failed");
                }
                Err(_) => {
                    s.failures = s.failures.saturating_add(1);
                    tracing::debug!(backend, peer = %addr, failures = s.failures, "peer probe timed out");
                }
            }
            if s.failures >= self.settings.failure_threshold
                && let Some(m) = s.member.take()
            {
                tracing::warn!(backend, peer = %addr, name = %m.name, "peer stopped answering; leaving the ring");
            }
        }
        self.rounds = self.rounds.saturating_add(1);
        let mut members: Vec<Member> = self.state.values().filter_map(|s| s.member.clone()).collect();
        members.sort();
        members.dedup_by(|a, b| a.name == b.name);
        let settled = members.len() == peers.len() || self.rounds >= self.settings.failure_threshold;
        if self.last_sent.is_none() && !settled {
            return true;
        }
        if self.last_sent.as_ref() != Some(&members) {
            if ctx.updates.send(members.clone()).await.is_err() {
                return false;
            }
            self.last_sent = Some(members);
        }
        true
    }
}
