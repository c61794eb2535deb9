//! Elastic capacity: the per-pool admission queue that forms when every backend is full, the
//! autoscaler that reads its depth and asks a provider for backends (and gives them back), and
//! the launcher that starts local backend processes.

pub mod autoscale;
mod calls;
pub mod child;
pub mod demand;
pub mod events;
pub mod launch;
pub mod policy;
pub mod provider;
pub mod state;
