//! Local backend processes: starts each pool's `[pools.X.launch]` command on free loopback ports,
//! waits until they accept connections, and kills them when headroom exits.
//!
//! Runs at start-up, off the request path.

use crate::config::{BackendConfig, Config};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// The processes started for launched backends. Dropping it kills them.
#[derive(Default)]
pub struct Launched {
    children: Vec<Child>,
}

impl Launched {
    pub fn len(&self) -> usize {
        self.children.len()
    }

    pub fn is_empty(&self) -> bool {
        self.children.is_empty()
    }

    /// Kills every launched process and waits for them to exit.
    pub async fn shutdown(&mut self) {
        for child in &mut self.children {
            let _ = child.start_kill();
        }
        for child in &mut self.children {
            let _ = child.wait().await;
        }
        self.children.clear();
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
    let mut launched = Launched::default();
    let mut per_pool = Vec::with_capacity(config.pools.len());
    for pool in &config.pools {
        let mut added = Vec::new();
        if let Some(l) = &pool.launch {
            for _ in 0..l.count {
                let addr = free_port().map_err(|source| LaunchError::Port { pool: pool.name.clone(), source })?;
                let args: Vec<String> = l.command.iter().map(|a| a.replace("{addr}", &addr.to_string())).collect();
                let program = resolve_program(&args[0]);
                let child = Command::new(&program)
                    .args(&args[1..])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::inherit())
                    .kill_on_drop(true)
                    .spawn()
                    .map_err(|source| LaunchError::Spawn {
                        pool: pool.name.clone(),
                        program: program.display().to_string(),
                        source,
                    })?;
                launched.children.push(child);
                added.push(BackendConfig { addr, weight: l.weight, max_inflight: l.max_inflight, backup: false });
            }
            let n = launched.children.len();
            let first = n - added.len();
            for (child, b) in launched.children[first..].iter_mut().zip(&added) {
                wait_ready(&pool.name, b.addr, child, l.ready_timeout).await?;
            }
            tracing::info!(pool = %pool.name, count = added.len(), "launched local backends");
        }
        per_pool.push(added);
    }
    Ok((per_pool, launched))
}

/// `headroom` as the program means this very binary.
fn resolve_program(arg0: &str) -> PathBuf {
    if arg0 == "headroom" {
        if let Ok(exe) = std::env::current_exe() {
            return exe;
        }
    }
    PathBuf::from(arg0)
}

fn free_port() -> std::io::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    l.local_addr()
}

async fn wait_ready(pool: &str, addr: SocketAddr, child: &mut Child, timeout: Duration) -> Result<(), LaunchError> {
    let deadline = Instant::now() + timeout;
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
