//! The stop signal is a real-time signal a program may use too: the program's handler still gets
//! the program's signals, installed before or after the engine's, and the engine's stops keep
//! working when the program replaces its handler. One test in its own binary: signal
//! dispositions are process-wide.
#![allow(unsafe_code)]

mod common;

use common::signals::{
    first_handler, install, second_handler, FIRST_HANDLER_HITS, SECOND_HANDLER_HITS,
};
use evolve_code::{stop_signal, stop_the_world};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Sets the flag when dropped: scoped workers stop even when an assertion fails.
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn wait_for(counter: &AtomicU64, value: u64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if counter.load(Ordering::SeqCst) >= value {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    false
}

#[test]
fn a_program_handler_on_the_stop_signal_gets_its_signals_and_stops_still_work() {
    let stop = AtomicBool::new(false);
    let spins = AtomicU64::new(0);
    let thread = &AtomicU64::new(0);
    std::thread::scope(|s| {
        let _stop = SetOnDrop(&stop);
        s.spawn(|| {
            // SAFETY: pthread_self has no preconditions.
            thread.store(unsafe { libc::pthread_self() } as u64, Ordering::SeqCst);
            while !stop.load(Ordering::Relaxed) {
                spins.fetch_add(1, Ordering::Relaxed);
                std::hint::spin_loop();
            }
        });
        assert!(wait_for(thread, 1));
        let signal = || {
            let thread = thread.load(Ordering::SeqCst) as libc::pthread_t;
            // SAFETY: the worker is alive until `stop` is set; the signal has a handler.
            assert_eq!(unsafe { libc::pthread_kill(thread, stop_signal()) }, 0);
        };

        // Installed before the engine's: the engine's handler passes the program's signals on.
        install(
            stop_signal(),
            first_handler as *const () as libc::sighandler_t,
            true,
        );
        for _ in 0..20 {
            assert!(stop_the_world(|w| w.len()).unwrap() >= 1);
        }
        signal();
        assert!(
            wait_for(&FIRST_HANDLER_HITS, 1),
            "the program's handler never ran"
        );

        // Installed after: the next stop puts the engine's handler back in front, chaining.
        install(
            stop_signal(),
            second_handler as *const () as libc::sighandler_t,
            false,
        );
        for _ in 0..20 {
            assert!(stop_the_world(|w| w.len()).unwrap() >= 1);
        }
        signal();
        assert!(
            wait_for(&SECOND_HANDLER_HITS, 1),
            "the new handler never ran"
        );
        assert_eq!(FIRST_HANDLER_HITS.load(Ordering::SeqCst), 1);
        stop.store(true, Ordering::Relaxed);
    });
    assert!(spins.load(Ordering::Relaxed) > 0);
}
