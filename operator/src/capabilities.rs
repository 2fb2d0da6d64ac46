//! What the API server serves, so the operator sends only what it understands: the PodDisruptionBudget API moved
//! from policy/v1beta1 to policy/v1 in Kubernetes 1.21 (v1beta1 is gone since 1.25).

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
}

const REFRESH: Duration = Duration::from_mins(5);

impl Capabilities {
    /// Capabilities of the server behind `client`.
    pub fn new(client: Client) -> Self {
        Self { client, cached: Mutex::new(None) }
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
