//! The DistCache controller: watches DistCaches and the objects they own, and reconciles each as
//! validate → build → apply → status (one module each). `validate` parses the DistCache into a typed
//! [`validate::ValidSpec`], the only input of `build`; both are pure. `apply` and `status` talk to the API server
//! (and `status` to the nodes' admin endpoints).
//!
//! Requeue policy: settled → after 5 minutes; rolling or scaling → after 5 seconds; a keyspace loading or refused
//! on some node → after 15 seconds;
//! invalid spec → no requeue (a spec change triggers the next run) + Event + Degraded condition; transient error
//! → per-object exponential backoff from 1 s, capped at 5 minutes, reset by the next success. A DistCache that
//! cannot even be deserialized is reported by an Event and skipped; it never stops the others.

pub mod apply;
pub mod build;
pub mod scale;
pub mod status;
pub mod validate;

use std::{collections::HashMap, sync::Arc, time::Duration};
use tracing::Instrument;

use distcache_api::{DistCache, HookState};
use futures::StreamExt;
use k8s_openapi::api::{
    apps::v1::StatefulSet,
    core::v1::{ConfigMap, Secret, Service},
};
use kube::{
    Api, Client, Resource,
    core::{DeserializeGuard, PartialObjectMeta},
    runtime::{
        Controller,
        controller::Action,
        events::{Event, EventType, Recorder, Reporter},
        reflector::{ObjectRef, Store},
        watcher,
    },
};
use parking_lot::Mutex;

use crate::{capabilities::Capabilities, metrics::Metrics};
use build::BuildConfig;

/// A failed reconcile step; the message names the step and object, the cause is the source.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Server-side apply of an owned object failed.
    #[error("failed to apply {kind} {name}")]
    Apply {
        /// Object kind.
        kind: String,
        /// Object name.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// An object of the name the DistCache needs exists and belongs to someone else; it is left alone.
    #[error(
        "{kind} {name} already exists and is not controlled by this DistCache: rename the DistCache or remove that \
         {kind}"
    )]
    NameConflict {
        /// Object kind.
        kind: String,
        /// Object name.
        name: String,
    },
    /// Deleting an owned object failed.
    #[error("failed to delete {kind} {name}")]
    Delete {
        /// Object kind.
        kind: String,
        /// Object name.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Discovering the server's APIs failed.
    #[error("failed to discover the API server's {api} API")]
    Discovery {
        /// Which API was looked for.
        api: &'static str,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Reading the TLS Secret failed (not: it does not exist, which the TLSReady condition reports).
    #[error("failed to read the TLS Secret {name}")]
    Secret {
        /// Secret name.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Reading an owned object failed.
    #[error("failed to read {kind} {name}")]
    Read {
        /// Object kind.
        kind: String,
        /// Object name.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Listing the node pods failed.
    #[error("failed to list the node pods of DistCache {name}")]
    Pods {
        /// DistCache name.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Writing the status failed.
    #[error("failed to update the status of DistCache {name}")]
    Status {
        /// DistCache name.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// The object could not be read as a DistCache (it passed the server's schema but not the operator's).
    #[error("invalid DistCache: {0}")]
    Invalid(String),
}

impl Error {
    /// A short reason for Events and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Apply { .. } => "ApplyFailed",
            Self::NameConflict { .. } => "NameConflict",
            Self::Delete { .. } => "DeleteFailed",
            Self::Discovery { .. } => "DiscoveryFailed",
            Self::Secret { .. } => "SecretUnreadable",
            Self::Read { .. } => "ReadFailed",
            Self::Pods { .. } => "ListPodsFailed",
            Self::Status { .. } => "StatusFailed",
            Self::Invalid(_) => "InvalidObject",
        }
    }
}

/// The message with its causes: "failed to apply StatefulSet demo: ApiError: ... (422)".
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// What every reconcile shares.
pub struct Context {
    /// API client (the operator's service account).
    pub client: Client,
    /// Publishes Events on DistCaches.
    pub recorder: Recorder,
    /// Operator metrics.
    pub metrics: Arc<Metrics>,
    /// Object-shaping settings.
    pub build: BuildConfig,
    /// What the API server serves.
    pub capabilities: Capabilities,
    /// Client for the nodes' admin endpoints.
    pub http: reqwest::Client,
    /// Consecutive failures per object, for the backoff.
    failures: Mutex<HashMap<ObjectRef<DeserializeGuard<DistCache>>, u32>>,
}

impl Context {
    /// A context for the operator.
    pub fn new(client: Client, build: BuildConfig, metrics: Arc<Metrics>, reporter: Reporter) -> Self {
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            capabilities: Capabilities::new(client.clone()),
            client,
            metrics,
            build,
            http: reqwest::Client::builder().no_proxy().build().unwrap_or_default(),
            failures: Mutex::new(HashMap::new()),
        }
    }

    async fn event(&self, dc: &DistCache, type_: EventType, reason: &str, note: String) {
        self.event_related(dc, type_, reason, note, None).await;
    }

    /// An Event about `dc` that also names a `related` object. The recorder folds Events of one reason about the
    /// same objects into one series (the first note, counted): the related object keeps, say, the steps of a
    /// scale-in (one pod each) apart.
    async fn event_related(
        &self,
        dc: &DistCache,
        type_: EventType,
        reason: &str,
        note: String,
        related: Option<k8s_openapi::api::core::v1::ObjectReference>,
    ) {
        let event = Event {
            type_,
            reason: reason.to_owned(),
            note: Some(truncate(note, 1000)),
            action: "Reconcile".to_owned(),
            secondary: related,
        };
        if let Err(e) = self.recorder.publish(&event, &dc.object_ref(&())).await {
            tracing::warn!(error = %chain(&e), "failed to publish an Event");
        }
    }
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

const SETTLED_REQUEUE: Duration = Duration::from_mins(5);
const BUSY_REQUEUE: Duration = Duration::from_secs(5);
const KEYSPACE_REQUEUE: Duration = Duration::from_secs(15);

/// One reconcile of one DistCache, in its own span (exported when the operator traces).
async fn reconcile(guard: Arc<DeserializeGuard<DistCache>>, ctx: Arc<Context>) -> Result<Action, Error> {
    let (namespace, name) = match &guard.0 {
        Ok(dc) => (dc.metadata.namespace.clone(), dc.metadata.name.clone()),
        Err(_) => (None, None),
    };
    let span = if distcache_telemetry::sampled_root() {
        tracing::info_span!(
            target: distcache_telemetry::SPANS,
            "distcache.reconcile",
            k8s.namespace.name = namespace.as_deref().unwrap_or_default(),
            distcache.name = name.as_deref().unwrap_or_default(),
            distcache.result = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        )
    } else {
        tracing::Span::none()
    };
    // Boxed: the reconcile future is large (about 18 KiB), and the controller keeps one per DistCache in flight.
    let result = Box::pin(reconcile_one(guard, ctx).instrument(span.clone())).await;
    // Success is recorded inside (ok, or invalid with the problems), as the reconciliations metric counts it.
    if let Err(e) = &result {
        span.record("otel.status_code", "ERROR");
        span.record("distcache.result", e.to_string().as_str());
    }
    result
}

async fn reconcile_one(guard: Arc<DeserializeGuard<DistCache>>, ctx: Arc<Context>) -> Result<Action, Error> {
    let dc = match &guard.0 {
        Ok(dc) => dc,
        Err(invalid) => return Err(Error::Invalid(invalid.error.clone())),
    };
    if dc.metadata.deletion_timestamp.is_some() {
        // Being deleted (foreground deletion waits for the owned objects): applying would recreate them.
        return Ok(Action::await_change());
    }
    let _timer = ctx.metrics.reconcile_timer();
    let valid = match validate::validate(dc) {
        Ok(valid) => valid,
        Err(problems) => {
            ctx.event(dc, EventType::Warning, "InvalidSpec", problems.to_string()).await;
            status::patch(&ctx.client, dc, &status::degraded(dc, "InvalidSpec", problems.to_string()))
                .await?;
            ctx.metrics.reconciled("invalid");
            tracing::Span::current().record("distcache.result", "invalid");
            return Ok(Action::await_change());
        }
    };
    match apply_and_observe(dc, &valid, &ctx).await {
        Ok(action) => {
            ctx.failures.lock().remove(&ObjectRef::from_obj(guard.as_ref()));
            ctx.metrics.reconciled("ok");
            tracing::Span::current().record("distcache.result", "ok");
            Ok(action)
        }
        Err(e) => {
            // Recorded here, not in the error policy: a later successful run must never be overwritten by it.
            let message = chain(&e);
            ctx.event(dc, EventType::Warning, e.reason(), message.clone()).await;
            if !matches!(e, Error::Status { .. })
                && let Err(failed) =
                    status::patch(&ctx.client, dc, &status::degraded(dc, e.reason(), message)).await
            {
                tracing::warn!(error = %chain(&failed), "failed to record the failure in the status");
            }
            Err(e)
        }
    }
}

/// build → apply → status, for a valid spec.
async fn apply_and_observe(
    dc: &DistCache,
    valid: &validate::ValidSpec,
    ctx: &Context,
) -> Result<Action, Error> {
    let pdb_api = ctx
        .capabilities
        .pdb_api()
        .await
        .map_err(|source| Error::Discovery { api: "PodDisruptionBudget", source })?;
    // Scale-in goes one pod at a time: the StatefulSet's replicas may be above spec.replicas for a while.
    let step = scale::observe(&ctx.client, valid).await?;
    let objects = build::build(valid, &ctx.build).with_stateful_set_replicas(step.replicas);
    // Asked only when a Certificate is wanted, or may have to be removed (the DistCache had TLS, and so maybe a
    // Certificate, at the last status): DistCaches that never had TLS never depend on cert-manager.
    let had_tls =
        dc.status.as_ref().is_some_and(|s| s.conditions.iter().any(|c| c.type_ == status::TLS_READY));
    let cert_manager = if objects.certificate.is_some() || had_tls {
        ctx.capabilities
            .cert_manager()
            .await
            .map_err(|source| Error::Discovery { api: "cert-manager Certificate", source })?
    } else {
        false
    };
    let applied =
        apply::apply_all(&ctx.client, &valid.namespace, &valid.owner.uid, &objects, pdb_api, cert_manager)
            .await?;
    if let Some(scale_in) = step.scale_in.as_ref().filter(|s| s.starts) {
        let pod = format!("{}-{}", valid.name, scale_in.to);
        let note = format!(
            "{}: node pod {pod} hands its entries to the other nodes and stops; the next one only once it is gone",
            scale_in.summary(),
        );
        let related = k8s_openapi::api::core::v1::ObjectReference {
            api_version: Some("v1".to_owned()),
            kind: Some("Pod".to_owned()),
            name: Some(pod),
            namespace: Some(valid.namespace.clone()),
            ..Default::default()
        };
        ctx.event_related(dc, EventType::Normal, "ScalingIn", note, Some(related)).await;
    }
    let tls = status::observe_tls(&ctx.client, valid, applied.certificate).await?;
    let nodes = status::observe_nodes(&ctx.client, &ctx.http, valid).await?;
    let observed = status::Observed {
        stateful_set: &applied.stateful_set,
        pdb: applied.pod_disruption_budget,
        keyspaces: status::keyspace_statuses(&valid.keyspaces, &nodes),
        tls,
        scale_in: step.scale_in,
    };
    let new = status::compute(dc, &observed);
    report_transitions(ctx, dc, &new).await;
    status::patch(&ctx.client, dc, &new).await?;
    let progressing = new.conditions.iter().any(|c| c.type_ == status::PROGRESSING && c.status == "True");
    // A keyspace not loaded everywhere may recover without any watched object changing (its module ConfigMap
    // appears, a node answers again): look again, less often than during a roll. With no Ready node there is
    // nobody to ask: a scaled-to-zero cache is settled.
    let keyspaces_pending = new.ready_replicas > 0
        && new.keyspaces.iter().any(|k| matches!(k.hook, HookState::Loading | HookState::Failed));
    // The Secret watch brings most TLS changes at once; installing cert-manager changes no watched object.
    let tls_pending = new.conditions.iter().any(|c| c.type_ == status::TLS_READY && c.status != "True");
    Ok(Action::requeue(if progressing {
        BUSY_REQUEUE
    } else if keyspaces_pending || tls_pending {
        KEYSPACE_REQUEUE
    } else {
        SETTLED_REQUEUE
    }))
}

/// Events for what users want to hear about without watching the status: a keyspace a node refused, a
/// cert-manager Certificate that cannot be made.
async fn report_transitions(ctx: &Context, dc: &DistCache, new: &distcache_api::DistCacheStatus) {
    let old = dc.status.clone().unwrap_or_default();
    let cert_manager_missing = |s: &distcache_api::DistCacheStatus| {
        s.conditions.iter().find(|c| c.type_ == status::DEGRADED && c.reason == "CertManagerMissing").cloned()
    };
    if let Some(missing) = cert_manager_missing(new)
        && cert_manager_missing(&old).is_none()
    {
        ctx.event(dc, EventType::Warning, "CertManagerMissing", missing.message).await;
    }
    let scaling_in = |s: &distcache_api::DistCacheStatus| {
        s.conditions.iter().any(|c| c.type_ == status::PROGRESSING && c.reason == status::SCALING_IN)
    };
    if scaling_in(&old) && !scaling_in(new) {
        let note = format!("scaled in to {} node(s), one at a time", dc.spec.replicas);
        ctx.event(dc, EventType::Normal, "ScaledIn", note).await;
    }
    for ks in new.keyspaces.iter().filter(|k| k.hook == HookState::Failed) {
        let was_failed = old.keyspaces.iter().any(|o| o.name == ks.name && o.hook == HookState::Failed);
        if !was_failed {
            let note = format!("keyspace {}: {}", ks.name, ks.message.clone().unwrap_or_default());
            ctx.event(dc, EventType::Warning, "KeyspaceRefused", note).await;
        }
    }
}

/// Backoff per object after a failed reconcile: 1 s, 2 s, 4 s … capped at 5 minutes. (The reconcile itself has
/// recorded the failure in an Event and the Degraded condition.) An object that cannot be read as a DistCache
/// gets an Event here and waits for a change.
#[expect(clippy::needless_pass_by_value, reason = "the signature kube-runtime's Controller::run calls")]
fn error_policy(guard: Arc<DeserializeGuard<DistCache>>, error: &Error, ctx: Arc<Context>) -> Action {
    let message = chain(error);
    ctx.metrics.reconciled("error");
    ctx.metrics.error(error.reason());
    let key = ObjectRef::from_obj(guard.as_ref());
    let failures = {
        let mut map = ctx.failures.lock();
        let n = map.entry(key.clone()).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    let delay = Duration::from_secs(1u64 << failures.saturating_sub(1).min(9)).min(SETTLED_REQUEUE);
    tracing::warn!(object = %key, error = %message, retry_in = ?delay, "reconcile failed");
    if let Error::Invalid(invalid) = error {
        let reference = guard.object_ref(&());
        let event = Event {
            type_: EventType::Warning,
            reason: error.reason().to_owned(),
            note: Some(truncate(invalid.clone(), 1000)),
            action: "Reconcile".to_owned(),
            secondary: None,
        };
        tokio::spawn(async move {
            if let Err(e) = ctx.recorder.publish(&event, &reference).await {
                tracing::warn!(error = %chain(&e), "failed to publish an Event");
            }
        });
        return Action::await_change();
    }
    Action::requeue(delay)
}

/// The DistCaches whose nodes mount the Secret `secret` (its namespace, `spec.tls`).
fn users_of_secret(
    store: &Store<DeserializeGuard<DistCache>>,
    secret: &PartialObjectMeta<Secret>,
) -> Vec<ObjectRef<DeserializeGuard<DistCache>>> {
    let (Some(name), Some(namespace)) = (&secret.metadata.name, &secret.metadata.namespace) else {
        return Vec::new();
    };
    store
        .state()
        .iter()
        .filter(|guard| {
            let Ok(dc) = &guard.0 else { return false };
            dc.metadata.namespace.as_ref() == Some(namespace)
                && dc.spec.tls.as_ref().is_some_and(|tls| {
                    let wanted = match (&tls.secret_name, &tls.cert_manager) {
                        (Some(secret), _) => secret.clone(),
                        (None, _) => format!("{}-tls", dc.metadata.name.as_deref().unwrap_or_default()),
                    };
                    &wanted == name
                })
        })
        .map(|guard| ObjectRef::from_obj(guard.as_ref()))
        .collect()
}

/// Runs the controller until `shutdown` is cancelled. `namespace` limits it to one namespace.
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let client = ctx.client.clone();
    let (caches, sets, maps, services, secrets) = match &namespace {
        Some(ns) => (
            Api::<DeserializeGuard<DistCache>>::namespaced(client.clone(), ns),
            Api::<StatefulSet>::namespaced(client.clone(), ns),
            Api::<ConfigMap>::namespaced(client.clone(), ns),
            Api::<Service>::namespaced(client.clone(), ns),
            Api::<PartialObjectMeta<Secret>>::namespaced(client.clone(), ns),
        ),
        None => (
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client),
        ),
    };
    let owned = watcher::Config::default().labels(&format!(
        "{}={}",
        crate::labels::MANAGED_BY,
        crate::labels::MANAGER
    ));
    let controller = Controller::new(caches, watcher::Config::default());
    let store = controller.store();
    controller
        .owns(sets, owned.clone())
        .owns(maps, owned.clone())
        .owns(services, owned)
        // Secrets by metadata only (an Api of PartialObjectMeta makes metadata-only requests: their content never
        // reaches the operator through the watch): a TLS Secret that appears, changes or goes re-evaluates the
        // DistCaches that use it (TLSReady).
        .watches(secrets, watcher::Config::default(), move |secret| users_of_secret(&store, &secret))
        .graceful_shutdown_on(shutdown.cancelled_owned())
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => tracing::debug!(%object, "reconciled"),
                Err(e) => tracing::debug!(error = %chain(&e), "controller event"),
            }
        })
        .await;
}
