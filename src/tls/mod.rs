//! TLS by rustls, with the `ring` crypto provider (pure Rust and assembly, no C toolchain or
//! cmake needed, quick to build; aws-lc-rs is faster at RSA signing but heavier to build).
//!
//! Owns reading PEM certificates and keys, the client configs for upstream TLS, the listener's
//! SNI certificate resolver and handshake ([`server`]), and development certificates ([`gen`]).
//! Never on the request path beyond the handshake: a resolved certificate is one `ArcSwap` load.

pub mod gen;
pub mod server;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use std::path::Path;
use std::sync::{Arc, OnceLock};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("{cert} and {key} do not belong together: {message}")]
    Mismatch { cert: String, key: String, message: String },
    #[error("{0}")]
    Config(String),
}

/// The one crypto provider, shared by every config.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider())).clone()
}

fn file_error(path: &Path, message: impl ToString) -> TlsError {
    TlsError::File { path: path.display().to_string(), message: message.to_string() }
}

/// Reads a PEM certificate chain (leaf first).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, e))?;
    if certs.is_empty() {
        return Err(file_error(path, "no CERTIFICATE block in the file"));
    }
    Ok(certs)
}

/// Reads a certificate chain and its private key (PKCS#8, PKCS#1 RSA or SEC1 EC; RSA, ECDSA or
/// Ed25519) and checks that the key belongs to the certificate.
pub fn load_pair(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain = load_certs(cert)?;
    let der = PrivateKeyDer::from_pem_file(key).map_err(|e| file_error(key, format!("no usable private key: {e}")))?;
    let signing = provider().key_provider.load_private_key(der).map_err(|e| file_error(key, e))?;
    let pair = CertifiedKey::new(chain, signing);
    pair.keys_match().map_err(|e| TlsError::Mismatch {
        cert: cert.display().to_string(),
        key: key.display().to_string(),
        message: e.to_string(),
    })?;
    Ok(Arc::new(pair))
}

/// When the leaf certificate expires, Unix seconds.
pub fn expiry(pair: &CertifiedKey) -> Option<f64> {
    let leaf = pair.cert.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    Some(cert.validity().not_after.timestamp() as f64)
}

/// Trust roots from a PEM file of CA certificates.
pub fn load_roots(path: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert).map_err(|e| file_error(path, e))?;
    }
    Ok(roots)
}

/// The Mozilla roots (webpki-roots), for upstreams with public certificates.
pub fn default_roots() -> rustls::RootCertStore {
    rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() }
}

/// A client config for upstream TLS: TLS 1.2 and 1.3, these roots, these ALPN protocols.
pub fn client_config(roots: rustls::RootCertStore, alpn: &[&[u8]]) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(
        dir: &Path,
        name: &str,
        alg: &'static rcgen::SignatureAlgorithm,
    ) -> (std::path::PathBuf, std::path::PathBuf) {
        let key = rcgen::KeyPair::generate_for(alg).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap().self_signed(&key).unwrap();
        let (c, k) = (dir.join(format!("{name}.crt")), dir.join(format!("{name}.key")));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }

    #[test]
    fn ecdsa_and_ed25519_pairs_load_and_mismatches_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p256 = pair(dir.path(), "p256", &rcgen::PKCS_ECDSA_P256_SHA256);
        let p384 = pair(dir.path(), "p384", &rcgen::PKCS_ECDSA_P384_SHA384);
        let ed = pair(dir.path(), "ed", &rcgen::PKCS_ED25519);
        for (c, k) in [&p256, &p384, &ed] {
            load_pair(c, k).unwrap_or_else(|e| panic!("{}: {e}", c.display()));
        }
        let e = load_pair(&p256.0, &ed.1).unwrap_err();
        assert!(matches!(e, TlsError::Mismatch { .. }), "{e}");
        let e = load_pair(&p256.0, &p256.0).unwrap_err();
        assert!(e.to_string().contains("no usable private key"), "{e}");
        let e = load_pair(&dir.path().join("none.crt"), &p256.1).unwrap_err();
        assert!(e.to_string().contains("none.crt"), "{e}");
    }

    /// ring can't make RSA keys; the openssl command line (Debian's `openssl`) does.
    #[test]
    fn rsa_pairs_load() {
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = (dir.path().join("rsa.crt"), dir.path().join("rsa.key"));
        let has_openssl = || std::process::Command::new("openssl").arg("version").output().is_ok();
        if !has_openssl() {
            let _ =
                std::process::Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/install-test-deps")).status();
        }
        let status = std::process::Command::new("openssl")
            .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost", "-keyout"])
            .arg(&k)
            .arg("-out")
            .arg(&c)
            .stderr(std::process::Stdio::null())
            .status()
            .expect("this test needs the openssl command; scripts/install-test-deps could not install it");
        assert!(status.success());
        load_pair(&c, &k).unwrap();
    }
}
