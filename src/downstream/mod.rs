//! The client side of a connection ("downstream"), below the codecs: the state a client
//! connection shares with its requests ([`ConnShared`]: requests in flight, when it went idle,
//! whether it stalled, and for h2 the frames waiting on the client's window), and the IO wrapper
//! of the connections hyper serves ([`h2_io::ClientIo`]), which enforces the timeouts hyper's h2
//! server does not have. HTTP/1.x connections are served by `http1::server`, which enforces them
//! itself by the same rule ([`ConnShared::quiet_deadline_ms`]).
//!
//! It never locks: a few atomics per connection.

pub mod h2_io;

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// State shared between a client connection's IO wrapper and its service.
#[derive(Debug, Default)]
pub struct ConnShared {
    /// Requests being served on this connection (several on h2).
    pub(crate) active: AtomicU32,
    /// Bumped each time a request finishes, so the IO side notices a new idle period.
    pub(crate) finished: AtomicU64,
    /// When the last request finished (`now_ms`).
    idle_since_ms: AtomicU64,
    /// The current response's head is being written (own HTTP/1.1 codec): too late for a
    /// `100 Continue`.
    pub(crate) responding: AtomicBool,
    /// A request body read over TLS wants a `100 Continue` written (own HTTP/1.1 codec).
    pub(crate) continue_wanted: AtomicBool,
    /// The connection was cut off because the client took no response bytes for
    /// `send_timeout`; the requests it ends are logged as `client_stalled`.
    stalled: AtomicBool,
    /// h2 only: response bodies that handed a frame to hyper and were not asked for the next one
    /// yet (hyper asks only once the client's flow-control window has room).
    unsent: AtomicU32,
    /// h2 only: when a body waiting for the client last made progress (`now_ms`).
    unsent_progress_ms: AtomicU64,
    /// Whether response bodies report their frames to `unsent` (h2 connections).
    watch_sends: bool,
}

impl ConnShared {
    pub fn new() -> Arc<Self> {
        let s = ConnShared::default();
        s.idle_since_ms.store(crate::clock::now_ms(), Ordering::Relaxed);
        Arc::new(s)
    }

    /// Shared state of an h2 connection: response bodies report frames waiting for the client.
    pub fn new_h2() -> Arc<Self> {
        let s = ConnShared { watch_sends: true, ..ConnShared::default() };
        s.idle_since_ms.store(crate::clock::now_ms(), Ordering::Relaxed);
        Arc::new(s)
    }

    /// Whether the connection was cut off for taking no response bytes.
    pub fn stalled(&self) -> bool {
        self.stalled.load(Ordering::Relaxed)
    }

    /// Marks the connection as cut off for taking no response bytes (counted once).
    pub(crate) fn set_stalled(&self) {
        if !self.stalled.swap(true, Ordering::Relaxed) {
            crate::telemetry::client_stalled();
        }
    }

    /// Whether this connection's response bodies report [`Self::frame_handed`].
    pub(crate) fn watches_sends(&self) -> bool {
        self.watch_sends
    }

    /// A response body handed a frame to the connection and waits to be asked for the next.
    pub(crate) fn frame_handed(&self) {
        if self.unsent.fetch_add(1, Ordering::Relaxed) == 0 {
            self.unsent_progress_ms.store(crate::clock::now_ms(), Ordering::Relaxed);
        }
    }

    /// A body that had handed a frame was asked for more (or dropped): the client took it.
    pub(crate) fn frame_taken(&self) {
        self.unsent.fetch_sub(1, Ordering::Relaxed);
        self.unsent_progress_ms.store(crate::clock::now_ms(), Ordering::Relaxed);
    }

    /// When the bodies waiting on the client will have waited `send_timeout` with no progress
    /// (`now_ms`), or `None` when none waits.
    pub(crate) fn send_deadline_ms(&self, send_timeout: Duration) -> Option<u64> {
        (self.unsent.load(Ordering::Relaxed) > 0)
            .then(|| crate::clock::add_ms(self.unsent_progress_ms.load(Ordering::Relaxed), send_timeout))
    }

    /// Marks a request as started; the returned marker ends it when dropped (with the response body).
    pub fn start(self: &Arc<Self>) -> ActiveRequest {
        self.active.fetch_add(1, Ordering::Relaxed);
        ActiveRequest(self.clone())
    }

    /// When the last request on this connection finished (`now_ms`), as its response body ended.
    pub(crate) fn idle_since_ms(&self) -> u64 {
        self.idle_since_ms.load(Ordering::Relaxed)
    }

    /// When a connection with no request in flight times out (`now_ms`): `idle_timeout` after
    /// its last request ended, or, before its first, the shorter of the two timeouts after it
    /// opened (at `opened_ms`).
    pub(crate) fn quiet_deadline_ms(
        &self,
        opened_ms: u64,
        served_any: bool,
        header_timeout: Duration,
        idle_timeout: Duration,
    ) -> u64 {
        if served_any {
            crate::clock::add_ms(self.idle_since_ms(), idle_timeout)
        } else {
            crate::clock::add_ms(opened_ms, header_timeout.min(idle_timeout))
        }
    }
}

/// A request in progress on a connection; dropped when its response is done.
#[derive(Debug)]
pub struct ActiveRequest(Arc<ConnShared>);

impl ActiveRequest {
    /// The connection the request came on.
    pub fn conn(&self) -> &ConnShared {
        &self.0
    }
}

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        self.0.idle_since_ms.store(crate::clock::now_ms(), Ordering::Relaxed);
        self.0.finished.fetch_add(1, Ordering::Relaxed);
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}
