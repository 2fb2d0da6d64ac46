//! What the API server serves, so the operator sends only what it understands: the PodDisruptionBudget API moved
//! from policy/v1beta1 to policy/v1 in Kubernetes 1.21 (v1beta1 is gone since 1.25), and cert-manager's
//! Certificate API (cert-manager.io/v1) exists only where cert-manager is installed.

use std::time::{Duration, Instant};

use kube::{Client, discovery};
use tokio::sync::Mutex;

/// Which PodDisruptionBudget API version the server serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PdbApi {
    /// policy/v1 (Kubernetes 1.21 and later).
    V1,
    /// policy/v1beta1 only (Kubernetes 1.20 and older).
    V1Beta1,
    /// No PodDisruptionBudget API at all: the operator reports it in the Degraded condition.
    Unavailable,
}

impl PdbApi {
    /// Picks the newest version among those the server serves for the `policy` group.
    pub fn choose<'a>(versions: impl IntoIterator<Item = &'a str>) -> Self {
        let versions: Vec<&str> = versions.into_iter().collect();
        if versions.contains(&"v1") {
            Self::V1
        } else if versions.contains(&"v1beta1") {
            Self::V1Beta1
        } else {
            Self::Unavailable
        }
    }

    /// The `apiVersion` to write, if any.
    pub fn api_version(self) -> Option<&'static str> {
        match self {
            Self::V1 => Some("policy/v1"),
            Self::V1Beta1 => Some("policy/v1beta1"),
            Self::Unavailable => None,
        }
    }
}

/// The server's capabilities, discovered on first use and refreshed every few minutes (a cluster upgrade
/// changes them without restarting the operator).
pub struct Capabilities {
    client: Client,
    cached: Mutex<Option<(Instant, PdbApi)>>,
    cert_manager: Mutex<Option<Instant>>,
}

const REFRESH: Duration = Duration::from_mins(5);

impl Capabilities {
    /// Capabilities of the server behind `client`.
    pub fn new(client: Client) -> Self {
        Self { client, cached: Mutex::new(None), cert_manager: Mutex::new(None) }
    }

    /// The PodDisruptionBudget API; a failed discovery is an error (retried by the reconciler's backoff).
    pub async fn pdb_api(&self) -> Result<PdbApi, kube::Error> {
        let mut cached = self.cached.lock().await;
        if let Some((at, api)) = *cached
            && at.elapsed() < REFRESH
        {
            return Ok(api);
        }
        let api = match discovery::group(&self.client, "policy").await {
            Ok(group) => PdbApi::choose(group.versions()),
            Err(kube::Error::Discovery(kube::error::DiscoveryError::MissingApiGroup(_))) => {
                PdbApi::Unavailable
            }
            Err(e) => return Err(e),
        };
        *cached = Some((Instant::now(), api));
        Ok(api)
    }

    /// Whether the server serves cert-manager's Certificate API (group cert-manager.io, version v1, kind
    /// Certificate). A positive answer is kept for a few minutes; a negative one is asked again every time, so
    /// that installing cert-manager takes effect at the next reconcile.
    pub async fn cert_manager(&self) -> Result<bool, kube::Error> {
        let mut cached = self.cert_manager.lock().await;
        if cached.is_some_and(|at| at.elapsed() < REFRESH) {
            return Ok(true);
        }
        let served = match discovery::group(&self.client, "cert-manager.io").await {
            Ok(group) => {
                group.versioned_resources("v1").iter().any(|(resource, _)| resource.kind == "Certificate")
            }
            Err(kube::Error::Discovery(kube::error::DiscoveryError::MissingApiGroup(_))) => false,
            Err(e) => return Err(e),
        };
        *cached = served.then(Instant::now);
        Ok(served)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_served_version_wins() {
        assert_eq!(PdbApi::choose(["v1beta1", "v1"]), PdbApi::V1);
        assert_eq!(PdbApi::choose(["v1beta1"]), PdbApi::V1Beta1);
        assert_eq!(PdbApi::choose([]), PdbApi::Unavailable);
    }
}
