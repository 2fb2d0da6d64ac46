//! Certificate material read from PEM files and checked before it is used: the certificate chain, its private
//! key and the CA bundle that peers and clients are verified against.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use rustls::{
    RootCertStore,
    client::verify_server_cert_signed_by_trust_anchor,
    crypto::CryptoProvider,
    server::{ParsedCertificate, WebPkiClientVerifier},
    sign::CertifiedKey,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime, pem::PemObject};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The three files of a node's TLS material, as a Kubernetes `kubernetes.io/tls` Secret holds them
/// (`tls.crt`, `tls.key`, `ca.crt`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsFiles {
    /// PEM certificate chain, the node's own certificate first.
    pub cert_file: PathBuf,
    /// PEM private key of the certificate (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// PEM bundle of the CA certificates peers and clients are verified against (old and new CA during a
    /// rollover).
    pub ca_file: PathBuf,
}

/// Why material was refused. Every message names the file and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum MaterialError {
    /// A file could not be read.
    #[error("cannot read the {what} file {}: {source}", path.display())]
    Read {
        /// Which file (certificate, key, CA).
        what: &'static str,
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A file holds nothing usable.
    #[error("the {what} file {} {message}", path.display())]
    Parse {
        /// Which file.
        what: &'static str,
        /// Path.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The key does not belong to the certificate.
    #[error("the private key in {} does not belong to the certificate in {} ({message})", key.display(), cert.display())]
    KeyMismatch {
        /// Key file.
        key: PathBuf,
        /// Certificate file.
        cert: PathBuf,
        /// rustls' reason.
        message: String,
    },
    /// The certificate is outside its validity period.
    #[error("the certificate in {} {message}", path.display())]
    Validity {
        /// Certificate file.
        path: PathBuf,
        /// "expired at …" or "is not valid before …".
        message: String,
    },
    /// The certificate does not chain to the CA bundle, or may not be used for server or client authentication.
    #[error("the certificate in {} is not trusted by the CA bundle {}: {message}", cert.display(), ca.display())]
    Untrusted {
        /// Certificate file.
        cert: PathBuf,
        /// CA file.
        ca: PathBuf,
        /// What the verifier said.
        message: String,
    },
}

/// The identities of a certificate: its subject alternative names (DNS names, IP addresses, URIs, e-mail
/// addresses, as text) and its subject common name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CertIdentity {
    /// Subject alternative names.
    pub sans: Vec<String>,
    /// Subject common name.
    pub common_name: Option<String>,
    /// Validity end, seconds since the epoch.
    pub not_after: i64,
    /// Validity start, seconds since the epoch.
    pub not_before: i64,
    /// Serial number, hex.
    pub serial: String,
}

impl CertIdentity {
    /// Reads the identity of a DER certificate.
    pub fn parse(der: &[u8]) -> Result<Self, String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
        let mut sans = Vec::new();
        if let Ok(Some(ext)) = cert.subject_alternative_name() {
            for name in &ext.value.general_names {
                use x509_parser::extensions::GeneralName;
                match name {
                    GeneralName::DNSName(s) | GeneralName::URI(s) | GeneralName::RFC822Name(s) => {
                        sans.push((*s).to_owned());
                    }
                    GeneralName::IPAddress(bytes) => {
                        if let Ok(v4) = <[u8; 4]>::try_from(*bytes) {
                            sans.push(std::net::IpAddr::from(v4).to_string());
                        } else if let Ok(v6) = <[u8; 16]>::try_from(*bytes) {
                            sans.push(std::net::IpAddr::from(v6).to_string());
                        }
                    }
                    _ => {}
                }
            }
        }
        let common_name =
            cert.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()).map(str::to_owned);
        Ok(Self {
            sans,
            common_name,
            not_after: cert.validity().not_after.timestamp(),
            not_before: cert.validity().not_before.timestamp(),
            serial: cert.raw_serial_as_string().replace(':', ""),
        })
    }

    /// SANs, then the common name.
    pub fn all(&self) -> impl Iterator<Item = &str> {
        self.sans.iter().map(String::as_str).chain(self.common_name.as_deref())
    }

    /// True when the certificate carries one of `identities` (exact, case-insensitive for DNS names; a
    /// wildcard SAN matches only the same wildcard text).
    pub fn carries_any(&self, identities: &[String]) -> bool {
        self.all().any(|mine| identities.iter().any(|want| want.eq_ignore_ascii_case(mine)))
    }
}

/// Loaded and checked material.
#[derive(Debug)]
pub struct Material {
    /// Certificate chain and signing key.
    pub certified: Arc<CertifiedKey>,
    /// The CA bundle.
    pub roots: Arc<RootCertStore>,
    /// The node certificate's identity.
    pub identity: CertIdentity,
    /// Number of CA certificates in the bundle.
    pub ca_count: usize,
    /// SHA-256 over the three files' bytes, to tell a change from a rewrite with the same content.
    pub digest: [u8; 32],
}

/// The raw bytes of the three files.
#[derive(Clone, PartialEq, Eq)]
pub struct RawFiles {
    cert: Vec<u8>,
    key: Vec<u8>,
    ca: Vec<u8>,
}

impl RawFiles {
    /// Reads the three files.
    pub fn read(files: &TlsFiles) -> Result<Self, MaterialError> {
        let read = |what, path: &Path| {
            std::fs::read(path).map_err(|source| MaterialError::Read { what, path: path.to_owned(), source })
        };
        Ok(Self {
            cert: read("certificate", &files.cert_file)?,
            key: read("key", &files.key_file)?,
            ca: read("CA", &files.ca_file)?,
        })
    }

    /// SHA-256 over the three files.
    pub fn digest(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        for part in [&self.cert, &self.key, &self.ca] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
        h.finalize().into()
    }
}

/// The crypto provider of every TLS config (ring, as kube and reqwest use).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certificates(
    what: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, MaterialError> {
    let certs = CertificateDer::pem_slice_iter(pem).collect::<Result<Vec<_>, _>>().map_err(|e| {
        MaterialError::Parse { what, path: path.to_owned(), message: format!("is not valid PEM: {e}") }
    })?;
    if certs.is_empty() {
        return Err(MaterialError::Parse {
            what,
            path: path.to_owned(),
            message: "holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into(),
        });
    }
    Ok(certs)
}

/// Seconds since the epoch, as a Kubernetes or `openssl x509 -enddate` reader would compare them.
fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn timestamp_text(secs: i64) -> String {
    x509_parser::time::ASN1Time::from_timestamp(secs)
        .map_or_else(|_| format!("{secs} s after the epoch"), |t| t.to_string())
}

impl Material {
    /// Reads and checks the files: the certificate parses and is within its validity period, the key belongs to
    /// it, and the chain ends at a CA of the bundle, usable both as a server certificate and as a client
    /// certificate (peers authenticate with it on both sides).
    pub fn load(files: &TlsFiles) -> Result<Self, MaterialError> {
        Self::from_raw(files, &RawFiles::read(files)?)
    }

    /// Checks material already read.
    pub fn from_raw(files: &TlsFiles, raw: &RawFiles) -> Result<Self, MaterialError> {
        let provider = provider();
        let chain = certificates("certificate", &files.cert_file, &raw.cert)?;
        let key = PrivateKeyDer::from_pem_slice(&raw.key).map_err(|e| MaterialError::Parse {
            what: "key",
            path: files.key_file.clone(),
            message: format!("holds no usable PEM private key: {e}"),
        })?;
        let cas = certificates("CA", &files.ca_file, &raw.ca)?;
        let mut roots = RootCertStore::empty();
        let (added, ignored) = roots.add_parsable_certificates(cas.iter().cloned());
        if added == 0 || ignored > 0 {
            return Err(MaterialError::Parse {
                what: "CA",
                path: files.ca_file.clone(),
                message: format!("holds {ignored} certificate(s) that cannot serve as a trust anchor"),
            });
        }
        let identity = CertIdentity::parse(&chain[0]).map_err(|message| MaterialError::Parse {
            what: "certificate",
            path: files.cert_file.clone(),
            message: format!("is not a valid X.509 certificate: {message}"),
        })?;
        let now = unix_now();
        if identity.not_after < now {
            return Err(MaterialError::Validity {
                path: files.cert_file.clone(),
                message: format!("expired at {}", timestamp_text(identity.not_after)),
            });
        }
        if identity.not_before > now {
            return Err(MaterialError::Validity {
                path: files.cert_file.clone(),
                message: format!("is not valid before {}", timestamp_text(identity.not_before)),
            });
        }
        let certified = CertifiedKey::from_der(chain.clone(), key, &provider).map_err(|e| {
            MaterialError::KeyMismatch {
                key: files.key_file.clone(),
                cert: files.cert_file.clone(),
                message: e.to_string(),
            }
        })?;
        let untrusted = |message: String| MaterialError::Untrusted {
            cert: files.cert_file.clone(),
            ca: files.ca_file.clone(),
            message,
        };
        let parsed = ParsedCertificate::try_from(&chain[0]).map_err(|e| untrusted(e.to_string()))?;
        let unix = UnixTime::now();
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            &chain[1..],
            unix,
            provider.signature_verification_algorithms.all,
        )
        .map_err(|e| untrusted(format!("as a server certificate: {e}")))?;
        let roots = Arc::new(roots);
        let client_check =
            WebPkiClientVerifier::builder_with_provider(Arc::clone(&roots), Arc::clone(&provider))
                .build()
                .map_err(|e| untrusted(e.to_string()))?;
        client_check
            .verify_client_cert(&chain[0], &chain[1..], unix)
            .map_err(|e| untrusted(format!("as a client certificate, which peers authenticate with: {e}")))?;
        Ok(Self { certified: Arc::new(certified), roots, identity, ca_count: added, digest: raw.digest() })
    }

    /// Seconds until the certificate expires (negative once it has).
    pub fn seconds_left(&self) -> i64 {
        self.identity.not_after - unix_now()
    }

    /// [`Material::seconds_left`] as a float, for reports.
    pub fn expires_in(&self) -> f64 {
        self.seconds_left() as f64
    }
}
