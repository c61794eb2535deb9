//! `headroom gen-cert`: a self-signed development certificate and key (ECDSA P-256), valid for
//! the given names and IP addresses for about a year. For development only: clients must be
//! told to trust it (`curl --cacert certs/dev.crt`).

use std::io::Write;
use std::path::{Path, PathBuf};

/// Writes `{out}/dev.crt` and `{out}/dev.key` (the key readable by its owner only); returns
/// their paths.
pub fn write_dev_pair(out: &Path, names: &[String]) -> Result<(PathBuf, PathBuf), String> {
    if names.is_empty() {
        return Err("--names: at least one name or IP address".into());
    }
    let mut params = rcgen::CertificateParams::new(names.to_vec()).map_err(|e| format!("--names: {e}"))?;
    params.distinguished_name.push(rcgen::DnType::CommonName, names[0].clone());
    params.distinguished_name.push(rcgen::DnType::OrganizationName, "headroom development");
    let year = 1970
        + std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() / 31_556_952)
            as i32;
    params.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    params.not_after = rcgen::date_time_ymd(year + 1, 12, 31);
    let key = rcgen::KeyPair::generate().map_err(|e| format!("cannot make a key: {e}"))?;
    let cert = params.self_signed(&key).map_err(|e| format!("cannot sign the certificate: {e}"))?;
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let (crt_path, key_path) = (out.join("dev.crt"), out.join("dev.key"));
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
        let (crt, key) = super::write_dev_pair(dir.path(), &names).unwrap();
        let pair = crate::tls::load_pair(&crt, &key).unwrap();
        let expiry = crate::tls::expiry(&pair).unwrap();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
        assert!(expiry > now + 86_400.0 * 300.0, "valid for about a year");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
        }
    }
}
