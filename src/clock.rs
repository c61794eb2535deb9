//! Time for the rest of the crate: deadlines that cannot overflow (every `Instant + Duration` on
//! a path a client or a config value can reach goes through here, so that no duration, however
//! long, can panic the process), and a cheap shared millisecond clock for bookkeeping kept in
//! atomics (idle periods, ejections, saturation, slow start), and [`IdleTimeout`], the "nothing
//! for so long" timer that data paths restart on every frame.

use std::future::Future as _;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Waker};
use std::time::Duration;
use tokio::time::{Instant, Sleep};

/// Milliseconds since the first use: monotonic, shared by every thread, one `Instant` read.
/// It is tokio's clock, so a test on a paused runtime moves it with `tokio::time::advance` (a
/// clock read before another runtime's reading saturates at zero rather than going back).
pub fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    // Anchored in real time, so that no runtime's clock (paused or not) reads before it.
    let start = *START.get_or_init(|| Instant::from_std(std::time::Instant::now()));
    u64::try_from(Instant::now().saturating_duration_since(start).as_millis()).unwrap_or(u64::MAX)
}

/// About 30 years: what "never" means for a deadline.
const FAR: Duration = Duration::from_secs(30 * 365 * 24 * 3600);

/// `now + after`, saturating at a far-future instant instead of panicking.
pub fn deadline(after: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(after).or_else(|| now.checked_add(FAR)).unwrap_or(now)
}

/// `a + b` in milliseconds, saturating.
pub fn add_ms(a: u64, b: Duration) -> u64 {
    a.saturating_add(u64::try_from(b.as_millis()).unwrap_or(u64::MAX))
}

/// Seconds since the Unix epoch, as a float (0 if the system clock is before it).
pub fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// A timeout that restarts on activity: it expires once `after` has passed with no
/// [`IdleTimeout::touch`]. The timer is created the first time it is polled (a body that never
/// waits never touches the timer wheel), and a touch is one clock read: the timer is not moved
/// on every frame but, when it fires, re-armed at the last activity plus `after`.
pub struct IdleTimeout {
    after: Duration,
    /// Boxed, and only once the timeout is first polled: what holds it stays small.
    armed: Option<Box<Armed>>,
}

struct Armed {
    sleep: Pin<Box<Sleep>>,
    /// Activity since the timer was last set.
    last: Option<Instant>,
    /// The waker the timer will wake: while the same task polls and the deadline has not
    /// passed, the timer need not be polled again.
    registered: Option<Waker>,
}

impl IdleTimeout {
    pub fn new(after: Duration) -> Self {
        IdleTimeout { after, armed: None }
    }

    pub fn after(&self) -> Duration {
        self.after
    }

    /// Restarts the timeout (nothing to do until the timer exists).
    #[inline]
    pub fn touch(&mut self) {
        if let Some(armed) = &mut self.armed {
            armed.last = Some(Instant::now());
        }
    }

    /// Whether `after` has passed since the last touch (or since the first poll); registers
    /// the task to be woken when it may have.
    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> bool {
        let after = self.after;
        let armed = self.armed.get_or_insert_with(|| {
            Box::new(Armed { sleep: Box::pin(tokio::time::sleep_until(deadline(after))), last: None, registered: None })
        });
        if armed.registered.as_ref().is_some_and(|w| w.will_wake(cx.waker())) && !armed.sleep.is_elapsed() {
            return false;
        }
        loop {
            // A task out of its coop budget polls a timer without registering with it (tokio
            // reschedules the task instead): then the timer must be polled again next time.
            let budget = tokio::task::coop::has_budget_remaining();
            if armed.sleep.as_mut().poll(cx).is_pending() {
                armed.registered = budget.then(|| cx.waker().clone());
                return false;
            }
            let Some(at) = armed.last.take() else { return true };
            armed.sleep.as_mut().reset(at.checked_add(after).unwrap_or_else(|| deadline(after)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use std::task::Poll;

    async fn expired(t: &mut IdleTimeout) -> bool {
        poll_fn(|cx| Poll::Ready(t.poll_expired(cx))).await
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_timeout_expires_only_after_a_full_period_without_a_touch() {
        let mut t = IdleTimeout::new(Duration::from_millis(100));
        t.touch(); // before the first poll: nothing armed, nothing to restart
        assert!(!expired(&mut t).await);
        tokio::time::advance(Duration::from_millis(60)).await;
        t.touch();
        tokio::time::advance(Duration::from_millis(60)).await;
        assert!(!expired(&mut t).await, "touched 60 ms ago");
        tokio::time::advance(Duration::from_millis(39)).await;
        assert!(!expired(&mut t).await, "touched 99 ms ago");
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(expired(&mut t).await, "touched 100 ms ago");
    }

    #[tokio::test(start_paused = true)]
    async fn a_timeout_first_polled_without_coop_budget_still_wakes_its_task() {
        let mut t = IdleTimeout::new(Duration::from_millis(100));
        let mut first = true;
        let started = Instant::now();
        let wait = poll_fn(|cx| {
            if std::mem::take(&mut first) {
                // Spend the task's whole budget, as a long run of socket writes does.
                while let Poll::Ready(spent) = tokio::task::coop::poll_proceed(cx) {
                    spent.made_progress();
                }
            }
            if t.poll_expired(cx) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        });
        tokio::time::timeout(Duration::from_secs(5), wait).await.expect("the timer never woke the task");
        assert_eq!(started.elapsed(), Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_task_is_woken_when_the_restarted_timeout_runs_out() {
        let mut t = IdleTimeout::new(Duration::from_millis(100));
        assert!(!expired(&mut t).await);
        tokio::time::advance(Duration::from_millis(50)).await;
        t.touch();
        let started = Instant::now();
        poll_fn(|cx| if t.poll_expired(cx) { Poll::Ready(()) } else { Poll::Pending }).await;
        assert_eq!(started.elapsed(), Duration::from_millis(100));
    }

    #[test]
    fn the_longest_duration_saturates_instead_of_panicking() {
        let d = deadline(Duration::MAX);
        assert!(d > Instant::now() + Duration::from_secs(365 * 24 * 3600));
        assert_eq!(add_ms(u64::MAX - 1, Duration::MAX), u64::MAX);
        assert_eq!(add_ms(5, Duration::from_millis(7)), 12);
    }
}
