//! The access log: one line per request through `tracing` (target `access`, level info), written
//! when the response has ended (its last byte sent, or the stream broken), so bytes and duration
//! are final. Fields: method, path, status, pool, backend, bytes, duration_ms, ttfb_ms,
//! request_id, client, outcome.
//!
//! Building an entry copies the method, the path and the request id once per request, only when
//! `server.access_log` is on; the line itself goes to the subscriber's non-blocking writer, so
//! the data path never waits on the terminal or a file.

use http::{HeaderValue, Method};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

/// What a request's log line needs, gathered as it goes.
pub struct Entry {
    pub method: Method,
    pub path: Box<str>,
    pub request_id: HeaderValue,
    pub client: IpAddr,
    /// Set once the request is routed.
    pub pool: Option<Arc<str>>,
    pub started: Instant,
    /// Time to the response head, ms.
    pub ttfb_ms: f64,
    /// Response body bytes sent.
    pub bytes: u64,
}

impl Entry {
    /// Starts an entry for a request arriving now.
    pub fn new(method: &Method, path: &str, request_id: &HeaderValue, client: IpAddr, started: Instant) -> Box<Self> {
        Box::new(Entry {
            method: method.clone(),
            path: path.into(),
            request_id: request_id.clone(),
            client,
            pool: None,
            started,
            ttfb_ms: 0.0,
            bytes: 0,
        })
    }

    /// Writes the line. `backend` is `-` when the gateway answered itself; `outcome` is
    /// `complete`, `aborted` (the response body broke off) or `client_stalled` (the client took
    /// no response bytes for `send_timeout`).
    pub fn write(&self, status: u16, backend: &str, outcome: &'static str) {
        let duration_ms = self.started.elapsed().as_secs_f64() * 1000.0;
        tracing::info!(
            target: "access",
            method = %self.method,
            path = %self.path,
            status,
            pool = self.pool.as_deref().unwrap_or("-"),
            backend,
            bytes = self.bytes,
            duration_ms = (duration_ms * 1000.0).round() / 1000.0,
            ttfb_ms = (self.ttfb_ms * 1000.0).round() / 1000.0,
            request_id = self.request_id.to_str().unwrap_or("-"),
            client = %self.client,
            outcome,
        );
    }
}
