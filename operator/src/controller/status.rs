//! The status of a DistCache, computed from what was applied (the StatefulSet as stored) and what the nodes
//! report about their keyspaces (`/admin/keyspaces` of each Ready pod). The computation is pure; fetching the
//! node reports is the only IO here and is bounded by a short timeout per pod.

use std::{collections::BTreeMap, time::Duration};

use distcache_api::{
    DistCache, DistCacheStatus, HookState, KeyspaceSpec, KeyspaceStatus, KeyspacesReport, ValidKeyspace,
};
use k8s_openapi::{
    api::{
        apps::v1::StatefulSet,
        core::v1::{Pod, Secret},
    },
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, Patch, PatchParams},
};

use super::{
    Error,
    apply::{CertificateOutcome, PdbOutcome},
    build::{ADMIN_PORT, TLS_KEYS, selector_string},
    scale::ScaleIn,
    validate::{TlsSource, ValidSpec},
};
use crate::FIELD_MANAGER;

/// Condition types.
pub const AVAILABLE: &str = "Available";
/// A roll or scale is under way.
pub const PROGRESSING: &str = "Progressing";
/// Something needs the user's attention.
pub const DEGRADED: &str = "Degraded";
/// The reason of Progressing while the operator scales in one pod at a time.
pub const SCALING_IN: &str = "ScalingIn";
/// The TLS Secret is there with every key the nodes read (only with `spec.tls`).
pub const TLS_READY: &str = "TLSReady";

/// What the operator found of the nodes' TLS material (only with `spec.tls`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TlsState {
    /// The Secret exists with a non-empty tls.crt, tls.key and ca.crt.
    Ready {
        /// The Secret's name.
        secret: String,
    },
    /// The Secret does not exist (yet).
    SecretMissing {
        /// The Secret's name.
        secret: String,
        /// cert-manager is to issue it (it has not yet).
        cert_manager: bool,
    },
    /// The Secret lacks keys (or has them empty).
    KeyMissing {
        /// The Secret's name.
        secret: String,
        /// The missing or empty keys.
        keys: Vec<&'static str>,
    },
    /// `spec.tls.certManager` is set, but the server serves no cert-manager Certificate API.
    CertManagerMissing {
        /// The Secret the pods wait for.
        secret: String,
    },
}

/// Looks at the TLS Secret of a DistCache with `spec.tls`: which of the keys the nodes read are there. Only key
/// names and whether their values are empty are looked at; the material itself is neither kept nor logged.
pub async fn observe_tls(
    client: &Client,
    valid: &ValidSpec,
    certificate: CertificateOutcome,
) -> Result<Option<TlsState>, Error> {
    let Some(tls) = &valid.tls else { return Ok(None) };
    let secret = tls.secret_name(&valid.name);
    if certificate == CertificateOutcome::CertManagerMissing {
        return Ok(Some(TlsState::CertManagerMissing { secret }));
    }
    let api: Api<Secret> = Api::namespaced(client.clone(), &valid.namespace);
    let found =
        api.get_opt(&secret).await.map_err(|source| Error::Secret { name: secret.clone(), source })?;
    let cert_manager = matches!(tls.source, TlsSource::CertManager(_));
    Ok(Some(tls_state(secret, cert_manager, found.as_ref())))
}

/// The TLS state for a Secret as found (pure).
pub fn tls_state(secret: String, cert_manager: bool, found: Option<&Secret>) -> TlsState {
    let Some(found) = found else { return TlsState::SecretMissing { secret, cert_manager } };
    let data = found.data.as_ref();
    let keys: Vec<&'static str> = TLS_KEYS
        .into_iter()
        .filter(|key| data.and_then(|d| d.get(*key)).is_none_or(|v| v.0.is_empty()))
        .collect();
    if keys.is_empty() { TlsState::Ready { secret } } else { TlsState::KeyMissing { secret, keys } }
}

/// The TLSReady condition for a TLS state.
fn tls_condition(state: &TlsState, generation: Option<i64>) -> Condition {
    match state {
        TlsState::Ready { secret } => condition(
            TLS_READY,
            true,
            "SecretReady",
            format!("Secret {secret} holds tls.crt, tls.key and ca.crt; the nodes reload it when it changes"),
            generation,
        ),
        TlsState::SecretMissing { secret, cert_manager: true } => condition(
            TLS_READY,
            false,
            "SecretMissing",
            format!(
                "waiting for cert-manager to issue the Certificate into Secret {secret} (see `kubectl describe \
                 certificate {secret}`); the node pods start once it exists"
            ),
            generation,
        ),
        TlsState::SecretMissing { secret, cert_manager: false } => condition(
            TLS_READY,
            false,
            "SecretMissing",
            format!(
                "Secret {secret} not found: create a kubernetes.io/tls Secret with tls.crt, tls.key and ca.crt \
                 (spec.tls.secretName); the node pods start once it exists"
            ),
            generation,
        ),
        TlsState::KeyMissing { secret, keys } => condition(
            TLS_READY,
            false,
            "KeyMissing",
            format!(
                "Secret {secret} has no (or an empty) {}: the nodes need tls.crt, tls.key and ca.crt (ca.crt is the \
                 CA bundle that peers' and clients' certificates chain to)",
                keys.join(", ")
            ),
            generation,
        ),
        TlsState::CertManagerMissing { secret } => {
            condition(TLS_READY, false, "CertManagerMissing", cert_manager_missing(secret), generation)
        }
    }
}

fn cert_manager_missing(secret: &str) -> String {
    format!(
        "spec.tls.certManager is set but cert-manager is not installed (no cert-manager.io/v1 Certificate API): \
         install cert-manager, or give the certificate in a Secret with spec.tls.secretName; the node pods wait \
         for Secret {secret}"
    )
}

/// What one Ready node reports about its keyspaces.
#[derive(Clone, Debug, Default)]
pub struct NodeReport {
    /// Pod name.
    pub pod: String,
    /// Keyspaces served: name → (spec as served, module sha256).
    pub keyspaces: BTreeMap<String, (KeyspaceSpec, Option<String>)>,
    /// The node's last refused keyspaces reload, if the refusal still stands.
    pub last_error: Option<String>,
    /// Why the node could not be asked (it then counts as not loaded).
    pub unreachable: Option<String>,
}

impl NodeReport {
    /// What the node at `pod` answered on `/admin/keyspaces`.
    pub fn answered(pod: String, report: KeyspacesReport) -> Self {
        Self {
            pod,
            keyspaces: report
                .keyspaces
                .into_iter()
                .map(|k| {
                    let sha = k.module_sha256().map(str::to_owned);
                    (k.name, (k.spec, sha))
                })
                .collect(),
            last_error: report.last_error,
            unreachable: None,
        }
    }
}

/// Asks every Ready node pod of the DistCache for its keyspaces (1 s timeout each, all at once).
pub async fn observe_nodes(
    client: &Client,
    http: &reqwest::Client,
    valid: &ValidSpec,
) -> Result<Vec<NodeReport>, Error> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), &valid.namespace);
    let list = pods
        .list(&ListParams::default().labels(&selector_string(&valid.name)))
        .await
        .map_err(|source| Error::Pods { name: valid.name.clone(), source })?;
    let asks = list.items.into_iter().filter(distcache_api::pod_is_serving).map(|pod| async move {
        let name = pod.name_any();
        let Some(ip) = pod.status.as_ref().and_then(|s| s.pod_ip.clone()) else {
            return NodeReport {
                pod: name,
                unreachable: Some("no pod IP".to_owned()),
                ..NodeReport::default()
            };
        };
        let host = if ip.contains(':') { format!("[{ip}]") } else { ip };
        let url = format!("http://{host}:{ADMIN_PORT}/admin/keyspaces");
        let answer = async {
            let response = http.get(&url).timeout(Duration::from_secs(1)).send().await?.error_for_status()?;
            response.json::<KeyspacesReport>().await
        };
        match answer.await {
            Ok(report) => NodeReport::answered(name, report),
            Err(e) => {
                NodeReport { pod: name, unreachable: Some(format!("{url}: {e}")), ..NodeReport::default() }
            }
        }
    });
    Ok(futures::future::join_all(asks).await)
}

/// The hook state of each keyspace of the validated spec on the nodes. A node serves a keyspace when it serves
/// exactly the spec the DistCache asks for.
pub fn keyspace_statuses(keyspaces: &[ValidKeyspace], nodes: &[NodeReport]) -> Vec<KeyspaceStatus> {
    keyspaces
        .iter()
        .map(|ValidKeyspace { spec: want, .. }| {
            let serving: Vec<&Option<String>> = nodes
                .iter()
                .filter_map(|n| {
                    n.keyspaces.get(&want.name).filter(|(spec, _)| spec == want).map(|(_, sha)| sha)
                })
                .collect();
            let loaded = serving.len();
            let sha = serving
                .first()
                .and_then(|s| (*s).clone())
                .filter(|s| serving.iter().all(|o| o.as_ref() == Some(s)));
            let missing: Vec<&NodeReport> = nodes
                .iter()
                .filter(|n| n.keyspaces.get(&want.name).is_none_or(|(spec, _)| spec != want))
                .collect();
            let refused =
                missing.iter().find_map(|n| n.last_error.as_ref().map(|e| format!("{}: {e}", n.pod)));
            let unreachable =
                missing.iter().find_map(|n| n.unreachable.as_ref().map(|e| format!("{}: {e}", n.pod)));
            let hook = if refused.is_some() {
                HookState::Failed
            } else if !missing.is_empty() || nodes.is_empty() {
                HookState::Loading
            } else if want.hook.is_some() {
                HookState::Loaded
            } else {
                HookState::None
            };
            KeyspaceStatus {
                name: want.name.clone(),
                hook,
                nodes_loaded: i32::try_from(loaded).unwrap_or(i32::MAX),
                module_sha256: sha,
                message: refused.or(unreachable),
            }
        })
        .collect()
}

/// Inputs of the status computation after a successful apply.
#[derive(Clone, Debug)]
pub struct Observed<'a> {
    /// The StatefulSet as stored.
    pub stateful_set: &'a StatefulSet,
    /// What happened to the PodDisruptionBudget.
    pub pdb: PdbOutcome,
    /// Keyspace states.
    pub keyspaces: Vec<KeyspaceStatus>,
    /// The TLS material, with `spec.tls`.
    pub tls: Option<TlsState>,
    /// The scale-in under way (the StatefulSet is lowered one pod at a time).
    pub scale_in: Option<ScaleIn>,
}

fn condition(type_: &str, ok: bool, reason: &str, message: String, generation: Option<i64>) -> Condition {
    Condition {
        type_: type_.to_owned(),
        status: if ok { "True" } else { "False" }.to_owned(),
        reason: reason.to_owned(),
        message,
        observed_generation: generation,
        last_transition_time: Time(Timestamp::now()),
    }
}

/// Conditions keep their `lastTransitionTime` while their status does not change.
fn keep_transition_times(conditions: &mut [Condition], previous: &[Condition]) {
    for c in conditions {
        if let Some(old) = previous.iter().find(|o| o.type_ == c.type_ && o.status == c.status) {
            c.last_transition_time = old.last_transition_time.clone();
        }
    }
}

/// Computes the status after a successful apply.
pub fn compute(dc: &DistCache, observed: &Observed<'_>) -> DistCacheStatus {
    let previous = dc.status.clone().unwrap_or_default();
    let generation = dc.metadata.generation;
    let desired = dc.spec.replicas;
    let st = observed.stateful_set.status.clone().unwrap_or_default();
    let rolled = st.observed_generation == observed.stateful_set.metadata.generation
        && st.update_revision.is_some()
        && st.current_revision == st.update_revision;
    let (replicas, ready, updated) =
        (st.replicas, st.ready_replicas.unwrap_or(0), st.updated_replicas.unwrap_or(0));
    let settled = replicas == desired && ready == desired && updated == desired && rolled;
    let mut conditions = vec![
        // Available is capacity: as many Ready nodes as the spec asks for (a roll may dip below it).
        if desired == 0 {
            condition(AVAILABLE, false, "ScaledToZero", "spec.replicas is 0".to_owned(), generation)
        } else if ready >= desired {
            condition(AVAILABLE, true, "NodesReady", format!("{ready}/{desired} nodes Ready"), generation)
        } else {
            condition(AVAILABLE, false, "NodesNotReady", format!("{ready}/{desired} nodes Ready"), generation)
        },
        if let Some(scale_in) = &observed.scale_in {
            condition(PROGRESSING, true, SCALING_IN, scale_in.message(), generation)
        } else if settled {
            condition(PROGRESSING, false, "Settled", "no roll or scale under way".to_owned(), generation)
        } else if updated < replicas || !rolled {
            let message = format!("{updated}/{desired} nodes run the current pod template");
            condition(PROGRESSING, true, "RollingUpdate", message, generation)
        } else {
            let message = format!("{replicas} node pods, {ready} Ready, {desired} desired");
            condition(PROGRESSING, true, "Scaling", message, generation)
        },
        degraded_condition(observed, generation),
    ];
    // TLSReady exists only with spec.tls: without it there is nothing to be ready.
    if let Some(tls) = &observed.tls {
        conditions.push(tls_condition(tls, generation));
    }
    keep_transition_times(&mut conditions, &previous.conditions);
    DistCacheStatus {
        observed_generation: generation,
        replicas,
        ready_replicas: ready,
        updated_replicas: updated,
        ready: Some(format!("{ready}/{desired}")),
        selector: Some(selector_string(&dc.name_any())),
        keyspace_count: i32::try_from(dc.spec.keyspaces.len()).unwrap_or(i32::MAX),
        conditions,
        keyspaces: observed.keyspaces.clone(),
    }
}

fn degraded_condition(observed: &Observed<'_>, generation: Option<i64>) -> Condition {
    let failed_keyspaces: Vec<String> = observed
        .keyspaces
        .iter()
        .filter(|k| k.hook == HookState::Failed)
        .map(|k| format!("{}: {}", k.name, k.message.clone().unwrap_or_default()))
        .collect();
    if !failed_keyspaces.is_empty() {
        condition(DEGRADED, true, "KeyspaceRefused", failed_keyspaces.join("; "), generation)
    } else if let Some(TlsState::CertManagerMissing { secret }) = &observed.tls {
        condition(DEGRADED, true, "CertManagerMissing", cert_manager_missing(secret), generation)
    } else if observed.pdb == PdbOutcome::Unsupported {
        let message = "the API server serves no policy PodDisruptionBudget API; node pods are not protected from \
                       voluntary disruptions";
        condition(DEGRADED, true, "PodDisruptionBudgetUnsupported", message.to_owned(), generation)
    } else {
        let note = match observed.pdb {
            PdbOutcome::Applied(v) if v != "policy/v1" => format!(" (PodDisruptionBudget as {v})"),
            _ => String::new(),
        };
        condition(DEGRADED, false, "AsExpected", format!("every object applied{note}"), generation)
    }
}

/// The status after a failed step (an invalid spec, an apply that failed): the last observed state with only the
/// Degraded condition changed. What runs keeps running, so Available and Progressing stay as they were (a
/// DistCache never applied gets them False, reason NotApplied); `observedGeneration` keeps naming the last
/// generation that was applied.
pub fn degraded(dc: &DistCache, reason: &str, message: String) -> DistCacheStatus {
    let previous = dc.status.clone().unwrap_or_default();
    let generation = dc.metadata.generation;
    let mut conditions: Vec<Condition> =
        previous.conditions.iter().filter(|c| c.type_ != DEGRADED).cloned().collect();
    for type_ in [AVAILABLE, PROGRESSING] {
        if !conditions.iter().any(|c| c.type_ == type_) {
            conditions.push(condition(
                type_,
                false,
                "NotApplied",
                "nothing applied yet".to_owned(),
                generation,
            ));
        }
    }
    conditions.push(condition(DEGRADED, true, reason, message, generation));
    keep_transition_times(&mut conditions, &previous.conditions);
    DistCacheStatus {
        ready: previous.ready.clone().or_else(|| Some(format!("0/{}", dc.spec.replicas))),
        selector: Some(selector_string(&dc.name_any())),
        keyspace_count: i32::try_from(dc.spec.keyspaces.len()).unwrap_or(i32::MAX),
        conditions,
        ..previous
    }
}

/// Writes the status (server-side apply of the status subresource) when it changed.
pub async fn patch(client: &Client, dc: &DistCache, status: &DistCacheStatus) -> Result<(), Error> {
    if dc.status.as_ref() == Some(status) {
        return Ok(());
    }
    let api: Api<DistCache> = Api::namespaced(client.clone(), &dc.namespace().unwrap_or_default());
    let body = serde_json::json!({
        "apiVersion": "distcache.io/v1alpha1",
        "kind": "DistCache",
        "status": status,
    });
    api.patch_status(&dc.name_any(), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&body))
        .await
        .map_err(|source| Error::Status { name: dc.name_any(), source })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dc() -> DistCache {
        serde_yaml::from_str(
            r"
apiVersion: distcache.io/v1alpha1
kind: DistCache
metadata: { name: demo, namespace: apps, generation: 4 }
spec:
  keyspaces:
    - { name: users, maxBytes: 64Mi, hook: { module: { configMap: { name: h, key: k } } } }
    - { name: sessions, maxBytes: 1Mi }
",
        )
        .expect("fixture")
    }

    fn node(pod: &str, dc: &DistCache, keyspaces: &[&str], last_error: Option<&str>) -> NodeReport {
        NodeReport {
            pod: pod.to_owned(),
            keyspaces: dc
                .spec
                .keyspaces
                .iter()
                .filter(|k| keyspaces.contains(&k.name.as_str()))
                .map(|k| (k.name.clone(), (k.clone(), Some("ab".to_owned()))))
                .collect(),
            last_error: last_error.map(str::to_owned),
            unreachable: None,
        }
    }

    #[test]
    fn keyspace_states_follow_the_nodes() {
        let dc = dc();
        let keyspaces = distcache_api::validate_keyspaces(&dc.spec.keyspaces).expect("valid");
        let all = keyspace_statuses(
            &keyspaces,
            &[node("a", &dc, &["users", "sessions"], None), node("b", &dc, &["users", "sessions"], None)],
        );
        assert_eq!(
            (all[0].hook, all[0].nodes_loaded, all[0].module_sha256.as_deref()),
            (HookState::Loaded, 2, Some("ab"))
        );
        assert_eq!(all[1].hook, HookState::None);
        let partial = keyspace_statuses(
            &keyspaces,
            &[node("a", &dc, &["users", "sessions"], None), node("b", &dc, &["sessions"], None)],
        );
        assert_eq!((partial[0].hook, partial[0].nodes_loaded), (HookState::Loading, 1));
        let refused = keyspace_statuses(
            &keyspaces,
            &[node("a", &dc, &["sessions"], Some("keyspaces[0].hook: module not found"))],
        );
        assert_eq!(refused[0].hook, HookState::Failed);
        assert!(refused[0].message.as_deref().is_some_and(|m| m.contains("a: keyspaces[0].hook")));
    }

    #[test]
    fn a_nodes_keyspaces_report_counts_as_served() {
        let dc = dc();
        let keyspaces = distcache_api::validate_keyspaces(&dc.spec.keyspaces).expect("valid");
        // What a node answers on /admin/keyspaces once it applied the keyspaces file the operator wrote.
        let answer = serde_json::json!({
            "appliedAt": 1, "file": "/etc/distcache/keyspaces/keyspaces.yaml", "lastError": null,
            "reloadsApplied": 1, "reloadsRefused": 0,
            "keyspaces": [
                { "name": "users", "maxBytes": 67_108_864, "ttlMs": null, "negativeTtlMs": null,
                  "fetchTimeoutMs": 2000, "maxValueBytes": 1_048_576, "readThrough": true,
                  "hook": { "moduleSha256": "cd", "poolSize": 4 }, "spec": &dc.spec.keyspaces[0], "stats": null },
                { "name": "sessions", "maxBytes": 1_048_576, "ttlMs": null, "negativeTtlMs": null,
                  "fetchTimeoutMs": 2000, "maxValueBytes": 1_048_576, "readThrough": false, "hook": null,
                  "spec": { "name": "sessions", "maxBytes": "2Mi" }, "stats": null },
            ],
        });
        let report = serde_json::from_value(answer).expect("the node's report reads");
        let statuses = keyspace_statuses(&keyspaces, &[NodeReport::answered("demo-0".to_owned(), report)]);
        assert_eq!(
            (statuses[0].hook, statuses[0].nodes_loaded, statuses[0].module_sha256.as_deref()),
            (HookState::Loaded, 1, Some("cd"))
        );
        assert_eq!(
            (statuses[1].hook, statuses[1].nodes_loaded),
            (HookState::Loading, 0),
            "a node serving another maxBytes has not applied the spec yet"
        );
    }

    fn set(replicas: i32, ready: i32, updated: i32, same_revision: bool) -> StatefulSet {
        serde_json::from_value(serde_json::json!({
            "metadata": { "name": "demo", "generation": 2 },
            "status": {
                "observedGeneration": 2, "replicas": replicas, "readyReplicas": ready, "updatedReplicas": updated,
                "currentRevision": "r1", "updateRevision": if same_revision { "r1" } else { "r2" },
            }
        }))
        .expect("fixture")
    }

    fn cond<'a>(s: &'a DistCacheStatus, t: &str) -> &'a Condition {
        s.conditions.iter().find(|c| c.type_ == t).expect("condition present")
    }

    #[test]
    fn conditions_describe_rolls_and_problems() {
        let mut dc = dc();
        let sts = set(3, 3, 3, true);
        let ok = Observed {
            stateful_set: &sts,
            pdb: PdbOutcome::Applied("policy/v1beta1"),
            keyspaces: vec![],
            tls: None,
            scale_in: None,
        };
        let s = compute(&dc, &ok);
        assert_eq!(
            (cond(&s, AVAILABLE).status.as_str(), cond(&s, PROGRESSING).status.as_str()),
            ("True", "False")
        );
        assert!(cond(&s, DEGRADED).message.contains("policy/v1beta1"));
        assert_eq!((s.ready.as_deref(), s.observed_generation, s.keyspace_count), (Some("3/3"), Some(4), 2));

        dc.status = Some(s.clone());
        let rolling = set(3, 2, 1, false);
        let r = compute(&dc, &Observed { stateful_set: &rolling, ..ok.clone() });
        assert_eq!(
            (cond(&r, PROGRESSING).status.as_str(), cond(&r, PROGRESSING).reason.as_str()),
            ("True", "RollingUpdate")
        );
        assert_eq!(cond(&r, AVAILABLE).status, "False", "2/3 Ready is below capacity");
        assert_eq!(
            cond(&r, DEGRADED).last_transition_time,
            cond(&s, DEGRADED).last_transition_time,
            "unchanged status keeps its time"
        );
        let no_pdb = compute(&dc, &Observed { pdb: PdbOutcome::Unsupported, ..ok.clone() });
        assert_eq!(cond(&no_pdb, DEGRADED).reason, "PodDisruptionBudgetUnsupported");

        // Scaling in from 5 to 3, one pod at a time: the StatefulSet is at 4 and demo-4 still stops. The status
        // says where the scale-in is even when the StatefulSet's counts already match the spec.
        dc.spec.replicas = 3;
        for sts in [set(5, 5, 5, true), set(3, 3, 3, true)] {
            let scale_in = crate::controller::scale::ScaleIn {
                from: 5,
                to: 4,
                target: 3,
                waiting_for: vec!["demo-4".to_owned()],
                starts: false,
            };
            let s = compute(&dc, &Observed { stateful_set: &sts, scale_in: Some(scale_in), ..ok.clone() });
            let p = cond(&s, PROGRESSING);
            assert_eq!((p.status.as_str(), p.reason.as_str()), ("True", SCALING_IN));
            assert_eq!(
                p.message,
                "scaling in: 5 → 4 of target 3 (waiting for demo-4 to hand off its entries and stop)"
            );
            assert_eq!(cond(&s, AVAILABLE).status, "True", "at least 3 nodes Ready");
        }
        let done = compute(&dc, &Observed { stateful_set: &set(3, 3, 3, true), ..ok });
        assert_eq!(cond(&done, PROGRESSING).reason, "Settled");
    }

    fn secret(keys: &[(&str, &[u8])]) -> Secret {
        Secret {
            data: Some(
                keys.iter().map(|(k, v)| ((*k).to_owned(), k8s_openapi::ByteString(v.to_vec()))).collect(),
            ),
            type_: Some("kubernetes.io/tls".to_owned()),
            ..Secret::default()
        }
    }

    #[test]
    fn tls_state_follows_the_secrets_keys() {
        let name = || "demo-certs".to_owned();
        assert_eq!(
            tls_state(name(), false, None),
            TlsState::SecretMissing { secret: name(), cert_manager: false }
        );
        let full = secret(&[("tls.crt", b"c"), ("tls.key", b"k"), ("ca.crt", b"a")]);
        assert_eq!(tls_state(name(), false, Some(&full)), TlsState::Ready { secret: name() });
        let no_ca = secret(&[("tls.crt", b"c"), ("tls.key", b"k")]);
        assert_eq!(
            tls_state(name(), true, Some(&no_ca)),
            TlsState::KeyMissing { secret: name(), keys: vec!["ca.crt"] }
        );
        let empty_key = secret(&[("tls.crt", b"c"), ("tls.key", b""), ("ca.crt", b"a")]);
        assert_eq!(
            tls_state(name(), false, Some(&empty_key)),
            TlsState::KeyMissing { secret: name(), keys: vec!["tls.key"] }
        );
    }

    #[test]
    fn tls_ready_and_degraded_say_what_the_tls_material_lacks() {
        let dc = dc();
        let sts = set(3, 3, 3, true);
        let with = |tls: Option<TlsState>| {
            compute(
                &dc,
                &Observed {
                    stateful_set: &sts,
                    pdb: PdbOutcome::Applied("policy/v1"),
                    keyspaces: vec![],
                    tls,
                    scale_in: None,
                },
            )
        };
        let plain = with(None);
        assert!(plain.conditions.iter().all(|c| c.type_ != TLS_READY), "no TLSReady without spec.tls");

        let ready = with(Some(TlsState::Ready { secret: "demo-certs".to_owned() }));
        let c = cond(&ready, TLS_READY);
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", "SecretReady"));
        assert_eq!(cond(&ready, DEGRADED).status, "False");

        let missing =
            with(Some(TlsState::SecretMissing { secret: "demo-certs".to_owned(), cert_manager: false }));
        let c = cond(&missing, TLS_READY);
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "SecretMissing"));
        assert!(c.message.contains("Secret demo-certs not found"), "{}", c.message);
        let issuing =
            with(Some(TlsState::SecretMissing { secret: "demo-tls".to_owned(), cert_manager: true }));
        assert!(cond(&issuing, TLS_READY).message.contains("waiting for cert-manager"));

        let key = with(Some(TlsState::KeyMissing { secret: "demo-certs".to_owned(), keys: vec!["ca.crt"] }));
        let c = cond(&key, TLS_READY);
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "KeyMissing"));
        assert!(c.message.contains("no (or an empty) ca.crt"), "{}", c.message);

        let absent = with(Some(TlsState::CertManagerMissing { secret: "demo-tls".to_owned() }));
        let c = cond(&absent, TLS_READY);
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "CertManagerMissing"));
        let d = cond(&absent, DEGRADED);
        assert_eq!((d.status.as_str(), d.reason.as_str()), ("True", "CertManagerMissing"));
        assert!(
            d.message.starts_with(
                "spec.tls.certManager is set but cert-manager is not installed (no cert-manager.io/v1 Certificate API)"
            ),
            "{}",
            d.message
        );
    }

    #[test]
    fn a_failed_step_changes_only_degraded() {
        let mut dc = dc();
        let sts = set(3, 3, 3, true);
        let applied = compute(
            &dc,
            &Observed {
                stateful_set: &sts,
                pdb: PdbOutcome::Applied("policy/v1"),
                keyspaces: vec![],
                tls: None,
                scale_in: None,
            },
        );
        dc.status = Some(applied.clone());
        dc.metadata.generation = Some(5);
        let bad = degraded(&dc, "InvalidSpec", "spec.replicas: bad".to_owned());
        assert_eq!(
            (cond(&bad, DEGRADED).status.as_str(), cond(&bad, DEGRADED).reason.as_str()),
            ("True", "InvalidSpec")
        );
        assert_eq!(cond(&bad, AVAILABLE), cond(&applied, AVAILABLE), "the running nodes still serve");
        assert_eq!(cond(&bad, PROGRESSING), cond(&applied, PROGRESSING));
        assert_eq!(
            (bad.observed_generation, bad.ready.as_deref()),
            (Some(4), Some("3/3")),
            "the last applied generation"
        );
        dc.status = None;
        let never = degraded(&dc, "ApplyFailed", "failed to apply StatefulSet demo".to_owned());
        assert_eq!(cond(&never, AVAILABLE).reason, "NotApplied");
        assert_eq!(never.ready.as_deref(), Some("0/3"));
    }
}
