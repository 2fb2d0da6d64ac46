//! Where a hook's component comes from: a file, a mounted ConfigMap key, or a URL pinned by sha256.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use distcache_api::ModuleSource;
use sha2::{Digest, Sha256};

/// Largest module accepted (a component of a data-source hook is a few MiB at most).
pub const MAX_MODULE_BYTES: u64 = 256 << 20;
/// Timeout of a module download.
const DOWNLOAD_TIMEOUT: Duration = Duration::from_mins(2);

/// A module's bytes and identity.
pub struct ModuleBytes {
    /// The component.
    pub bytes: Vec<u8>,
    /// Lowercase hex SHA-256 of `bytes`.
    pub sha256: String,
    /// Where it came from, for messages.
    pub origin: String,
}

/// Lowercase hex SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The local file a `path` or `configMap` source reads, or `None` for a `url` source.
pub fn local_file(source: &ModuleSource, base_dir: &Path, config_map_dir: &Path) -> Option<PathBuf> {
    if let Some(path) = &source.path {
        let path = Path::new(path);
        return Some(if path.is_absolute() { path.to_owned() } else { base_dir.join(path) });
    }
    source.config_map.as_ref().map(|cm| config_map_dir.join(&cm.name).join(&cm.key))
}

/// Why a hook module could not be read, downloaded or verified.
#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    /// The module file could not be read (a ConfigMap not mounted yet, a missing file, ...).
    #[error("failed to read hook module {module}")]
    ReadModule {
        /// Which module (the file, or the ConfigMap key and where it is mounted).
        module: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The module is larger than [`MAX_MODULE_BYTES`].
    #[error("hook module {module} is {bytes} bytes or more, more than the limit of {MAX_MODULE_BYTES}")]
    TooLarge {
        /// Which module.
        module: String,
        /// Its size (at least).
        bytes: u64,
    },
    /// A `url` source without `sha256` (refused by validation; never downloaded unverified).
    #[error("hook module URL {url} needs a sha256")]
    MissingSha256 {
        /// The URL.
        url: String,
    },
    /// The module source names nothing (refused by validation).
    #[error("the hook module source sets none of path, configMap or url")]
    NoSource,
    /// The HTTP client for downloads could not be built.
    #[error("failed to build an HTTP client to download hook module {url}")]
    BuildClient {
        /// The URL.
        url: String,
        /// Cause.
        #[source]
        source: reqwest::Error,
    },
    /// The download failed on the way (connection, TLS, timeout, a cut body).
    #[error("failed to download hook module {url}")]
    DownloadModule {
        /// The URL.
        url: String,
        /// Cause.
        #[source]
        source: reqwest::Error,
    },
    /// The server answered the download with an error status.
    #[error("failed to download hook module {url}: the server answered {status}")]
    DownloadStatus {
        /// The URL.
        url: String,
        /// The status received.
        status: reqwest::StatusCode,
    },
    /// The module's SHA-256 is not the one the keyspace pins.
    #[error(
        "hook module {module} has sha256 {actual}, but the keyspace expects {expected}; refused (a corrupted or \
         replaced module never runs)"
    )]
    ChecksumMismatch {
        /// Which module.
        module: String,
        /// The keyspace's `sha256`.
        expected: String,
        /// The module's.
        actual: String,
    },
}

impl ModuleError {
    /// Whether loading again, with the same keyspace settings, may succeed: a file not there yet (a ConfigMap
    /// volume not mounted yet), a download that failed on the network or with a server error. A module that
    /// is there but wrong (checksum, size) or settings that name no module fail the same way until they
    /// change.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::ReadModule { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::NotFound
                    | std::io::ErrorKind::Interrupted
                    | std::io::ErrorKind::TimedOut
                    | std::io::ErrorKind::WouldBlock
            ),
            // A 404 is a module not published yet; 5xx, 429 and 408 are the server's trouble.
            Self::DownloadModule { .. } | Self::DownloadStatus { .. } => true,
            Self::TooLarge { .. }
            | Self::MissingSha256 { .. }
            | Self::NoSource
            | Self::BuildClient { .. }
            | Self::ChecksumMismatch { .. } => false,
        }
    }
}

/// Reads (or downloads, once) a module and checks its sha256 when one is given.
pub async fn load(
    source: &ModuleSource,
    base_dir: &Path,
    config_map_dir: &Path,
    cache_dir: &Path,
) -> Result<ModuleBytes, ModuleError> {
    let expected = source.sha256.as_deref().map(str::to_ascii_lowercase);
    let (bytes, origin) = if let Some(file) = local_file(source, base_dir, config_map_dir) {
        let what = match &source.config_map {
            Some(cm) => format!("ConfigMap {}/{} (mounted at {})", cm.name, cm.key, file.display()),
            None => file.display().to_string(),
        };
        (read_file(&file, &what).await?, what)
    } else if let Some(url) = &source.url {
        let Some(expected) = &expected else {
            return Err(ModuleError::MissingSha256 { url: url.clone() });
        };
        (download(url, expected, cache_dir).await?, url.clone())
    } else {
        return Err(ModuleError::NoSource);
    };
    let sha256 = sha256_hex(&bytes);
    if let Some(expected) = expected
        && expected != sha256
    {
        return Err(ModuleError::ChecksumMismatch { module: origin, expected, actual: sha256 });
    }
    Ok(ModuleBytes { bytes, sha256, origin })
}

/// Reads a module file of at most [`MAX_MODULE_BYTES`].
async fn read_file(file: &Path, what: &str) -> Result<Vec<u8>, ModuleError> {
    let read_error = |source| ModuleError::ReadModule { module: what.to_owned(), source };
    let meta = tokio::fs::metadata(file).await.map_err(read_error)?;
    if meta.len() > MAX_MODULE_BYTES {
        return Err(ModuleError::TooLarge { module: what.to_owned(), bytes: meta.len() });
    }
    tokio::fs::read(file).await.map_err(read_error)
}

/// Downloads a module once: a verified copy is kept as `<cache>/downloads/<sha256>.wasm`.
async fn download(url: &str, expected: &str, cache_dir: &Path) -> Result<Vec<u8>, ModuleError> {
    let cached = cache_dir.join("downloads").join(format!("{expected}.wasm"));
    if let Ok(bytes) = tokio::fs::read(&cached).await {
        if sha256_hex(&bytes) == expected {
            return Ok(bytes);
        }
        tracing::warn!(file = %cached.display(), "cached module download is corrupt; downloading again");
    }
    let client = reqwest::Client::builder()
        .timeout(DOWNLOAD_TIMEOUT)
        .build()
        .map_err(|source| ModuleError::BuildClient { url: url.to_owned(), source })?;
    let failed = |source| ModuleError::DownloadModule { url: url.to_owned(), source };
    let mut response = client.get(url).send().await.map_err(failed)?;
    if !response.status().is_success() {
        return Err(ModuleError::DownloadStatus { url: url.to_owned(), status: response.status() });
    }
    let mut bytes = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(failed)? {
        if (bytes.len() + chunk.len()) as u64 > MAX_MODULE_BYTES {
            return Err(ModuleError::TooLarge {
                module: url.to_owned(),
                bytes: (bytes.len() + chunk.len()) as u64,
            });
        }
        bytes.extend_from_slice(&chunk);
    }
    let actual = sha256_hex(&bytes);
    if actual != expected {
        return Err(ModuleError::ChecksumMismatch {
            module: format!("downloaded from {url}"),
            expected: expected.to_owned(),
            actual,
        });
    }
    if let Err(e) = write_atomically(&cached, &bytes).await {
        tracing::warn!(file = %cached.display(), error = %e, "cannot cache the downloaded module; it will be downloaded again on restart");
    }
    tracing::info!(url, sha256 = expected, bytes = bytes.len(), "hook module downloaded");
    Ok(bytes)
}

/// Writes a file so that readers see the old or the new content, never a part.
pub async fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        tokio::fs::create_dir_all(dir).await?;
    }
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    tokio::fs::write(&tmp, bytes).await?;
    tokio::fs::rename(&tmp, path).await
}

#[cfg(test)]
mod tests {
    use distcache_api::ConfigMapKeyRef;

    use super::*;

    fn config_map(name: &str, key: &str) -> ModuleSource {
        ModuleSource {
            config_map: Some(ConfigMapKeyRef { name: name.into(), key: key.into() }),
            ..ModuleSource::default()
        }
    }

    #[tokio::test]
    async fn a_module_not_mounted_yet_is_transient_and_named() {
        let dir = tempfile::tempdir().expect("temp dir");
        let err = load(&config_map("late-hook", "hook.wasm"), dir.path(), dir.path(), dir.path())
            .await
            .err()
            .expect("no such file");
        assert!(
            matches!(&err, ModuleError::ReadModule { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
        );
        assert!(err.is_transient(), "{err}");
        assert!(
            err.to_string().starts_with("failed to read hook module ConfigMap late-hook/hook.wasm"),
            "{err}"
        );
        assert!(!err.to_string().contains("No such file"), "the cause is only in source(): {err}");
    }

    #[tokio::test]
    async fn a_checksum_mismatch_is_permanent_and_names_both_digests() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("hook.wasm"), b"some bytes").expect("write module");
        let actual = sha256_hex(b"some bytes");
        let expected = "0".repeat(64);
        let source = ModuleSource {
            path: Some("hook.wasm".into()),
            sha256: Some(expected.clone()),
            ..ModuleSource::default()
        };
        let err = load(&source, dir.path(), dir.path(), dir.path()).await.err().expect("wrong sha256");
        assert!(
            matches!(&err, ModuleError::ChecksumMismatch { expected: e, actual: a, .. } if *e == expected && *a == actual),
            "{err:?}"
        );
        assert!(!err.is_transient());
        let shown = err.to_string();
        assert!(shown.contains(&expected) && shown.contains(&actual) && shown.contains("refused"), "{shown}");

        let source = ModuleSource { sha256: Some(actual.clone()), ..source };
        let module = load(&source, dir.path(), dir.path(), dir.path()).await.expect("the right sha256");
        assert_eq!((module.bytes.as_slice(), module.sha256.as_str()), (&b"some bytes"[..], actual.as_str()));
    }

    #[test]
    fn only_errors_that_can_heal_are_transient() {
        let io = |kind| ModuleError::ReadModule { module: "m".into(), source: std::io::Error::from(kind) };
        assert!(io(std::io::ErrorKind::NotFound).is_transient());
        assert!(!io(std::io::ErrorKind::PermissionDenied).is_transient());
        let status = ModuleError::DownloadStatus { url: "u".into(), status: reqwest::StatusCode::NOT_FOUND };
        assert!(status.is_transient(), "a module not published yet");
        assert!(status.to_string().contains("404"), "{status}");
        assert!(!ModuleError::TooLarge { module: "m".into(), bytes: MAX_MODULE_BYTES + 1 }.is_transient());
        assert!(!ModuleError::NoSource.is_transient());
        assert!(!ModuleError::MissingSha256 { url: "u".into() }.is_transient());
    }
}
