//! Validation of a DistCache spec: the CRD's CEL rules and the keyspace rules the nodes enforce, checked by the
//! operator itself so that an API server without CEL (Kubernetes before 1.25) never lets an invalid spec reach
//! the pods. Pure: no IO, unit-tested with YAML fixtures.

use std::fmt;

use distcache_api::{DistCacheSpec, MAX_REPLICAS, ValidKeyspace, validate_keyspaces};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// A spec that passed validation, with its keyspaces' defaults applied.
#[derive(Clone, Debug)]
pub struct ValidSpec {
    /// The validated keyspaces (same order as the spec).
    pub keyspaces: Vec<ValidKeyspace>,
}

/// Every problem of a spec, each naming its field (`spec.keyspaces[0].maxBytes: ...`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct InvalidSpec(pub Vec<String>);

impl fmt::Display for InvalidSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join("; "))
    }
}

const PULL_POLICIES: [&str; 3] = ["Always", "IfNotPresent", "Never"];
const SERVICE_TYPES: [&str; 3] = ["ClusterIP", "NodePort", "LoadBalancer"];

/// Longest DistCache name: its StatefulSet's pods carry a `controller-revision-hash` label of the name plus 11
/// characters, and label values are at most 63.
pub const MAX_NAME_LENGTH: usize = 52;

fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    (1..=MAX_NAME_LENGTH).contains(&b.len())
        && b[0].is_ascii_lowercase()
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b.last().is_some_and(u8::is_ascii_alphanumeric)
}

fn valid_subject(subject: &str) -> bool {
    !subject.is_empty()
        && subject
            .split('.')
            .all(|t| !t.is_empty() && t.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'))
}

/// Checks a DistCache's name and spec; reports every problem at once.
pub fn validate(name: &str, spec: &DistCacheSpec) -> Result<ValidSpec, InvalidSpec> {
    let mut problems = Vec::new();
    if !valid_name(name) {
        problems.push(format!(
            "metadata.name: {name:?} must be a DNS label of at most {MAX_NAME_LENGTH} characters (lowercase letters, \
             digits, '-', starting with a letter): it names the StatefulSet, its pods and Services"
        ));
    }
    if !(0..=MAX_REPLICAS).contains(&spec.replicas) {
        problems.push(format!(
            "spec.replicas: {} is out of range: must be between 0 and {MAX_REPLICAS}",
            spec.replicas
        ));
    }
    if let Some(policy) = spec.image.as_ref().and_then(|i| i.pull_policy.as_deref())
        && !PULL_POLICIES.contains(&policy)
    {
        problems
            .push(format!("spec.image.pullPolicy: {policy:?} must be one of Always, IfNotPresent, Never"));
    }
    if let Some(image) = &spec.image {
        for (field, value) in [("repository", &image.repository), ("tag", &image.tag)] {
            if let Some(v) = value
                && (v.is_empty() || v.contains(char::is_whitespace))
            {
                problems.push(format!("spec.image.{field}: {v:?} must be non-empty and without spaces"));
            }
        }
    }
    let d = &spec.discovery;
    let backends = [d.kubernetes.is_some(), d.dns.is_some(), d.nats.is_some()].iter().filter(|b| **b).count();
    if backends != 1 {
        problems.push("spec.discovery: set exactly one of kubernetes, dns or nats".to_owned());
    }
    if let Some(nats) = &d.nats
        && !(nats.url.starts_with("nats://") || nats.url.starts_with("tls://"))
    {
        problems.push(format!("spec.discovery.nats.url: {:?} must start with nats:// or tls://", nats.url));
    }
    if let Some(subject) = d.nats.as_ref().and_then(|n| n.subject.as_deref())
        && !valid_subject(subject)
    {
        problems.push(format!(
            "spec.discovery.nats.subject: {subject:?} must be dot-separated tokens of letters, digits, '-' and '_'"
        ));
    }
    let pdb = &spec.pod_disruption_budget;
    if pdb.min_available.is_some() && pdb.max_unavailable.is_some() {
        problems.push("spec.podDisruptionBudget: set minAvailable or maxUnavailable, not both".to_owned());
    }
    for (field, value) in [("minAvailable", &pdb.min_available), ("maxUnavailable", &pdb.max_unavailable)] {
        if let Some(v) = value
            && !valid_int_or_percent(v)
        {
            problems.push(format!(
                "spec.podDisruptionBudget.{field}: must be a non-negative number or a percentage"
            ));
        }
    }
    if let Some(t) = spec.service.type_.as_deref()
        && !SERVICE_TYPES.contains(&t)
    {
        problems.push(format!("spec.service.type: {t:?} must be one of ClusterIP, NodePort, LoadBalancer"));
    }
    let keyspaces = match validate_keyspaces(&spec.keyspaces) {
        Ok(k) => k,
        Err(errors) => {
            problems.extend(errors.0.into_iter().map(|e| format!("spec.{e}")));
            Vec::new()
        }
    };
    if problems.is_empty() { Ok(ValidSpec { keyspaces }) } else { Err(InvalidSpec(problems)) }
}

fn valid_int_or_percent(v: &IntOrString) -> bool {
    match v {
        IntOrString::Int(i) => *i >= 0,
        IntOrString::String(s) => {
            s.strip_suffix('%').and_then(|n| n.parse::<u32>().ok()).is_some_and(|n| n <= 100)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> DistCacheSpec {
        serde_yaml::from_str(yaml).expect("fixture parses")
    }

    #[test]
    fn defaults_validate() {
        let s = spec("{}");
        assert_eq!(s.replicas, 3);
        assert!(s.discovery.kubernetes.is_some());
        assert!(s.pod_disruption_budget.enabled);
        validate("demo", &s).expect("the empty spec is valid");
    }

    #[test]
    fn every_problem_names_its_field() {
        let s = spec(
            r#"
replicas: -1
image: { pullPolicy: Sometimes }
discovery: { kubernetes: {}, nats: { url: "http://x", subject: "distcache.>" } }
podDisruptionBudget: { minAvailable: 1, maxUnavailable: "150%" }
service: { type: ExternalName }
keyspaces:
  - { name: users, maxBytes: 1Ki }
  - { name: a, maxBytes: 1Mi, hook: { module: { url: "https://x/y.wasm" }, allowedHosts: ["nohost"] } }
"#,
        );
        let err = validate("9-Bad.name", &s).expect_err("invalid").to_string();
        for expected in [
            "spec.replicas: -1 is out of range",
            "spec.image.pullPolicy",
            "spec.discovery: set exactly one",
            "spec.discovery.nats.url",
            "spec.discovery.nats.subject",
            "metadata.name: \"9-Bad.name\"",
            "spec.podDisruptionBudget: set minAvailable or maxUnavailable, not both",
            "spec.podDisruptionBudget.maxUnavailable",
            "spec.service.type",
            "spec.keyspaces[0].maxBytes",
            "spec.keyspaces[1].hook.module.sha256: required",
            "spec.keyspaces[1].hook.allowedHosts[0]",
        ] {
            assert!(err.contains(expected), "missing {expected:?} in {err}");
        }
    }

    #[test]
    fn names_fit_the_objects_they_name() {
        let s = spec("{}");
        assert!(validate(&"a".repeat(MAX_NAME_LENGTH), &s).is_ok());
        assert!(validate(&"a".repeat(MAX_NAME_LENGTH + 1), &s).is_err());
        for bad in ["-a", "a-", "a.b", "A", "1a", ""] {
            assert!(validate(bad, &s).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn unknown_keyspace_fields_are_rejected_when_parsing() {
        let err = serde_yaml::from_str::<DistCacheSpec>("keyspaces: [{ name: a, maxBytes: 1Mi, tll: 5m }]")
            .expect_err("typo")
            .to_string();
        assert!(err.contains("tll"), "{err}");
    }
}
