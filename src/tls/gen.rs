//! `headroom gen-cert`: a self-signed development certificate and key (ECDSA P-256), valid for
//! the given names and IP addresses from a day ago for 365 days. For development only: clients
//! must be told to trust it (`curl --cacert certs/dev.crt`). An existing pair is kept unless
//! the caller says to overwrite it.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Writes `{out}/dev.crt` and `{out}/dev.key` (the key readable by its owner only); returns
/// their paths. Refuses to replace an existing file unless `force`.
pub fn write_dev_pair(out: &Path, names: &[String], force: bool) -> Result<(PathBuf, PathBuf), String> {
    if names.is_empty() {
        return Err("--names: at least one name or IP address".into());
    }
    let (crt_path, key_path) = (out.join("dev.crt"), out.join("dev.key"));
    if !force {
        if let Some(existing) = [&crt_path, &key_path].into_iter().find(|p| p.exists()) {
            return Err(format!("{} exists; pass --force to replace it", existing.display()));
        }
    }
    let mut params = rcgen::CertificateParams::new(names.to_vec()).map_err(|e| format!("--names: {e}"))?;
    params.distinguished_name.push(rcgen::DnType::CommonName, names[0].clone());
    params.distinguished_name.push(rcgen::DnType::OrganizationName, "headroom development");
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(365);
    let key = rcgen::KeyPair::generate().map_err(|e| format!("cannot make a key: {e}"))?;
    let cert = params.self_signed(&key).map_err(|e| format!("cannot sign the certificate: {e}"))?;
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    std::fs::write(&crt_path, cert.pem()).map_err(|e| format!("{}: {e}", crt_path.display()))?;
    write_private(&key_path, key.serialize_pem().as_bytes()).map_err(|e| format!("{}: {e}", key_path.display()))?;
    Ok((crt_path, key_path))
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    opts.open(path)?.write_all(bytes)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_pair_loads_and_matches() {
        let dir = tempfile::tempdir().unwrap();
        let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        let (crt, key) = super::write_dev_pair(dir.path(), &names, false).unwrap();
        let pair = crate::tls::load_pair(&crt, &key).unwrap();
        let expiry = crate::tls::expiry(&pair).unwrap();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
        let days = (expiry - now) / 86_400.0;
        assert!((364.9..=365.1).contains(&days), "valid for 365 days from now, not {days}");
        let (_, parsed) = x509_parser::parse_x509_certificate(pair.cert[0].as_ref()).unwrap();
        let from = parsed.validity().not_before.timestamp() as f64;
        assert!((now - from - 86_400.0).abs() < 120.0, "valid from a day ago");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
        }
    }

    #[test]
    fn an_existing_pair_is_kept_unless_forced() {
        let dir = tempfile::tempdir().unwrap();
        let names = vec!["localhost".to_string()];
        super::write_dev_pair(dir.path(), &names, false).unwrap();
        let key_before = std::fs::read(dir.path().join("dev.key")).unwrap();
        let e = super::write_dev_pair(dir.path(), &names, false).unwrap_err();
        assert!(e.contains("dev.crt exists; pass --force"), "{e}");
        assert_eq!(std::fs::read(dir.path().join("dev.key")).unwrap(), key_before);
        super::write_dev_pair(dir.path(), &names, true).unwrap();
        assert_ne!(std::fs::read(dir.path().join("dev.key")).unwrap(), key_before);
    }
}
