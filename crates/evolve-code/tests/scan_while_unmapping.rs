//! Reading the process's writable memory right after loading a patch (to learn the loader's
//! words) runs while other threads keep going: threads exiting unmap their stacks, large
//! allocations are unmapped when freed. The read must skip memory that disappears, not fault —
//! the kv server crashed this way when a patch was applied while redis-benchmark connected 50
//! clients (one thread each).
use evolve_code::scan::words_pointing_into;
use evolve_code::Hidden;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[test]
fn reading_memory_survives_concurrent_unmapping() {
    let stop = Arc::new(AtomicBool::new(false));
    let churners: Vec<_> = (0..3)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut rounds = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    // 4 MiB: above malloc's mmap threshold, so freeing it unmaps it.
                    let block = vec![rounds as u8 | 1; 4 << 20];
                    std::hint::black_box(&block);
                    drop(block);
                    // A thread that exits at once: its stack comes and goes.
                    std::thread::spawn(|| std::hint::black_box(1))
                        .join()
                        .unwrap();
                    rounds += 1;
                }
                rounds
            })
        })
        .collect();
    // A target some words really point into: a heap block referenced from this frame.
    let target = Box::new([0u64; 16]);
    let start = target.as_ptr() as usize;
    let range = [(Hidden::new(start), Hidden::new(start + 128))];
    let holder = Box::new(start);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut scans = 0;
    while Instant::now() < deadline {
        let words = words_pointing_into(&range, &[]).expect("the read succeeds");
        assert!(
            words
                .iter()
                .any(|(at, _)| *at == &*holder as *const usize as usize),
            "the heap word pointing into the target is found"
        );
        scans += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let rounds: u64 = churners.into_iter().map(|c| c.join().unwrap()).sum();
    assert!(
        scans > 10 && rounds > 100,
        "{scans} scans, {rounds} unmap rounds"
    );
}
