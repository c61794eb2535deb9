//! Time for the rest of the crate: deadlines that cannot overflow (every `Instant + Duration` on
//! a path a client or a config value can reach goes through here, so that no duration, however
//! long, can panic the process), and a cheap shared millisecond clock for bookkeeping kept in
//! atomics (idle periods, ejections, saturation, slow start).

use std::sync::OnceLock;
use std::time::Duration;
use tokio::time::Instant;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_duration_saturates_instead_of_panicking() {
        let d = deadline(Duration::MAX);
        assert!(d > Instant::now() + Duration::from_secs(365 * 24 * 3600));
        assert_eq!(add_ms(u64::MAX - 1, Duration::MAX), u64::MAX);
        assert_eq!(add_ms(5, Duration::from_millis(7)), 12);
    }
}
