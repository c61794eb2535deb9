//! Elastic capacity: the per-pool admission queue that forms when every backend is full, and the
//! launcher that starts local backend processes. The queue depth is the signal the autoscaler reads.

pub mod launch;
pub mod queue;
