//! The admission queue: when every backend of a pool is at capacity, requests wait here in FIFO
//! order, up to `queue.timeout`, and are woken one by one as slots free. A full queue rejects at
//! once.
//!
//! The fast path (a pool with free capacity and an empty queue) never touches this module beyond
//! one atomic load of the depth. The waiter list sits behind a mutex, taken only while a pool is
//! saturated (joining, leaving, or a slot freeing while someone waits): that is the overload path,
//! where every request is already waiting for a backend, never the request fast path.

// The one lock of the crate, on the overload path only (see above).
#![allow(clippy::disallowed_types)]

pub use crate::error::Rejection;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use tokio::sync::oneshot;

struct Waiter {
    id: u64,
    tx: oneshot::Sender<()>,
}

pub struct AdmissionQueue {
    depth: AtomicUsize,
    max_depth: AtomicUsize,
    next_id: AtomicU64,
    waiters: Mutex<VecDeque<Waiter>>,
}

impl AdmissionQueue {
    pub fn new(max_depth: usize) -> Self {
        AdmissionQueue {
            depth: AtomicUsize::new(0),
            max_depth: AtomicUsize::new(max_depth),
            next_id: AtomicU64::new(0),
            waiters: Mutex::new(VecDeque::new()),
        }
    }

    /// Requests waiting right now. Read by the hot path, the metrics and the autoscaler.
    #[inline]
    pub fn depth(&self) -> usize {
        self.depth.load(Ordering::SeqCst)
    }

    pub fn max_depth(&self) -> usize {
        self.max_depth.load(Ordering::Relaxed)
    }

    pub fn set_max_depth(&self, max: usize) {
        self.max_depth.store(max, Ordering::Relaxed);
    }

    fn list(&self) -> std::sync::MutexGuard<'_, VecDeque<Waiter>> {
        self.waiters.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Wakes the longest-waiting request, skipping ones that already gave up.
    pub fn wake_one(&self) {
        let mut list = self.list();
        while let Some(w) = list.pop_front() {
            if w.tx.send(()).is_ok() {
                return;
            }
        }
    }

    /// Joins the back of the queue, or fails when it is full.
    pub(super) fn join(&self) -> Result<Ticket<'_>, Rejection> {
        let max = self.max_depth();
        let mut cur = self.depth.load(Ordering::SeqCst);
        loop {
            if cur >= max {
                return Err(Rejection::QueueFull);
            }
            match self.depth.compare_exchange_weak(cur, cur + 1, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => break,
                Err(now) => cur = now,
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.list().push_back(Waiter { id, tx });
        Ok(Ticket { queue: self, id, rx, used: false })
    }
}

/// A place in the queue. Dropping it leaves the queue; a wake-up it received but did not use is
/// passed on to the next waiter, so no freed slot is ever lost.
pub(super) struct Ticket<'q> {
    queue: &'q AdmissionQueue,
    id: u64,
    pub(super) rx: oneshot::Receiver<()>,
    pub(super) used: bool,
}

impl Ticket<'_> {
    /// Goes back to the front after a wake-up that lost its slot to a racing request.
    pub(super) fn requeue_front(&mut self) {
        let (tx, rx) = oneshot::channel();
        self.rx = rx;
        self.queue.list().push_front(Waiter { id: self.id, tx });
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.queue.depth.fetch_sub(1, Ordering::SeqCst);
        if self.used {
            return;
        }
        if self.rx.try_recv().is_ok() {
            // Woken but never used the slot (timed out at the same moment): pass it on.
            self.queue.wake_one();
        } else {
            let id = self.id;
            self.queue.list().retain(|w| w.id != id);
        }
    }
}
