//! The state file: backends added at run time (by the autoscaler's providers or the registration
//! API) are written to `{server.state_dir}/dynamic-backends.json` whenever they change, and read
//! back at start-up, so a restart keeps them.
//!
//! Writes go to a temporary file that is then renamed over the old one, so a crash leaves either
//! the old file or the new one, never half of one. A file that can't be read is reported and
//! ignored: headroom starts with the backends of its config.

use crate::config::BackendConfig;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub const FILE_NAME: &str = "dynamic-backends.json";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a valid state file ({message}); it is ignored and will be rewritten")]
    Corrupt { path: PathBuf, message: String },
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    version: u32,
    pools: BTreeMap<String, Vec<Saved>>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Saved {
    addr: SocketAddr,
    weight: u32,
    max_inflight: u32,
}

pub fn path(dir: &Path) -> PathBuf {
    dir.join(FILE_NAME)
}

/// The saved backends by pool; none when there is no file yet.
pub fn load(dir: &Path) -> Result<HashMap<String, Vec<BackendConfig>>, StateError> {
    let path = path(dir);
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HashMap::new()),
        Err(source) => return Err(StateError::Io { path, source }),
    };
    let file: StateFile = serde_json::from_slice(&text)
        .map_err(|e| StateError::Corrupt { path: path.clone(), message: e.to_string() })?;
    if file.version != 1 {
        return Err(StateError::Corrupt { path, message: format!("unknown version {}", file.version) });
    }
    let mut out = HashMap::new();
    for (pool, saved) in file.pools {
        let mut list = Vec::new();
        for s in saved {
            if !(1..=crate::config::MAX_WEIGHT).contains(&s.weight) || s.max_inflight == 0 {
                return Err(StateError::Corrupt {
                    path,
                    message: format!("backend {} has weight {} and capacity {}", s.addr, s.weight, s.max_inflight),
                });
            }
            list.push(BackendConfig { addr: s.addr, weight: s.weight, max_inflight: s.max_inflight, backup: false });
        }
        out.insert(pool, list);
    }
    Ok(out)
}

/// Whether the state file can be written in `dir` (creating it if needed): `headroom check` and
/// start-up say so at once, rather than the first registration finding out.
pub fn check_writable(dir: &Path) -> Result<(), StateError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StateError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let probe = dir.join(format!(".{FILE_NAME}.probe"));
    std::fs::File::create(&probe).map_err(io(&probe))?;
    std::fs::remove_file(&probe).map_err(io(&probe))
}

/// Writes `backends` (by pool) atomically.
pub fn save(dir: &Path, backends: &HashMap<String, Vec<BackendConfig>>) -> Result<(), StateError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StateError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let file = StateFile {
        version: 1,
        pools: backends
            .iter()
            .filter(|(_, list)| !list.is_empty())
            .map(|(pool, list)| {
                let saved = list
                    .iter()
                    .map(|b| Saved { addr: b.addr, weight: b.weight, max_inflight: b.max_inflight })
                    .collect();
                (pool.clone(), saved)
            })
            .collect(),
    };
    let text = serde_json::to_vec_pretty(&file)
        .map_err(|e| StateError::Corrupt { path: path(dir), message: e.to_string() })?;
    let tmp = dir.join(format!(".{FILE_NAME}.tmp"));
    let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(&text).and_then(|_| f.sync_all()).map_err(io(&tmp))?;
    let target = path(dir);
    std::fs::rename(&tmp, &target).map_err(io(&target))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_dir_under_a_file_is_not_writable() {
        let dir = tempfile::tempdir().unwrap();
        assert!(check_writable(&dir.path().join("state")).is_ok());
        let file = dir.path().join("plain");
        std::fs::write(&file, "x").unwrap();
        let e = check_writable(&file.join("state")).unwrap_err();
        assert!(e.to_string().contains("plain"), "{e}");
    }

    #[test]
    fn round_trip_missing_and_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(dir.path()).unwrap().is_empty(), "no file yet: nothing saved");
        let b = BackendConfig { addr: "127.0.0.1:7001".parse().unwrap(), weight: 3, max_inflight: 9, backup: false };
        let mut m = HashMap::new();
        m.insert("p".to_string(), vec![b.clone()]);
        save(dir.path(), &m).unwrap();
        assert_eq!(load(dir.path()).unwrap()["p"], vec![b]);
        std::fs::write(path(dir.path()), b"{\"version\":1,\"pools\":{\"p\":[{\"addr\":\"nope\"").unwrap();
        let e = load(dir.path()).unwrap_err();
        assert!(matches!(e, StateError::Corrupt { .. }) && e.to_string().contains("ignored"), "{e}");
    }
}
