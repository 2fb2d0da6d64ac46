//! NATS discovery: the nodes of a cluster announce themselves on subjects under a shared prefix; a member is a
//! node heard from within the last `missed_heartbeats × heartbeat`.
//!
//! Protocol (UTF-8 JSON via core NATS publish/subscribe, no JetStream; `<subject>` is the configured prefix):
//!
//! - `<subject>.announce`: `{ "name": "node-1", "address": "10.0.0.7:7420", "kind": "join" | "heartbeat" |
//!   "leave" }`. A node publishes `join` when it starts (and again after every reconnect), `heartbeat` every
//!   `heartbeat` interval and in answer to a hello, and `leave` (a goodbye) when it stops gracefully.
//! - `<subject>.hello`: `{ "name": "node-1" }`. Published right after the join (and after every reconnect); every
//!   other node answers at once with a `heartbeat` announcement, so a new node learns the cluster without waiting
//!   for a heartbeat round.
//!
//! A `join` or `heartbeat` adds the sender (or updates its address); a `leave` removes it at once; a member not
//! heard from for `missed_heartbeats × heartbeat` expires (a node killed without a goodbye). Announcements with
//! this node's own name are ignored, and so is anything malformed (counted, logged at debug level).
//!
//! Settling: the first member set is reported (which makes the node ready) one `heartbeat` after the join, when
//! the answers to the hello have arrived, so nodes started together become ready with the same ring. After that,
//! every change (join, leave, expiry, address change) is reported at once.
//!
//! Connection: the first connection is retried with backoff until it succeeds; meanwhile
//! `cannot connect to <url>: <error>` is the discovery problem (`/readyz` explains it, the node is not ready).
//! After that the client reconnects by itself; a lost connection is reported as a problem while the last known
//! members keep serving: expiry pauses while disconnected (silence from the others is then no evidence that they
//! died) and resumes with fresh timestamps after the reconnect, when this node announces itself and says hello
//! again so membership recovers within one round trip.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use async_nats::{Client, ConnectOptions, Event, Subscriber, connection::State};
use async_trait::async_trait;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::{Discovery, DiscoveryContext};
use crate::ring::Member;

/// NATS discovery settings.
#[derive(Clone, Debug)]
pub struct NatsSettings {
    /// Server URL(s), comma-separated.
    pub url: String,
    /// Subject prefix shared by the cluster.
    pub subject: String,
    /// Heartbeat interval.
    pub heartbeat: Duration,
    /// Missed heartbeats before a member leaves.
    pub missed_heartbeats: u32,
}

/// NATS discovery.
pub struct Nats {
    settings: NatsSettings,
}

impl Nats {
    /// A backend with these settings.
    pub fn new(settings: NatsSettings) -> Self {
        Self { settings }
    }
}

/// Longest accepted member name or address in an announcement.
const MAX_FIELD: usize = 512;
/// How long a stopping node waits to get its goodbye out.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Kind {
    Join,
    Heartbeat,
    Leave,
}

#[derive(Debug, Serialize, Deserialize)]
struct Announcement {
    name: String,
    address: String,
    kind: Kind,
}

#[derive(Debug, Serialize, Deserialize)]
struct Hello {
    name: String,
}

struct Seen {
    address: String,
    at: Instant,
}

/// The running backend's state.
struct Session {
    ctx: DiscoveryContext,
    client: Client,
    url: String,
    announce_subject: String,
    hello_subject: String,
    expiry: Duration,
    members: HashMap<String, Seen>,
    connected: bool,
    settle_at: Instant,
    last_sent: Option<Vec<Member>>,
    malformed: u64,
}

#[async_trait]
impl Discovery for Nats {
    fn name(&self) -> &'static str {
        "nats"
    }

    async fn run(self: Box<Self>, ctx: DiscoveryContext) {
        let settings = self.settings;
        let heartbeat = settings.heartbeat.max(Duration::from_millis(10));
        let (events_tx, mut events) = mpsc::unbounded_channel::<Event>();
        let Some(client) = connect(&settings, &ctx, heartbeat, &events_tx).await else { return };
        ctx.status.healthy();
        tracing::info!(url = %settings.url, subject = %settings.subject, "connected to NATS");
        let prefix = settings.subject.trim_end_matches('.');
        let mut session = Session {
            client,
            url: settings.url.clone(),
            announce_subject: format!("{prefix}.announce"),
            hello_subject: format!("{prefix}.hello"),
            expiry: heartbeat.saturating_mul(settings.missed_heartbeats.max(1)),
            members: HashMap::new(),
            connected: true,
            settle_at: Instant::now() + heartbeat,
            last_sent: None,
            malformed: 0,
            ctx,
        };
        let Some(mut sub) = session.subscribe(prefix, heartbeat).await else { return };
        session.introduce().await;

        let mut heartbeats = tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
        heartbeats.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut checks = tokio::time::interval((heartbeat / 4).max(Duration::from_millis(5)));
        checks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = session.ctx.shutdown.cancelled() => {
                    session.goodbye().await;
                    return;
                }
                message = sub.next() => {
                    if let Some(m) = message {
                        session.on_message(&m);
                    } else {
                        tracing::warn!("NATS subscription ended; subscribing again");
                        let Some(s) = session.subscribe(prefix, heartbeat).await else { return };
                        sub = s;
                        session.introduce().await;
                    }
                }
                Some(event) = events.recv() => session.on_event(event).await,
                _ = heartbeats.tick() => {
                    if session.connected {
                        session.announce(Kind::Heartbeat).await;
                    }
                }
                _ = checks.tick() => {
                    session.check_state().await;
                    session.expire();
                }
            }
            if !session.report().await {
                return;
            }
        }
    }
}

/// Connects, retrying with backoff until it works or the node stops (then `None`).
async fn connect(
    settings: &NatsSettings,
    ctx: &DiscoveryContext,
    heartbeat: Duration,
    events_tx: &mpsc::UnboundedSender<Event>,
) -> Option<Client> {
    let servers: Vec<String> =
        settings.url.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect();
    // Reconnects after a lost connection: at once, then backing off up to about one heartbeat (at most 2 s), so
    // a node is back within a heartbeat of the server's return.
    let cap = heartbeat.clamp(Duration::from_millis(250), Duration::from_secs(2));
    let mut backoff = Duration::from_millis(100);
    loop {
        let tx = events_tx.clone();
        let options = ConnectOptions::new()
            .name(format!("distcache {}", ctx.local.name))
            .connection_timeout(Duration::from_secs(5))
            .max_reconnects(None)
            .reconnect_delay_callback(move |attempts| reconnect_delay(attempts, cap))
            .event_callback(move |event| {
                // The receiver is gone only when discovery stopped.
                let _ = tx.send(event);
                async {}
            });
        let attempt = tokio::select! {
            () = ctx.shutdown.cancelled() => return None,
            r = options.connect(servers.clone()) => r,
        };
        match attempt {
            Ok(client) => return Some(client),
            Err(e) => {
                ctx.status.problem(format!("cannot connect to {}: {e}", settings.url));
                tokio::select! {
                    () = ctx.shutdown.cancelled() => return None,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

fn reconnect_delay(attempts: usize, cap: Duration) -> Duration {
    if attempts <= 1 {
        return Duration::ZERO;
    }
    let exp = u32::try_from(attempts - 2).unwrap_or(u32::MAX).min(16);
    Duration::from_millis(50).saturating_mul(1 << exp).min(cap)
}

impl Session {
    /// Subscribes to `<prefix>.*`, retrying until it works or the node stops.
    async fn subscribe(&self, prefix: &str, heartbeat: Duration) -> Option<Subscriber> {
        loop {
            match self.client.subscribe(format!("{prefix}.*")).await {
                Ok(s) => return Some(s),
                Err(e) => self.ctx.status.problem(format!("cannot subscribe on {}: {e}", self.url)),
            }
            tokio::select! {
                () = self.ctx.shutdown.cancelled() => return None,
                () = tokio::time::sleep(heartbeat) => {}
            }
        }
    }

    /// Announces this node (`join`) and asks the others to answer at once.
    async fn introduce(&self) {
        self.announce(Kind::Join).await;
        let hello = Hello { name: self.ctx.local.name.clone() };
        self.publish(&self.hello_subject, &hello).await;
    }

    async fn announce(&self, kind: Kind) {
        let a =
            Announcement { name: self.ctx.local.name.clone(), address: self.ctx.local.address.clone(), kind };
        self.publish(&self.announce_subject, &a).await;
    }

    async fn publish(&self, subject: &str, body: &impl Serialize) {
        let payload = match serde_json::to_vec(body) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "cannot encode a NATS discovery message");
                return;
            }
        };
        if let Err(e) = self.client.publish(subject.to_owned(), payload.into()).await {
            tracing::debug!(error = %e, subject, "NATS publish failed");
        }
    }

    /// Publishes `leave` and flushes it, bounded in time (a disconnected client would wait for the server).
    async fn goodbye(&self) {
        if !self.connected {
            return;
        }
        let sent = tokio::time::timeout(GOODBYE_TIMEOUT, async {
            self.announce(Kind::Leave).await;
            self.client.flush().await
        })
        .await;
        match sent {
            Ok(Ok(())) => tracing::info!("left the NATS discovery group"),
            Ok(Err(e)) => tracing::debug!(error = %e, "could not flush the NATS goodbye"),
            Err(_) => tracing::debug!("NATS goodbye timed out"),
        }
    }

    fn on_message(&mut self, message: &async_nats::Message) {
        let subject = message.subject.as_str();
        if subject == self.announce_subject {
            match serde_json::from_slice::<Announcement>(&message.payload) {
                Ok(a) if valid_field(&a.name) && valid_field(&a.address) => self.on_announcement(a),
                Ok(_) => self.malformed("announcement with an empty or invalid name or address"),
                Err(e) => self.malformed(&format!("announcement: {e}")),
            }
        } else if subject == self.hello_subject {
            match serde_json::from_slice::<Hello>(&message.payload) {
                Ok(h) if h.name == self.ctx.local.name => {}
                Ok(h) if valid_field(&h.name) => {
                    tracing::debug!(from = %h.name, "hello; answering");
                    let client = self.client.clone();
                    let subject = self.announce_subject.clone();
                    let a = Announcement {
                        name: self.ctx.local.name.clone(),
                        address: self.ctx.local.address.clone(),
                        kind: Kind::Heartbeat,
                    };
                    // Answer without blocking the loop on the client's queue.
                    tokio::spawn(async move {
                        if let Ok(payload) = serde_json::to_vec(&a)
                            && let Err(e) = client.publish(subject, payload.into()).await
                        {
                            tracing::debug!(error = %e, "NATS publish failed");
                        }
                    });
                }
                Ok(_) => self.malformed("hello with an empty or invalid name"),
                Err(e) => self.malformed(&format!("hello: {e}")),
            }
        } else {
            self.malformed(&format!("unexpected subject {subject}"));
        }
    }

    fn on_announcement(&mut self, a: Announcement) {
        if a.name == self.ctx.local.name {
            if a.address != self.ctx.local.address {
                tracing::warn!(name = %a.name, address = %a.address, "another node announces this node's name");
            }
            return;
        }
        match a.kind {
            Kind::Leave => {
                if self.members.remove(&a.name).is_some() {
                    tracing::info!(name = %a.name, "member said goodbye; leaving the ring");
                }
            }
            Kind::Join | Kind::Heartbeat => {
                let now = Instant::now();
                if let Some(seen) = self.members.get_mut(&a.name) {
                    if seen.address != a.address {
                        tracing::info!(name = %a.name, from = %seen.address, to = %a.address, "member moved");
                        seen.address = a.address;
                    }
                    seen.at = now;
                } else {
                    tracing::info!(name = %a.name, address = %a.address, kind = ?a.kind, "member joins the ring");
                    self.members.insert(a.name, Seen { address: a.address, at: now });
                }
            }
        }
    }

    fn malformed(&mut self, what: &str) {
        self.malformed = self.malformed.saturating_add(1);
        tracing::debug!(what, ignored = self.malformed, "ignoring a malformed NATS discovery message");
    }

    async fn on_event(&mut self, event: Event) {
        match event {
            Event::Connected => self.on_connected().await,
            Event::Disconnected => self.on_disconnected(),
            Event::ClientError(e) => {
                if self.connected {
                    tracing::debug!(error = %e, "NATS client error");
                } else {
                    self.ctx.status.problem(format!("cannot connect to {}: {e}", self.url));
                }
            }
            Event::ServerError(e) => tracing::warn!(error = %e, "NATS server error"),
            other => tracing::info!(event = %other, "NATS connection event"),
        }
    }

    /// Catches a state change whose event was missed.
    async fn check_state(&mut self) {
        match self.client.connection_state() {
            State::Connected if !self.connected => self.on_connected().await,
            State::Disconnected if self.connected => self.on_disconnected(),
            _ => {}
        }
    }

    async fn on_connected(&mut self) {
        if self.connected {
            return;
        }
        self.connected = true;
        self.ctx.status.healthy();
        tracing::info!(url = %self.url, "reconnected to NATS; announcing again");
        // Silence while disconnected was no evidence: everybody gets a fresh expiry.
        let now = Instant::now();
        for seen in self.members.values_mut() {
            seen.at = now;
        }
        self.introduce().await;
    }

    fn on_disconnected(&mut self) {
        if !self.connected {
            return;
        }
        self.connected = false;
        self.ctx.status.problem(format!("disconnected from {}; reconnecting", self.url));
    }

    /// Removes the members not heard from within the expiry (not while disconnected).
    fn expire(&mut self) {
        if !self.connected {
            return;
        }
        let now = Instant::now();
        let expiry = self.expiry;
        self.members.retain(|name, seen| {
            let alive = now.duration_since(seen.at) < expiry;
            if !alive {
                tracing::warn!(name = %name, ?expiry, "member missed its heartbeats; leaving the ring");
            }
            alive
        });
    }

    /// Sends the member set when it changed (and once settled). False when the engine is gone.
    async fn report(&mut self) -> bool {
        if self.last_sent.is_none() && Instant::now() < self.settle_at {
            return true;
        }
        let mut members: Vec<Member> =
            self.members.iter().map(|(name, seen)| Member::new(name.clone(), seen.address.clone())).collect();
        members.sort();
        if self.last_sent.as_ref() == Some(&members) {
            return true;
        }
        if self.ctx.updates.send(members.clone()).await.is_err() {
            return false;
        }
        self.last_sent = Some(members);
        true
    }
}

fn valid_field(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_FIELD && !s.chars().any(char::is_whitespace)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announcements_round_trip_as_documented() {
        let a = Announcement { name: "n".into(), address: "127.0.0.1:1".into(), kind: Kind::Heartbeat };
        let json = serde_json::to_string(&a).unwrap_or_default();
        assert_eq!(json, r#"{"name":"n","address":"127.0.0.1:1","kind":"heartbeat"}"#);
        assert!(
            serde_json::from_str::<Announcement>(r#"{"name":"n","address":"a:1","kind":"nope"}"#).is_err()
        );
    }

    #[test]
    fn reconnect_delay_backs_off_to_the_cap() {
        let cap = Duration::from_millis(250);
        assert_eq!(reconnect_delay(1, cap), Duration::ZERO);
        assert_eq!(reconnect_delay(2, cap), Duration::from_millis(50));
        assert_eq!(reconnect_delay(3, cap), Duration::from_millis(100));
        assert_eq!(reconnect_delay(40, cap), cap);
    }
}
