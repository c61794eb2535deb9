//! Counting a finished request, in one place: against the backend that answered (its counters,
//! passive ejection, the latency histogram and the pool's traffic), against the pool when no
//! backend is to blame (the client's own failure, a queue timeout), or as unrouted when no pool
//! was chosen. A failed attempt that is sent again elsewhere is counted against its backend
//! (for passive ejection) but is not a finished request.

use crate::pool::traffic::Outcome;
use crate::pool::{Backend, Pool};
use crate::telemetry::PoolMetrics;

/// Whom a finished request is counted against.
pub(super) enum Scope<'a> {
    /// No pool was chosen.
    Unrouted(&'a PoolMetrics),
    /// A pool was chosen, but no backend is to blame.
    Pool(&'a Pool),
    /// The backend that answered (or failed to).
    Backend(&'a Backend),
}

/// Counts one finished request: its status, how it ended, and how long it took.
pub(super) fn record(scope: Scope<'_>, status: u16, outcome: Outcome, seconds: f64) {
    match scope {
        Scope::Unrouted(metrics) => metrics.record_local(status, seconds),
        Scope::Pool(pool) => {
            pool.metrics.record_local(status, seconds);
            pool.state.traffic.record(outcome, seconds);
        }
        Scope::Backend(backend) => {
            if outcome == Outcome::Aborted {
                backend.count_aborted(status);
            } else {
                backend.count_response(status, outcome == Outcome::Failed);
            }
            backend.observe(status, outcome, seconds);
        }
    }
}

/// Counts an attempt that failed with `status` and goes to another backend (`reason` for the
/// retry metric).
pub(super) fn attempt_failed(pool: &Pool, backend: &Backend, status: u16, reason: &'static str) {
    backend.count_response(status, true);
    pool.metrics.retried(reason);
}
