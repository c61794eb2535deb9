//! When a request goes again, to another backend, and what it takes to send it again.
//!
//! [`decide`] is pure: from what an attempt ended with, how far the request got, and the pool's
//! `[retry]`, it says whether to fail over (the request never reached its backend), retry (it
//! did, and the failure is one `[retry]` allows), or stop. Whether the body can be rebuilt, the
//! budget and an untried backend are then checked by the caller. [`Replay`] keeps what a retry
//! needs: the method, target, headers and (when small) the body.

use crate::config::{PoolConfig, RetryConfig};
use crate::error::ProxyError;
use crate::pool::{Backend, InflightGuard, Pool};
use crate::upstream::{self, RequestBody, SendError};
use http::{header, Request, Response, Uri, Version};
use std::sync::Arc;

/// How many other backends a request that never reached its backend may be sent to.
pub(super) const MAX_FAILOVER: usize = 2;

/// What an attempt ended with, as far as sending again is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ended {
    /// A response head with this status.
    Answered(u16),
    /// The request certainly never reached the backend (no connection, or handed back unwritten).
    Unsent,
    /// The h2 backend refused the stream: it did not process the request.
    Refused,
    /// The backend failed after the request went out, before a response head.
    Reset,
    /// Anything else (no response head in time, a request that could not be built).
    Other,
}

impl Ended {
    /// What a send ended with (`Err(_)`: no response head within the timeout).
    pub(super) fn of<B, T>(sent: &Result<Result<Response<B>, SendError>, T>) -> Ended {
        match sent {
            Ok(Ok(r)) => Ended::Answered(r.status().as_u16()),
            Ok(Err(SendError { unsent: Some(_), .. })) => Ended::Unsent,
            Ok(Err(SendError { refused: true, .. })) => Ended::Refused,
            Ok(Err(SendError { error: ProxyError::Upstream(_), .. })) => Ended::Reset,
            Ok(Err(_)) | Err(_) => Ended::Other,
        }
    }
}

/// How far a request got.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Attempt {
    /// Retries made so far.
    pub retries: u32,
    /// Backends already tried for a failover.
    pub tried: usize,
    /// The request can be rebuilt (with `[retry]`, a body small enough to keep).
    pub replayable: bool,
    /// Its method may go again after a backend processed it (`retry.idempotent_only`).
    pub method_ok: bool,
}

/// What to do after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Decision {
    /// Send it, unchanged, to another backend: it never reached this one.
    Failover,
    /// Send it again to another backend; the reason, for the retry metric.
    Retry(&'static str),
    /// Answer with what this attempt ended with.
    Stop,
}

/// Decides what follows an attempt that ended with `ended`.
pub(super) fn decide(ended: Ended, at: Attempt, retry: Option<&RetryConfig>) -> Decision {
    if ended == Ended::Unsent {
        return if at.tried < MAX_FAILOVER { Decision::Failover } else { Decision::Stop };
    }
    let Some(rc) = retry.filter(|rc| at.replayable && at.retries < rc.attempts) else { return Decision::Stop };
    let reset = at.method_ok && rc.on_reset;
    match ended {
        // A refused stream was not processed, so any method may go again.
        Ended::Refused if rc.on_refused_stream => Decision::Retry("refused-stream"),
        Ended::Refused | Ended::Reset if reset => Decision::Retry("reset"),
        Ended::Answered(503) if at.method_ok && rc.on_503 => Decision::Retry("503"),
        Ended::Answered(429) if at.method_ok && rc.on_429 => Decision::Retry("429"),
        _ => Decision::Stop,
    }
}

/// A request's attempts so far: the backends tried, the retries made, what it may do again.
pub(super) struct Attempts {
    tried: Vec<usize>,
    at: Attempt,
}

impl Attempts {
    pub(super) fn new(replay: Option<&Replay>) -> Self {
        let at = Attempt {
            replayable: replay.is_some(),
            method_ok: replay.is_some_and(|r| r.method_ok),
            ..Attempt::default()
        };
        Attempts { tried: Vec::new(), at }
    }

    /// What follows the send that ended with `sent` on `backend` (whose `Retry-After`, if any,
    /// is honoured first).
    pub(super) fn decide<B, T>(
        &mut self,
        sent: &Result<Result<Response<B>, SendError>, T>,
        backend: &Backend,
        cfg: &PoolConfig,
    ) -> Decision {
        if let (Ok(Ok(r)), true) = (sent, cfg.honor_retry_after) {
            honor_retry_after(r, backend);
        }
        self.at.tried = self.tried.len();
        decide(Ended::of(sent), self.at, cfg.retry.as_ref())
    }

    /// A slot on a backend not tried yet, for a request that never reached `failed`'s.
    pub(super) fn untried(&mut self, pool: &Pool, failed: &InflightGuard) -> Option<InflightGuard> {
        untried_backend(pool, &mut self.tried, failed.backend())
    }

    /// The request again and a slot on a backend not tried yet, within the pool's retry budget
    /// (spent only when another backend actually takes the retry); `None` when the body cannot
    /// be rebuilt, no backend is left, or the budget is spent.
    pub(super) fn retry(
        &mut self,
        pool: &Pool,
        failed: &InflightGuard,
        replay: Option<&mut Replay>,
    ) -> Option<(Request<RequestBody>, InflightGuard)> {
        let again = replay.and_then(Replay::request)?;
        let next = untried_backend(pool, &mut self.tried, failed.backend())?;
        let rc = pool.config.retry.as_ref()?;
        if !pool.state.take_retry(rc.budget_percent) {
            return None;
        }
        self.at.retries += 1;
        Some((again, next))
    }

    /// The status a failed attempt is counted with: its answer's (a 503 or 429 that is retried
    /// is discarded with its connection), else 502.
    pub(super) fn status<B, T>(sent: &Result<Result<Response<B>, SendError>, T>) -> u16 {
        match sent {
            Ok(Ok(r)) => r.status().as_u16(),
            _ => 502,
        }
    }
}

/// A 429 or 503 with `Retry-After` pauses its backend for that long.
fn honor_retry_after<B>(resp: &Response<B>, backend: &Backend) {
    if matches!(resp.status().as_u16(), 429 | 503) {
        if let Some(pause) = resp.headers().get(header::RETRY_AFTER).and_then(super::headers::retry_after) {
            backend.saturate(pause);
        }
    }
}

/// Marks `failed` as tried and claims a slot on a backend of `pool` not tried yet.
fn untried_backend(pool: &Pool, tried: &mut Vec<usize>, failed: &Arc<Backend>) -> Option<InflightGuard> {
    if let Some(i) = pool.index_of(failed).filter(|i| !tried.contains(i)) {
        tried.push(i);
    }
    pool.try_acquire_except(|i| tried.contains(&i))
}

/// What it takes to send a request again.
pub(super) struct Replay {
    /// The method may be retried after a backend processed it (`retry.idempotent_only`).
    pub method_ok: bool,
    pub method: http::Method,
    pub uri: Uri,
    pub headers: http::HeaderMap,
    pub body: Kept,
}

/// The body of a request that may be sent again.
pub(super) enum Kept {
    /// Still streaming upstream; the frames arrive once it has been forwarded in full.
    Waiting(upstream::Kept),
    /// The whole body (empty for a request that had none).
    Frames(Vec<bytes::Bytes>),
    /// Too big to keep, not fully forwarded, or broken: cannot be sent again.
    Lost,
}

impl Replay {
    /// What it takes to send `parts` again under `rc`, or `None` when it may not go again
    /// (its method, or a declared body too large to keep). `body` is the upstream body;
    /// `whole`, the body when it was already read into memory (to route by it), at any size.
    pub(super) fn of(
        parts: &http::request::Parts,
        body: &mut RequestBody,
        whole: Option<&bytes::Bytes>,
        declared: Option<u64>,
        rc: &RetryConfig,
    ) -> Option<Replay> {
        let method_ok = !rc.idempotent_only || parts.method.is_idempotent();
        let small = whole.is_some() || declared.is_none_or(|n| n <= upstream::KEEP_LIMIT as u64);
        if !((method_ok || rc.on_refused_stream) && small) {
            return None;
        }
        let body = match whole {
            Some(w) if w.is_empty() => Kept::Frames(Vec::new()),
            Some(w) => Kept::Frames(vec![w.clone()]),
            None if http_body::Body::is_end_stream(body) => Kept::Frames(Vec::new()),
            None => Kept::Waiting(body.keep()),
        };
        Some(Replay {
            method_ok,
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            headers: parts.headers.clone(),
            body,
        })
    }

    /// The request again, or `None` when its body cannot be rebuilt.
    pub(super) fn request(&mut self) -> Option<Request<RequestBody>> {
        if let Kept::Waiting(rx) = &mut self.body {
            self.body = match rx.try_recv() {
                Ok(frames) => Kept::Frames(frames),
                Err(_) => Kept::Lost,
            };
        }
        let Kept::Frames(frames) = &self.body else { return None };
        let mut r = Request::new(RequestBody::replay(frames.clone()));
        *r.method_mut() = self.method.clone();
        *r.uri_mut() = self.uri.clone();
        *r.version_mut() = Version::HTTP_11;
        *r.headers_mut() = self.headers.clone();
        Some(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rc() -> RetryConfig {
        RetryConfig {
            attempts: 2,
            on_reset: true,
            on_refused_stream: true,
            on_503: true,
            on_429: false,
            budget_percent: 20,
            idempotent_only: true,
        }
    }

    fn at(retries: u32, method_ok: bool) -> Attempt {
        Attempt { retries, tried: 0, replayable: true, method_ok }
    }

    #[test]
    fn a_request_that_never_left_fails_over_a_bounded_number_of_times_with_or_without_retry() {
        assert_eq!(decide(Ended::Unsent, at(0, false), None), Decision::Failover);
        let spent = Attempt { tried: MAX_FAILOVER, ..at(0, true) };
        assert_eq!(decide(Ended::Unsent, spent, Some(&rc())), Decision::Stop);
    }

    #[test]
    fn retries_follow_the_kinds_the_pool_allows_and_its_attempts() {
        let rc = rc();
        assert_eq!(decide(Ended::Answered(503), at(0, true), Some(&rc)), Decision::Retry("503"));
        assert_eq!(decide(Ended::Answered(429), at(0, true), Some(&rc)), Decision::Stop, "on_429 is off");
        assert_eq!(decide(Ended::Answered(200), at(0, true), Some(&rc)), Decision::Stop);
        assert_eq!(decide(Ended::Reset, at(0, true), Some(&rc)), Decision::Retry("reset"));
        assert_eq!(decide(Ended::Answered(503), at(2, true), Some(&rc)), Decision::Stop, "attempts spent");
        assert_eq!(decide(Ended::Other, at(0, true), Some(&rc)), Decision::Stop, "a timeout is not retried");
        assert_eq!(decide(Ended::Answered(503), at(0, true), None), Decision::Stop, "no [retry]");
        let lost = Attempt { replayable: false, ..at(0, true) };
        assert_eq!(decide(Ended::Answered(503), lost, Some(&rc)), Decision::Stop, "nothing to send again");
    }

    #[test]
    fn a_non_idempotent_request_goes_again_only_when_the_backend_refused_its_stream() {
        let rc = rc();
        assert_eq!(decide(Ended::Answered(503), at(0, false), Some(&rc)), Decision::Stop);
        assert_eq!(decide(Ended::Reset, at(0, false), Some(&rc)), Decision::Stop);
        assert_eq!(decide(Ended::Refused, at(0, false), Some(&rc)), Decision::Retry("refused-stream"));
        let no_refused = RetryConfig { on_refused_stream: false, ..rc };
        assert_eq!(decide(Ended::Refused, at(0, true), Some(&no_refused)), Decision::Retry("reset"));
        assert_eq!(decide(Ended::Refused, at(0, false), Some(&no_refused)), Decision::Stop);
    }
}
