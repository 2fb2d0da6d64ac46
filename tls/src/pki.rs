//! A throwaway PKI for tests and demos (feature `pki`): CAs and the certificates they issue, written as the
//! files a node reads. Never for production keys.

use std::{path::Path, time::Duration};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

use crate::material::TlsFiles;

/// A certificate authority.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, PEM.
#[derive(Clone, Debug)]
pub struct Leaf {
    /// Certificate, PEM.
    pub cert_pem: String,
    /// Private key, PEM (PKCS#8).
    pub key_pem: String,
}

/// What a leaf certificate is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Usage {
    /// Server and client authentication (what nodes need: they are both to their peers).
    Both,
    /// Server authentication only.
    Server,
    /// Client authentication only.
    Client,
}

/// Options of a leaf certificate.
#[derive(Clone, Debug)]
pub struct LeafOptions<'a> {
    /// Subject alternative names: IP addresses and DNS names.
    pub sans: &'a [&'a str],
    /// Subject common name.
    pub common_name: &'a str,
    /// Usage.
    pub usage: Usage,
    /// Valid from now − this.
    pub valid_since: Duration,
    /// Valid until now + this (a past end when `expired`).
    pub valid_for: Duration,
    /// Already expired (ended one hour ago).
    pub expired: bool,
}

impl Default for LeafOptions<'_> {
    fn default() -> Self {
        Self {
            sans: &[],
            common_name: "distcache",
            usage: Usage::Both,
            valid_since: Duration::from_hours(1),
            valid_for: Duration::from_hours(30 * 24),
            expired: false,
        }
    }
}

fn err(e: &rcgen::Error) -> anyhow::Error {
    anyhow::anyhow!("rcgen: {e}")
}

impl Ca {
    /// A self-signed CA named `name`.
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|e| err(&e))?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(2);
        params.not_after = now + time::Duration::days(365);
        let key = KeyPair::generate().map_err(|e| err(&e))?;
        Ok(Self { issuer: CertifiedIssuer::self_signed(params, key).map_err(|e| err(&e))? })
    }

    /// The CA certificate, PEM.
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// Issues a node certificate (server and client authentication) for `sans`.
    pub fn issue(&self, sans: &[&str]) -> anyhow::Result<Leaf> {
        self.issue_with(&LeafOptions { sans, ..LeafOptions::default() })
    }

    /// Issues a certificate.
    pub fn issue_with(&self, o: &LeafOptions<'_>) -> anyhow::Result<Leaf> {
        let names: Vec<String> = o.sans.iter().map(|s| (*s).to_owned()).collect();
        let mut params = CertificateParams::new(names).map_err(|e| err(&e))?;
        params.distinguished_name.push(DnType::CommonName, o.common_name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = match o.usage {
            Usage::Both => vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth],
            Usage::Server => vec![ExtendedKeyUsagePurpose::ServerAuth],
            Usage::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
        };
        let now = time::OffsetDateTime::now_utc();
        let since = time::Duration::try_from(o.valid_since).unwrap_or(time::Duration::ZERO);
        let until = time::Duration::try_from(o.valid_for).unwrap_or(time::Duration::ZERO);
        if o.expired {
            params.not_before = now - time::Duration::days(2);
            params.not_after = now - time::Duration::hours(1);
        } else {
            params.not_before = now - since;
            params.not_after = now + until;
        }
        let key = KeyPair::generate().map_err(|e| err(&e))?;
        let cert = params.signed_by(&key, &self.issuer).map_err(|e| err(&e))?;
        Ok(Leaf { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }
}

impl Leaf {
    /// Writes `tls.crt`, `tls.key` and `ca.crt` (with `ca_pem`) into `dir`, as a `kubernetes.io/tls` Secret
    /// volume holds them, and returns the paths.
    pub fn write(&self, dir: &Path, ca_pem: &str) -> std::io::Result<TlsFiles> {
        std::fs::create_dir_all(dir)?;
        let files = TlsFiles {
            cert_file: dir.join("tls.crt"),
            key_file: dir.join("tls.key"),
            ca_file: dir.join("ca.crt"),
        };
        std::fs::write(&files.cert_file, &self.cert_pem)?;
        std::fs::write(&files.key_file, &self.key_pem)?;
        std::fs::write(&files.ca_file, ca_pem)?;
        Ok(files)
    }
}
