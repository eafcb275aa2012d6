//! Safe points hold every registered thread while an update runs, and a thread that does not
//! arrive in time makes the update fail, naming it and where it was. One test: the registry of
//! threads is process-wide.

use evolve_hot::safepoint::at_safe_point;
use evolve_hot::ErrorKind;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

fn snapshot(counters: &[Arc<AtomicU64>]) -> Vec<u64> {
    counters.iter().map(|c| c.load(Ordering::SeqCst)).collect()
}

#[test]
fn updates_run_with_every_registered_thread_held_and_time_out_naming_blockers() {
    let stop = Arc::new(AtomicBool::new(false));
    let threads = evolve_testkit::stress_threads();
    let counters: Vec<Arc<AtomicU64>> = (0..threads).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let workers: Vec<_> = counters
        .iter()
        .map(|c| {
            let (c, stop) = (c.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    c.fetch_add(1, Ordering::SeqCst);
                    evolve_hot::safe_point();
                }
            })
        })
        .collect();
    while snapshot(&counters).contains(&0) {
        std::thread::yield_now();
    }

    // 1. Held: while the update runs, no registered thread moves.
    for _ in 0..50 {
        let still = at_safe_point(Duration::from_secs(5), || {
            let before = snapshot(&counters);
            std::thread::sleep(Duration::from_millis(2));
            before == snapshot(&counters)
        })
        .unwrap();
        assert!(still, "a registered thread ran during the update");
    }
    // Released: every thread moves again (however long the scheduler takes to run them all).
    let after = snapshot(&counters);
    let moved = |now: Vec<u64>| now.iter().zip(&after).all(|(now, then)| now > then);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !moved(snapshot(&counters)) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(moved(snapshot(&counters)), "a thread stayed held");

    // 2. A thread that stays away from safe points: the update does not run, the error names it.
    let stuck = std::thread::Builder::new()
        .name("stuck-worker".into())
        .spawn(|| {
            evolve_hot::safe_point();
            std::thread::sleep(Duration::from_millis(1500));
        })
        .unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let ran = AtomicBool::new(false);
    let err = at_safe_point(Duration::from_millis(200), || {
        ran.store(true, Ordering::SeqCst)
    })
    .unwrap_err();
    assert!(
        !ran.load(Ordering::SeqCst),
        "the update ran without every thread held"
    );
    match err.kind() {
        ErrorKind::SafePointTimeout {
            blockers,
            waited_ms,
        } => {
            assert!(*waited_ms >= 200);
            assert_eq!(blockers.len(), 1, "{blockers:?}");
            assert!(blockers[0].contains("stuck-worker"), "{blockers:?}");
            assert!(blockers[0].contains("safe_points.rs:"), "{blockers:?}");
        }
        other => panic!("{other:?}"),
    }
    // The others were released and go on.
    // Released: every thread moves again (however long the scheduler takes to run them all).
    let after = snapshot(&counters);
    let moved = |now: Vec<u64>| now.iter().zip(&after).all(|(now, then)| now > then);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !moved(snapshot(&counters)) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(moved(snapshot(&counters)), "a thread stayed held");

    stuck.join().unwrap();
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
}
