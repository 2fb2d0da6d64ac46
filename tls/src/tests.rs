//! Material checks and reloads.

use crate::{
    ClientAuth, Material, Reload, Tls, TlsSettings,
    pki::{Ca, LeafOptions, Usage},
};

fn settings(files: crate::TlsFiles) -> TlsSettings {
    TlsSettings { files, client_auth: ClientAuth::None, peer_identities: Vec::new() }
}

#[test]
fn good_material_loads_with_its_identity_and_expiry() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let ca = Ca::new("test CA")?;
    let files = ca.issue(&["127.0.0.1", "*.demo-peers.apps.svc"])?.write(dir.path(), &ca.pem())?;
    let m = Material::load(&files)?;
    assert_eq!(m.identity.sans, vec!["127.0.0.1", "*.demo-peers.apps.svc"]);
    assert_eq!(m.identity.common_name.as_deref(), Some("distcache"));
    assert!(m.expires_in() > 29.0 * 24.0 * 3600.0, "{}", m.expires_in());
    Ok(())
}

#[test]
fn bad_material_is_refused_with_the_reason() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let ca = Ca::new("test CA")?;
    let other_ca = Ca::new("other CA")?;
    let good = ca.issue(&["127.0.0.1"])?;
    let other = ca.issue(&["127.0.0.1"])?;
    let refused = |leaf: &crate::pki::Leaf, ca_pem: &str| -> anyhow::Result<String> {
        let files = leaf.write(dir.path(), ca_pem)?;
        Ok(Material::load(&files).map(|_| ()).expect_err("refused").to_string())
    };
    // A key of another certificate.
    let mixed = crate::pki::Leaf { cert_pem: good.cert_pem.clone(), key_pem: other.key_pem.clone() };
    let e = refused(&mixed, &ca.pem())?;
    assert!(e.contains("does not belong to the certificate"), "{e}");
    // A CA bundle that did not sign it.
    let e = refused(&good, &other_ca.pem())?;
    assert!(e.contains("not trusted by the CA bundle"), "{e}");
    // Expired.
    let expired =
        ca.issue_with(&LeafOptions { sans: &["127.0.0.1"], expired: true, ..LeafOptions::default() })?;
    let e = refused(&expired, &ca.pem())?;
    assert!(e.contains("expired at"), "{e}");
    // Server authentication only: peers could not authenticate with it.
    let server_only =
        ca.issue_with(&LeafOptions { sans: &["127.0.0.1"], usage: Usage::Server, ..LeafOptions::default() })?;
    let e = refused(&server_only, &ca.pem())?;
    assert!(e.contains("client certificate"), "{e}");
    // Not PEM at all.
    let garbage = crate::pki::Leaf { cert_pem: "hello".into(), key_pem: good.key_pem.clone() };
    let e = refused(&garbage, &ca.pem())?;
    assert!(e.contains("no PEM certificate"), "{e}");
    Ok(())
}

#[test]
fn a_reload_applies_good_material_and_refuses_bad_keeping_the_last_good() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let ca = Ca::new("test CA")?;
    let first = ca.issue(&["127.0.0.1"])?;
    let files = first.write(dir.path(), &ca.pem())?;
    let tls = Tls::load(settings(files.clone()))?;
    let serial = tls.current().material.identity.serial.clone();
    assert!(matches!(tls.reload(), Reload::Unchanged));

    // A half-written pair (new certificate, old key) is refused once, and the old material stays.
    let second = ca.issue(&["127.0.0.1"])?;
    std::fs::write(&files.cert_file, &second.cert_pem)?;
    assert!(matches!(tls.reload(), Reload::Refused(ref e) if e.contains("does not belong")));
    assert!(matches!(tls.reload(), Reload::Unchanged), "a refusal is reported once");
    assert_eq!(tls.current().material.identity.serial, serial);
    assert_eq!(tls.last_reload().map(|r| r.result), Some("refused"));

    // The key follows: applied.
    std::fs::write(&files.key_file, &second.key_pem)?;
    assert!(matches!(tls.reload(), Reload::Applied));
    assert_ne!(tls.current().material.identity.serial, serial);
    assert_eq!(tls.last_reload().map(|r| r.result), Some("applied"));

    // A removed file is refused; the material in use stays.
    std::fs::remove_file(&files.ca_file)?;
    assert!(matches!(tls.reload(), Reload::Refused(ref e) if e.contains("cannot read the CA file")));
    assert!(tls.current().material.expires_in() > 0.0);
    Ok(())
}
