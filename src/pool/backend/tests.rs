use super::*;

#[test]
fn acquire_respects_capacity_and_releases() {
    let b = Arc::new(Backend::standalone("127.0.0.1:1".parse().unwrap(), 1, 2));
    let g1 = b.try_acquire().unwrap();
    let g2 = b.try_acquire().unwrap();
    assert!(b.try_acquire().is_none());
    assert_eq!(b.in_flight(), 2);
    drop(g1);
    assert_eq!(b.in_flight(), 1);
    drop(g2);
    assert_eq!(b.in_flight(), 0);
    b.set_state(BackendState::Draining);
    assert!(b.try_acquire().is_none());
}

#[test]
fn concurrent_acquires_never_exceed_capacity() {
    let b = Arc::new(Backend::standalone("127.0.0.1:1".parse().unwrap(), 1, 10));
    let held: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> =
            (0..4).map(|_| s.spawn(|| (0..100).filter_map(|_| b.try_acquire()).collect::<Vec<_>>())).collect();
        hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(held.len(), 10);
    assert_eq!(b.in_flight(), 10);
}

#[test]
fn ejections_grow_with_the_streak_stop_at_the_cap_and_are_forgiven() {
    use std::time::Duration;
    let b = Arc::new(Backend::standalone("127.0.0.1:1".parse().unwrap(), 1, 4));
    b.pool_state.size.store(2, Ordering::Relaxed);
    b.pool_state.outlier.store(Some(Arc::new(OutlierConfig {
        consecutive_failures: 2,
        base_ejection: Duration::from_millis(100),
        max_ejection: Duration::from_millis(250),
        max_ejected_percent: 50,
    })));
    let mut lengths = Vec::new();
    for _ in 0..4 {
        b.count_response(500, true);
        assert_eq!(b.state(), BackendState::Healthy, "one failure is not enough");
        b.count_response(502, true);
        assert_eq!(b.state(), BackendState::Ejected);
        lengths.push(b.last_ejection_ms());
        // What the readmission ticker does when the time is up.
        b.pool_state.ejected.fetch_sub(1, Ordering::Relaxed);
        b.set_state(BackendState::Healthy);
    }
    assert_eq!(lengths, [100, 200, 250, 250]);
    assert_eq!(b.ejections(), 4);
    // A success in between resets the failure count.
    b.count_response(500, true);
    b.count_response(200, false);
    b.count_response(500, true);
    assert_eq!(b.state(), BackendState::Healthy);
    // After staying in service for the calm period, the next ejection is short again.
    let until = b.ejected_until_ms.load(Ordering::Relaxed);
    b.forgive_ejections(until + 100, 250);
    b.count_response(500, true);
    assert_eq!(b.last_ejection_ms(), 250, "not forgiven before the calm period");
    b.pool_state.ejected.fetch_sub(1, Ordering::Relaxed);
    b.set_state(BackendState::Healthy);
    let until = b.ejected_until_ms.load(Ordering::Relaxed);
    b.forgive_ejections(until + 250, 250);
    b.count_response(500, true);
    b.count_response(500, true);
    assert_eq!(b.last_ejection_ms(), 100);
}

#[test]
fn a_retry_after_pause_makes_a_backend_ineligible_until_it_ends() {
    let b = Arc::new(Backend::standalone("127.0.0.1:1".parse().unwrap(), 1, 4));
    assert!(b.try_acquire().is_some());
    b.saturate(std::time::Duration::ZERO);
    assert!(b.is_eligible());
    b.saturate(std::time::Duration::from_secs(3600));
    assert!(!b.is_eligible() && b.try_acquire().is_none());
    let left = b.saturated_for_ms();
    assert!(left > 299_000 && left <= 300_000, "capped at five minutes: {left}");
    assert_eq!(b.state(), BackendState::Healthy, "a pause is not a state change");
    b.hot.saturated_until_ms.store(crate::clock::now_ms(), Ordering::Relaxed);
    assert!(b.try_acquire().is_some(), "usable again once the pause is over");
}
