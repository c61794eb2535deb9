//! The per-pool background tasks (health checks, the ejection clock, the slow-start ramp, the
//! autoscaler): started when a pool has the section that needs them, each ending by itself when
//! its pool or section is gone.

use super::signals::until_set;
use crate::control::Control;
use crate::health;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The background tasks of each pool, started when a pool has the section that needs them.
#[derive(Default)]
pub(super) struct PoolTasks {
    running: HashMap<(String, PoolTask), JoinHandle<()>>,
}

/// A background task a pool may need.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum PoolTask {
    /// Active health checks (`[pools.x.health]`).
    Health,
    /// Ejected backends back in at the end of their ejection (`[pools.x.outlier]`).
    Readmit,
    /// The slow-start ramp (`slow_start`).
    Ramp,
    /// The autoscaler (`[pools.x.autoscale]`).
    Autoscale,
    /// Reading the engines' metrics (`[pools.x.engine]`).
    Engine,
    /// Asking the backends for their models (`discover_models`).
    Models,
}

impl PoolTask {
    const ALL: [PoolTask; 6] =
        [PoolTask::Health, PoolTask::Readmit, PoolTask::Ramp, PoolTask::Autoscale, PoolTask::Engine, PoolTask::Models];

    /// Whether a pool with this config needs the task.
    fn wanted(self, pool: &crate::config::PoolConfig) -> bool {
        match self {
            PoolTask::Health => pool.health.is_some(),
            PoolTask::Readmit => pool.outlier.is_some(),
            PoolTask::Ramp => pool.slow_start.is_some(),
            PoolTask::Autoscale => pool.autoscale.is_some(),
            PoolTask::Engine => pool.engine.is_some(),
            PoolTask::Models => pool.discover_models,
        }
    }
}

impl PoolTasks {
    /// Starts the tasks the current snapshot needs and that are not running. A task ends by
    /// itself when its pool or section is gone.
    pub(super) fn ensure(&mut self, control: &Arc<Control>, stop: &watch::Receiver<bool>) {
        self.running.retain(|_, t| !t.is_finished());
        for pool in control.snapshot().pools.iter() {
            let name = pool.config.name.clone();
            for kind in PoolTask::ALL {
                if !kind.wanted(&pool.config) || self.running.contains_key(&(name.clone(), kind)) {
                    continue;
                }
                let (g, n, s) = (control.gateway.clone(), name.clone(), until_set(stop.clone()));
                let task = match kind {
                    PoolTask::Health => tokio::spawn(health::run_pool(g, n, s)),
                    PoolTask::Readmit => tokio::spawn(health::readmit_pool(g, n, s)),
                    PoolTask::Ramp => tokio::spawn(health::ramp_pool(g, n, s)),
                    PoolTask::Autoscale => tokio::spawn(crate::scale::autoscale::run_pool(control.clone(), n, s)),
                    PoolTask::Engine => tokio::spawn(crate::scrape::run_pool(g, n, s)),
                    PoolTask::Models => tokio::spawn(crate::scrape::discover_pool(g, n, s)),
                };
                self.running.insert((name.clone(), kind), task);
            }
        }
    }

    pub(super) async fn join(self) {
        for (_, t) in self.running {
            let _ = t.await;
        }
    }
}
