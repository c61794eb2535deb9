//! The control plane's messages and records: what `GET /api/config` shows ([`ConfigStatus`], with
//! its recent [`ConfigEvent`]s), what triggered a reload, and the requests the reloader serves
//! (reloads and runtime backend changes) with their answers.

use crate::config::BackendConfig;
use std::net::SocketAddr;
use std::path::PathBuf;
use tokio::sync::oneshot;

/// What `GET /api/config` shows.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ConfigStatus {
    /// The config file, when there is one.
    pub path: Option<PathBuf>,
    /// Hash of the running config's text (16 hex digits).
    pub hash: String,
    /// When the running config was loaded, Unix seconds.
    pub loaded_at: f64,
    /// Reloads applied since start.
    pub reloads: u64,
    /// The last failed reload, if any since the last good one.
    pub last_error: Option<String>,
    /// When it failed, Unix seconds.
    pub last_error_at: Option<f64>,
    /// Why the state file was ignored at start-up, if it was.
    pub state_error: Option<String>,
    /// The last failed reload of the TLS certificate files, if any since the last good one
    /// (the certificates in use stay).
    pub tls_error: Option<String>,
    /// When the certificates were last loaded, Unix seconds.
    pub tls_loaded_at: Option<f64>,
    /// The last [`CONFIG_EVENTS_KEPT`] loads of the file, oldest first
    /// (`GET /api/config/events`).
    #[serde(skip)]
    pub events: std::collections::VecDeque<ConfigEvent>,
}

/// Config loads kept for `GET /api/config/events`.
pub const CONFIG_EVENTS_KEPT: usize = 50;

/// One load of the config file and how it ended.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConfigEvent {
    /// Unix seconds.
    pub time: f64,
    /// `file`, `signal` or `api`.
    pub trigger: &'static str,
    /// `applied`; `rejected` (the running config stays); `restored` (the file is back to the
    /// running text, which clears `last_error`).
    pub outcome: &'static str,
    /// Hash of the file's text (none when it could not be read).
    pub hash: Option<String>,
    pub error: Option<String>,
}

impl ConfigStatus {
    pub(crate) fn record(&mut self, event: ConfigEvent) {
        if self.events.len() == CONFIG_EVENTS_KEPT {
            self.events.pop_front();
        }
        self.events.push_back(event);
    }
}

/// The outcome of one reload request.
pub type ReloadResult = Result<ConfigStatus, String>;

/// Why a reload was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    File,
    Signal,
    Api,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::File => "file",
            Trigger::Signal => "signal",
            Trigger::Api => "api",
        }
    }
}

/// A request to the reloader, answered when done.
pub enum ReloadRequest {
    /// Read the config file again and apply it.
    Reload { trigger: Trigger, reply: Option<oneshot::Sender<ReloadResult>> },
    /// Add or remove a backend at runtime (the registration API); kept across reloads.
    Backend { pool: String, change: BackendChange, reply: oneshot::Sender<Result<(), ChangeError>> },
}

/// A runtime change to a pool's backends.
#[derive(Debug, Clone)]
pub enum BackendChange {
    /// `persist`: kept in the state file (when `server.state_dir` is set) across restarts.
    Add { backend: BackendConfig, persist: bool },
    /// Several at once, published together (a provider's reply); those that cannot be added
    /// (address rules, already present) are logged and skipped.
    AddMany { backends: Vec<BackendConfig>, persist: bool },
    /// Drains, then removes once idle.
    Remove(SocketAddr),
    /// Puts a drained backend back in service (not one that is being removed).
    Undrain(SocketAddr),
}

/// Why a backend change was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChangeError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// The change itself is not acceptable (an address no backend may have).
    #[error("{0}")]
    Invalid(String),
    /// The change could not be made for a reason of headroom's own (the state file).
    #[error("{0}")]
    Internal(String),
    /// The shared store of a group of replicas cannot be reached: nothing was changed.
    #[error("{0}")]
    Unavailable(String),
}
