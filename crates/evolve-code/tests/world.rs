//! Stopping the world: every other thread stays parked while the closure runs, however threads
//! come and go, and every thread runs again afterwards, whatever the closure does.

use evolve_code::world::{stop_the_world_within, World};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Sets the flag when dropped: scoped workers stop even when an assertion fails.
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Busy-waits `d` without allocating or taking a lock (the closure's rules).
fn spin_for(d: Duration) {
    let start = Instant::now();
    while start.elapsed() < d {
        std::hint::spin_loop();
    }
}

/// How long a stop may wait for every thread to park: generous, because with many more busy
/// threads than cores on a loaded machine each thread waits its turn for a CPU to take the
/// signal (this bounds the test; nothing is asserted about time).
const PATIENCE: Duration = Duration::from_secs(30);

fn stop_the_world<R>(f: impl FnOnce(&World<'_>) -> R) -> R {
    stop_the_world_within(PATIENCE, f).expect("the world stops")
}

/// Whether `counter` stays unchanged across a short wait inside a stop: no thread runs.
fn frozen_during_stop(counter: &AtomicU64) -> bool {
    stop_the_world(|_| {
        let before = counter.load(Ordering::SeqCst);
        spin_for(Duration::from_micros(300));
        before == counter.load(Ordering::SeqCst)
    })
}

/// Waits (bounded) until `counter` moves: some thread runs again.
fn moves(counter: &AtomicU64) -> bool {
    let before = counter.load(Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if counter.load(Ordering::SeqCst) != before {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    false
}

#[test]
fn a_thread_created_during_the_stop_does_not_run_free() {
    let counter = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let spawners = evolve_testkit::stress_threads().clamp(2, 8);
    let mut thawed = 0;
    let mut stops = 0;
    std::thread::scope(|s| {
        let _stop = SetOnDrop(&stop);
        for _ in 0..spawners {
            s.spawn(|| {
                // Short-lived threads that count from their first instruction: one created
                // after the stop listed the threads would count while the world is stopped.
                while !stop.load(Ordering::Relaxed) {
                    std::thread::scope(|inner| {
                        for _ in 0..4 {
                            inner.spawn(|| {
                                for _ in 0..20_000 {
                                    counter.fetch_add(1, Ordering::SeqCst);
                                }
                            });
                        }
                    });
                }
            });
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while stops < 300 && Instant::now() < deadline {
            if !frozen_during_stop(&counter) {
                thawed += 1;
            }
            stops += 1;
        }
        stop.store(true, Ordering::Relaxed);
    });
    assert!(stops >= 20, "only {stops} stops");
    assert_eq!(thawed, 0, "a thread ran during {thawed} of {stops} stops");
}

#[test]
fn a_closure_that_panics_leaves_no_thread_stopped() {
    // A detached worker: if it stayed stopped, the test fails instead of waiting for it.
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    static STOP: AtomicBool = AtomicBool::new(false);
    let worker = std::thread::spawn(|| {
        while !STOP.load(Ordering::Relaxed) {
            COUNTER.fetch_add(1, Ordering::SeqCst);
        }
    });
    assert!(moves(&COUNTER));
    let panicked = std::panic::catch_unwind(|| {
        stop_the_world(|_| -> () { panic!("the closure fails") });
    });
    assert!(panicked.is_err());
    // The worker runs again, and the next stop works.
    assert!(moves(&COUNTER), "the worker stayed stopped after the panic");
    assert!(frozen_during_stop(&COUNTER));
    assert!(moves(&COUNTER));
    STOP.store(true, Ordering::Relaxed);
    worker.join().unwrap();
}

#[test]
fn stops_under_oversubscription_freeze_every_thread_and_resume_them() {
    let threads = evolve_testkit::stress_threads();
    let counters: Vec<AtomicU64> = (0..threads).map(|_| AtomicU64::new(0)).collect();
    let stop = AtomicBool::new(false);
    let (mut stops, mut thawed) = (0, 0);
    std::thread::scope(|s| {
        let _stop = SetOnDrop(&stop);
        for (i, counter) in counters.iter().enumerate() {
            let stop = &stop;
            s.spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    counter.fetch_add(1, Ordering::SeqCst);
                    n += 1;
                    // A mix of what threads do: compute, sleep in the kernel, allocate.
                    match i % 3 {
                        0 => {}
                        1 if n.is_multiple_of(64) => std::thread::sleep(Duration::from_micros(50)),
                        _ if n.is_multiple_of(16) => drop(std::hint::black_box(vec![n; 32])),
                        _ => {}
                    }
                }
            });
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while stops < 500 && Instant::now() < deadline {
            let frozen = stop_the_world(|world| {
                let before: u64 = counters.iter().map(|c| c.load(Ordering::SeqCst)).sum();
                spin_for(Duration::from_micros(100));
                let after: u64 = counters.iter().map(|c| c.load(Ordering::SeqCst)).sum();
                (before == after, world.len())
            });
            if !frozen.0 {
                thawed += 1;
            }
            assert!(frozen.1 >= threads, "{} threads stopped", frozen.1);
            stops += 1;
        }
        for c in &counters {
            assert!(moves(c), "a thread stayed stopped");
        }
        stop.store(true, Ordering::Relaxed);
    });
    assert!(stops >= 10, "only {stops} stops in the time allowed");
    assert_eq!(thawed, 0, "threads ran during {thawed} of {stops} stops");
}

/// A thread whose handler has claimed its slot but is still copying its registers has not
/// parked: the stop waits for it, and the world the closure sees includes it. (It once counted
/// as parked and was left out of the world, its PC unchecked: an entry redirect was written
/// over the instruction a caller was about to resume at, about once in 13 runs of
/// `redirect_stress` under load. The injected delay holds every handler in that window.)
#[test]
fn a_thread_still_copying_its_registers_is_waited_for_and_in_the_world() {
    const WORKERS: usize = 4;
    let stop = AtomicBool::new(false);
    let tids: Vec<AtomicU64> = (0..WORKERS).map(|_| AtomicU64::new(0)).collect();
    std::thread::scope(|s| {
        let _stop = SetOnDrop(&stop);
        for tid in &tids {
            let stop = &stop;
            s.spawn(move || {
                let me = rustix::thread::gettid().as_raw_nonzero().get();
                tid.store(me as u64, Ordering::SeqCst);
                while !stop.load(Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            });
        }
        while tids.iter().any(|t| t.load(Ordering::SeqCst) == 0) {
            std::thread::yield_now();
        }
        evolve_code::fault_injection::delay_parking(Duration::from_millis(20));
        let missing = stop_the_world(|world| {
            tids.iter()
                .map(|t| t.load(Ordering::SeqCst) as i32)
                .filter(|&tid| !world.threads().any(|t| t.tid() == tid))
                .count()
        });
        evolve_code::fault_injection::delay_parking(Duration::ZERO);
        assert_eq!(missing, 0, "threads left out of the stopped world");
    });
}
