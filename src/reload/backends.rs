//! The runtime backend registry: backends added outside the file (launched, by a provider,
//! through the admin API) are validated like the file's, kept across reloads, and saved to the
//! state file when they are to survive a restart; removing, draining and undraining them.

use super::Reloader;
use crate::config::{BackendConfig, Config};
use crate::control::status::{BackendChange, ChangeError};
use crate::pool::BackendState;
use std::collections::HashMap;
use std::net::SocketAddr;
use tokio::sync::watch;

impl Reloader {
    /// Adds runtime backends to `pool`, or drains and removes one. The change is saved to the
    /// state file (when there is one) before it is published: a change that cannot be saved is
    /// not made.
    pub(super) fn change_backend(
        &mut self,
        pool: &str,
        change: BackendChange,
        stop: &watch::Receiver<bool>,
    ) -> Result<(), ChangeError> {
        let running = self.control.snapshot();
        let Some(pc) = running.config.pools.iter().find(|p| p.name == pool) else {
            return Err(ChangeError::NotFound(format!("no pool {pool:?}")));
        };
        if let BackendChange::Undrain(addr) = change {
            return self.undrain(pool, addr);
        }
        let before = (self.extra.get(pool).cloned().unwrap_or_default(), self.persisted.clone());
        match change {
            BackendChange::Undrain(_) => {}
            BackendChange::Add { backend, persist } => self.add_backend(pc, backend, persist)?,
            BackendChange::AddMany { backends, persist } => {
                for b in backends {
                    let addr = b.addr;
                    if let Err(e) = self.add_backend(pc, b, persist) {
                        tracing::warn!(pool, backend = %addr, error = %e, "backend not added");
                    }
                }
            }
            BackendChange::Remove(addr) => {
                if pc.backends.iter().any(|x| x.addr == addr) {
                    return Err(ChangeError::Conflict(format!(
                        "backend {addr} is defined in the config file; remove it there, or drain it"
                    )));
                }
                let dynamic = self.extra.entry(pool.to_string()).or_default();
                let count = dynamic.len();
                dynamic.retain(|x| x.addr != addr);
                if dynamic.len() == count {
                    return Err(ChangeError::NotFound(format!("pool {pool:?} has no backend {addr}")));
                }
                tracing::info!(pool, backend = %addr, "backend deregistered; draining");
                self.persisted.remove(&(pool.to_string(), addr));
            }
        }
        if let Err(e) = self.save_state(&running.config) {
            (*self.extra.entry(pool.to_string()).or_default(), self.persisted) = before;
            return Err(ChangeError::Internal(format!("cannot write the state file, so nothing was changed: {e}")));
        }
        self.publish((*running.config).clone(), false);
        self.tasks.ensure(&self.control, stop);
        Ok(())
    }

    /// `POST .../undrain`: a drained backend takes requests again. One being removed (from the
    /// file, by the API or by the autoscaler) is refused: register it again instead.
    fn undrain(&mut self, pool: &str, addr: SocketAddr) -> Result<(), ChangeError> {
        let running = self.control.snapshot();
        let Some(p) = running.pool(pool) else {
            return Err(ChangeError::NotFound(format!("no pool {pool:?}")));
        };
        let Some(b) = p.backends.iter().find(|b| b.addr == addr) else {
            return Err(ChangeError::NotFound(format!("pool {pool:?} has no backend {addr}")));
        };
        if self.removed.iter().any(|(rp, ra)| rp == pool && *ra == addr) {
            return Err(ChangeError::Conflict(format!(
                "backend {addr} is being removed; register it again to keep it"
            )));
        }
        if b.undrain(p.config.health.is_some()) {
            tracing::info!(pool, backend = %addr, state = b.state().as_str(), "backend undrained");
        }
        Ok(())
    }

    /// Adds one runtime backend to the pool's list (not published yet).
    fn add_backend(
        &mut self,
        pc: &crate::config::PoolConfig,
        b: BackendConfig,
        persist: bool,
    ) -> Result<(), ChangeError> {
        let pool = pc.name.as_str();
        if let Err(rule) = self.control.addr_policy().check(b.addr) {
            return Err(ChangeError::Invalid(format!("addr {}: {rule}", b.addr)));
        }
        let dynamic = self.extra.entry(pool.to_string()).or_default();
        if pc.backends.iter().chain(dynamic.iter()).any(|x| x.addr == b.addr) {
            let drained = self
                .control
                .snapshot()
                .pool(pool)
                .and_then(|p| p.backends.iter().find(|x| x.addr == b.addr).map(|x| x.state()))
                == Some(BackendState::Draining);
            let hint = if drained { " (draining: POST .../undrain puts it back)" } else { "" };
            return Err(ChangeError::Conflict(format!("pool {pool:?} already has backend {}{hint}", b.addr)));
        }
        tracing::info!(pool, backend = %b.addr, weight = b.weight, "backend registered");
        if persist {
            self.persisted.insert((pool.to_string(), b.addr));
        }
        dynamic.push(b);
        Ok(())
    }

    /// Writes the persisted backends to the state file, if the config names a state directory.
    fn save_state(&self, config: &Config) -> Result<(), String> {
        let Some(dir) = &config.server.state_dir else { return Ok(()) };
        let kept: HashMap<String, Vec<BackendConfig>> = self
            .extra
            .iter()
            .map(|(pool, list)| {
                let list = list.iter().filter(|b| self.persisted.contains(&(pool.clone(), b.addr))).cloned().collect();
                (pool.clone(), list)
            })
            .collect();
        crate::scale::state::save(dir, &kept).map_err(|e| {
            tracing::error!(error = %e, "cannot write the state file; dynamic backends won't survive a restart");
            e.to_string()
        })
    }
}
