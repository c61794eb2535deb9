//! Local backend processes: starts each pool's `[pools.X.launch]` command on free loopback ports,
//! waits until they accept connections, and kills them when headroom exits (or when the local
//! autoscaling provider releases one).
//!
//! Runs at start-up and in the autoscaler, never on the request path.

use crate::config::{BackendConfig, Config, LaunchConfig};
use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::process::Child;
use tokio::time::Instant;

/// The processes started for launched backends, by address. Shared by start-up and the local
/// autoscaling provider; dropping it (or [`Launched::shutdown`]) kills them.
#[derive(Default)]
pub struct Launched {
    children: tokio::sync::Mutex<HashMap<SocketAddr, Child>>,
    /// The config file's directory: relative programs are taken from there.
    base_dir: PathBuf,
}

impl Launched {
    /// How many launched processes run now.
    pub async fn count(&self) -> usize {
        self.children.lock().await.len()
    }

    /// Starts one backend of `pool` from its launch template and waits until it accepts
    /// connections.
    pub async fn start_one(&self, pool: &str, l: &LaunchConfig) -> Result<BackendConfig, LaunchError> {
        let addr = free_port().map_err(|source| LaunchError::Port { pool: pool.to_string(), source })?;
        let mut child = spawn(pool, l, addr, &self.base_dir)?;
        if let Err(e) = wait_ready(pool, addr, &mut child, l.ready_timeout).await {
            let _ = child.start_kill();
            let _ = child.wait().await;
            return Err(e);
        }
        self.children.lock().await.insert(addr, child);
        Ok(BackendConfig { addr, weight: l.weight, max_inflight: l.max_inflight, backup: false })
    }

    /// Starts `count` backends of `pool` together, so a slow-starting engine doesn't delay the
    /// next one; one result per backend.
    pub async fn start_many(
        &self,
        pool: &str,
        l: &LaunchConfig,
        count: u32,
    ) -> Vec<Result<BackendConfig, LaunchError>> {
        futures_util::future::join_all((0..count).map(|_| self.start_one(pool, l))).await
    }

    /// Stops the process serving `addr`; false if none was launched there.
    pub async fn stop(&self, addr: SocketAddr) -> bool {
        let child = self.children.lock().await.remove(&addr);
        match child {
            Some(mut c) => {
                let _ = c.start_kill();
                let _ = c.wait().await;
                true
            }
            None => false,
        }
    }

    /// Kills every launched process and waits for them to exit.
    pub async fn shutdown(&self) {
        let mut children: Vec<Child> = self.children.lock().await.drain().map(|(_, c)| c).collect();
        for child in &mut children {
            let _ = child.start_kill();
        }
        for child in &mut children {
            let _ = child.wait().await;
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("pool {pool}: cannot find a free loopback port: {source}")]
    Port { pool: String, source: std::io::Error },
    #[error("pool {pool}: cannot start {program:?}: {source}")]
    Spawn { pool: String, program: String, source: std::io::Error },
    #[error("pool {pool}: launched backend {addr} exited before it was ready ({status})")]
    Exited { pool: String, addr: SocketAddr, status: std::process::ExitStatus },
    #[error("pool {pool}: launched backend {addr} did not accept connections within {timeout:?}")]
    NotReady { pool: String, addr: SocketAddr, timeout: Duration },
}

/// Starts every pool's launched backends; returns, per pool index, the backends to add.
pub async fn launch_all(config: &Config) -> Result<(Vec<Vec<BackendConfig>>, Launched), LaunchError> {
    let launched = Launched { base_dir: config.base_dir.clone(), ..Launched::default() };
    let mut per_pool = Vec::with_capacity(config.pools.len());
    for pool in &config.pools {
        let mut added = Vec::new();
        if let Some(l) = &pool.launch {
            for started in launched.start_many(&pool.name, l, l.count).await {
                match started {
                    Ok(b) => added.push(b),
                    Err(e) => {
                        launched.shutdown().await;
                        return Err(e);
                    }
                }
            }
            if !added.is_empty() {
                tracing::info!(pool = %pool.name, count = added.len(), "launched local backends");
            }
        }
        per_pool.push(added);
    }
    Ok((per_pool, launched))
}

/// Starts one launched backend: its output is not kept (stderr goes to headroom's own).
fn spawn(pool: &str, l: &LaunchConfig, addr: SocketAddr, base_dir: &Path) -> Result<Child, LaunchError> {
    let args: Vec<String> = l.command.iter().map(|a| a.replace("{addr}", &addr.to_string())).collect();
    let program = super::child::program(&args[0], base_dir);
    super::child::command(&program, &args[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|source| LaunchError::Spawn { pool: pool.to_string(), program: program.display().to_string(), source })
}

fn free_port() -> std::io::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    l.local_addr()
}

async fn wait_ready(pool: &str, addr: SocketAddr, child: &mut Child, timeout: Duration) -> Result<(), LaunchError> {
    let deadline = Instant::now().checked_add(timeout).unwrap_or_else(Instant::now);
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(LaunchError::Exited { pool: pool.to_string(), addr, status });
        }
        if Instant::now() >= deadline {
            return Err(LaunchError::NotReady { pool: pool.to_string(), addr, timeout });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
