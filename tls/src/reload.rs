//! The node's TLS state: the configs of the current material, swapped atomically when the files change (a
//! Secret's `..data` symlink swap changes all three at once). Bad material is refused and the last good
//! material keeps serving; new connections use the new material, established ones keep theirs.

use std::{sync::Arc, time::SystemTime};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{
    configs::{BuildError, ClientAuth, Configs},
    material::{Material, MaterialError, RawFiles, TlsFiles},
};

/// The node's `tls` setting.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsSettings {
    /// The material's files.
    #[serde(flatten)]
    pub files: TlsFiles,
    /// Client certificates on the client port.
    #[serde(default)]
    pub client_auth: ClientAuth,
    /// Identities (SAN or CN) one of which a peer's certificate must carry; empty = the SANs of this node's own
    /// certificate (every node of a cluster shares them when they share a certificate or its wildcard).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peer_identities: Vec<String>,
}

/// Why material could not be used.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The files.
    #[error(transparent)]
    Material(#[from] MaterialError),
    /// The configs.
    #[error(transparent)]
    Build(#[from] BuildError),
}

/// What a check of the files found.
#[derive(Debug)]
pub enum Reload {
    /// Same content as before.
    Unchanged,
    /// New material is in use.
    Applied,
    /// The files changed but their content was refused; the previous material keeps serving.
    Refused(String),
}

/// The outcome of the last reload that did something, for `/readyz`.
#[derive(Clone, Debug)]
pub struct ReloadReport {
    /// `applied` or `refused`.
    pub result: &'static str,
    /// Why it was refused.
    pub error: Option<String>,
    /// When.
    pub at: SystemTime,
}

/// The TLS state of a node.
pub struct Tls {
    settings: TlsSettings,
    current: ArcSwap<Configs>,
    last_tried: parking_lot::Mutex<[u8; 32]>,
    last: parking_lot::Mutex<Option<ReloadReport>>,
}

fn build(settings: &TlsSettings, material: Material) -> Result<Configs, BuildError> {
    Configs::build(material, settings.client_auth, &settings.peer_identities)
}

impl Tls {
    /// Loads the material; an error here stops the node's start.
    pub fn load(settings: TlsSettings) -> Result<Self, LoadError> {
        let raw = RawFiles::read(&settings.files)?;
        let material = Material::from_raw(&settings.files, &raw)?;
        let configs = build(&settings, material)?;
        Ok(Self {
            current: ArcSwap::from_pointee(configs),
            last_tried: parking_lot::Mutex::new(raw.digest()),
            last: parking_lot::Mutex::new(None),
            settings,
        })
    }

    /// The settings.
    pub fn settings(&self) -> &TlsSettings {
        &self.settings
    }

    /// The configs in use.
    pub fn current(&self) -> Arc<Configs> {
        self.current.load_full()
    }

    /// The last reload that applied or refused material.
    pub fn last_reload(&self) -> Option<ReloadReport> {
        self.last.lock().clone()
    }

    /// Re-reads the files and switches to their material when it changed and is good. Blocking file IO (three
    /// small files): call it from a blocking context.
    pub fn reload(&self) -> Reload {
        let (digest, outcome) = match RawFiles::read(&self.settings.files) {
            // A file that cannot be read (a swap under way, a removed Secret key) is refused once per distinct
            // error, not on every check.
            Err(e) => {
                let text = e.to_string();
                (Sha256::digest(text.as_bytes()).into(), Err(text))
            }
            Ok(raw) => (raw.digest(), Ok(raw)),
        };
        {
            let mut tried = self.last_tried.lock();
            if *tried == digest {
                return Reload::Unchanged;
            }
            *tried = digest;
        }
        let result = outcome.and_then(|raw| {
            if raw.digest() == self.current.load().material.digest {
                return Ok(None);
            }
            let material = Material::from_raw(&self.settings.files, &raw).map_err(|e| e.to_string())?;
            build(&self.settings, material).map(Some).map_err(|e| e.to_string())
        });
        let (reload, report) = match result {
            Ok(None) => return Reload::Unchanged,
            Ok(Some(configs)) => {
                self.current.store(Arc::new(configs));
                (Reload::Applied, ReloadReport { result: "applied", error: None, at: SystemTime::now() })
            }
            Err(message) => (
                Reload::Refused(message.clone()),
                ReloadReport { result: "refused", error: Some(message), at: SystemTime::now() },
            ),
        };
        *self.last.lock() = Some(report);
        reload
    }
}
