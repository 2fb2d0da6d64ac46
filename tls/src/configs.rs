//! rustls configurations built from one [`Material`]: the client port (TLS, client certificates as
//! configured), the admin port (TLS, HTTP/1.1), and both sides of the peer port (mutual TLS with the CA bundle
//! and a check of the other side's identity).

use std::sync::Arc;

use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, Error, OtherError,
    RootCertStore, ServerConfig, SignatureScheme,
    client::{
        ResolvesClientCert, WebPkiServerVerifier,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        verify_server_cert_signed_by_trust_anchor,
    },
    crypto::CryptoProvider,
    server::{
        ClientHello, ParsedCertificate, ResolvesServerCert, WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
    sign::CertifiedKey,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use serde::{Deserialize, Serialize};

use crate::material::{CertIdentity, Material, provider};

/// Whether the client port asks clients for a certificate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ClientAuth {
    /// No client certificates (default).
    #[default]
    None,
    /// A certificate is asked for and verified when given; clients without one are served as anonymous.
    Optional,
    /// Every client must present a certificate that chains to the CA bundle.
    Required,
}

/// The configs of one generation of material.
#[derive(Debug)]
pub struct Configs {
    /// The material they were built from.
    pub material: Arc<Material>,
    /// The identities a peer's certificate must carry one of.
    pub peer_identities: Arc<[String]>,
    /// Client gRPC port (ALPN h2).
    pub client_port: Arc<ServerConfig>,
    /// Admin HTTP port (ALPN http/1.1).
    pub admin_port: Arc<ServerConfig>,
    /// Peer gRPC port: mutual TLS, the client's certificate must carry a peer identity.
    pub peer_server: Arc<ServerConfig>,
    /// Dialling a peer: the node's certificate as client certificate; the peer's chain must end at the CA bundle
    /// and carry a peer identity (peers are dialled by IP address, so the name dialled is not checked).
    pub peer_client: Arc<ClientConfig>,
}

#[derive(Debug)]
struct FixedCert(Arc<CertifiedKey>);

impl ResolvesServerCert for FixedCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }
}

impl ResolvesClientCert for FixedCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The error a handshake fails with when the other side's certificate carries no peer identity.
#[derive(Debug)]
struct NotAPeer(String);

impl std::fmt::Display for NotAPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NotAPeer {}

fn check_identity(cert: &CertificateDer<'_>, identities: &[String]) -> Result<(), Error> {
    let id =
        CertIdentity::parse(cert).map_err(|_| Error::InvalidCertificate(CertificateError::BadEncoding))?;
    if id.carries_any(identities) {
        return Ok(());
    }
    let carried: Vec<&str> = id.all().collect();
    Err(Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(NotAPeer(format!(
        "the certificate ({}) carries none of the peer identities",
        carried.join(", ")
    )))))))
}

/// Verifies peers that dial this node.
#[derive(Debug)]
struct PeerClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    identities: Arc<[String]>,
}

impl ClientCertVerifier for PeerClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let verified = self.inner.verify_client_cert(end_entity, intermediates, now)?;
        check_identity(end_entity, &self.identities)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Verifies the peers this node dials.
#[derive(Debug)]
struct PeerServerVerifier {
    roots: Arc<RootCertStore>,
    identities: Arc<[String]>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PeerServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        check_identity(end_entity, &self.identities)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// A TLS config error that cannot happen with ring and a checked material (reported, not panicked on).
#[derive(Debug, thiserror::Error)]
#[error("cannot build the TLS configuration: {0}")]
pub struct BuildError(String);

impl Configs {
    /// Builds every config from `material`. `peer_identities` empty = the SANs of the node's own certificate.
    pub fn build(
        material: Material,
        client_auth: ClientAuth,
        peer_identities: &[String],
    ) -> Result<Self, BuildError> {
        let provider = provider();
        let identities: Arc<[String]> = if peer_identities.is_empty() {
            material.identity.sans.clone().into()
        } else {
            peer_identities.into()
        };
        let resolver = Arc::new(FixedCert(Arc::clone(&material.certified)));
        let fail = |e: &dyn std::fmt::Display| BuildError(e.to_string());
        let versions = |p: &Arc<CryptoProvider>| {
            ServerConfig::builder_with_provider(Arc::clone(p)).with_protocol_versions(rustls::ALL_VERSIONS)
        };

        let client_verifier: Option<Arc<dyn ClientCertVerifier>> = match client_auth {
            ClientAuth::None => None,
            ClientAuth::Optional => Some(
                WebPkiClientVerifier::builder_with_provider(
                    Arc::clone(&material.roots),
                    Arc::clone(&provider),
                )
                .allow_unauthenticated()
                .build()
                .map_err(|e| fail(&e))?,
            ),
            ClientAuth::Required => Some(
                WebPkiClientVerifier::builder_with_provider(
                    Arc::clone(&material.roots),
                    Arc::clone(&provider),
                )
                .build()
                .map_err(|e| fail(&e))?,
            ),
        };
        let builder = versions(&provider).map_err(|e| fail(&e))?;
        let mut client_port = match client_verifier {
            None => builder.with_no_client_auth().with_cert_resolver(resolver.clone()),
            Some(v) => builder.with_client_cert_verifier(v).with_cert_resolver(resolver.clone()),
        };
        client_port.alpn_protocols = vec![b"h2".to_vec()];

        let mut admin_port = versions(&provider)
            .map_err(|e| fail(&e))?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        admin_port.alpn_protocols = vec![b"http/1.1".to_vec()];

        let peer_verifier = PeerClientVerifier {
            inner: WebPkiClientVerifier::builder_with_provider(
                Arc::clone(&material.roots),
                Arc::clone(&provider),
            )
            .build()
            .map_err(|e| fail(&e))?,
            identities: Arc::clone(&identities),
        };
        let mut peer_server = versions(&provider)
            .map_err(|e| fail(&e))?
            .with_client_cert_verifier(Arc::new(peer_verifier))
            .with_cert_resolver(resolver.clone());
        peer_server.alpn_protocols = vec![b"h2".to_vec()];

        let mut peer_client = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(rustls::ALL_VERSIONS)
            .map_err(|e| fail(&e))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PeerServerVerifier {
                roots: Arc::clone(&material.roots),
                identities: Arc::clone(&identities),
                provider: Arc::clone(&provider),
            }))
            .with_client_cert_resolver(resolver);
        peer_client.alpn_protocols = vec![b"h2".to_vec()];

        Ok(Self {
            material: Arc::new(material),
            peer_identities: identities,
            client_port: Arc::new(client_port),
            admin_port: Arc::new(admin_port),
            peer_server: Arc::new(peer_server),
            peer_client: Arc::new(peer_client),
        })
    }
}

/// A client config for applications (the `distcache` CLI and library): the server's certificate must chain to
/// `roots` and be valid for the name dialled (or `--tls-server-name`); `identity` is the client certificate.
pub fn client_config(
    roots: RootCertStore,
    identity: Option<Arc<CertifiedKey>>,
) -> Result<ClientConfig, BuildError> {
    let provider = provider();
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
        .build()
        .map_err(|e| BuildError(e.to_string()))?;
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(rustls::ALL_VERSIONS)
        .map_err(|e| BuildError(e.to_string()))?
        .with_webpki_verifier(verifier);
    let mut config = match identity {
        Some(key) => builder.with_client_cert_resolver(Arc::new(FixedCert(key))),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}
