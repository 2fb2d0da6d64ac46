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

/// Reads (or downloads, once) a module and checks its sha256 when one is given.
pub async fn load(
    source: &ModuleSource,
    base_dir: &Path,
    config_map_dir: &Path,
    cache_dir: &Path,
) -> Result<ModuleBytes, String> {
    let expected = source.sha256.as_deref().map(str::to_ascii_lowercase);
    let (bytes, origin) = if let Some(file) = local_file(source, base_dir, config_map_dir) {
        let what = match &source.config_map {
            Some(cm) => format!("ConfigMap {}/{} (mounted at {})", cm.name, cm.key, file.display()),
            None => file.display().to_string(),
        };
        let meta = tokio::fs::metadata(&file).await.map_err(|e| format!("cannot read module {what}: {e}"))?;
        if meta.len() > MAX_MODULE_BYTES {
            return Err(format!(
                "module {what} is {} bytes, more than the limit of {MAX_MODULE_BYTES}",
                meta.len()
            ));
        }
        let bytes = tokio::fs::read(&file).await.map_err(|e| format!("cannot read module {what}: {e}"))?;
        (bytes, what)
    } else if let Some(url) = &source.url {
        let Some(expected) = &expected else {
            return Err(format!("module URL {url} needs a sha256"));
        };
        (download(url, expected, cache_dir).await?, url.clone())
    } else {
        return Err("the module source sets none of path, configMap or url".into());
    };
    let sha256 = sha256_hex(&bytes);
    if let Some(expected) = expected
        && expected != sha256
    {
        return Err(format!(
            "module {origin} has sha256 {sha256}, but the keyspace expects {expected}; refused (a corrupted or \
             replaced module never runs)"
        ));
    }
    Ok(ModuleBytes { bytes, sha256, origin })
}

/// Downloads a module once: a verified copy is kept as `<cache>/downloads/<sha256>.wasm`.
async fn download(url: &str, expected: &str, cache_dir: &Path) -> Result<Vec<u8>, String> {
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
        .map_err(|e| format!("failed to build an HTTP client: {e}"))?;
    let mut response =
        client.get(url).send().await.map_err(|e| format!("failed to download module {url}: {e}"))?;
    if !response.status().is_success() {
        return Err(format!("failed to download module {url}: the server answered {}", response.status()));
    }
    let mut bytes = Vec::new();
    while let Some(chunk) =
        response.chunk().await.map_err(|e| format!("failed to download module {url}: {e}"))?
    {
        if (bytes.len() + chunk.len()) as u64 > MAX_MODULE_BYTES {
            return Err(format!("module {url} is larger than the limit of {MAX_MODULE_BYTES} bytes"));
        }
        bytes.extend_from_slice(&chunk);
    }
    let actual = sha256_hex(&bytes);
    if actual != expected {
        return Err(format!(
            "module downloaded from {url} has sha256 {actual}, but the keyspace expects {expected}; refused"
        ));
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
