//! Safe points: places in long-running loops where a thread may be held while an update that
//! must be seen as one step happens.
//!
//! # Protocol
//!
//! A thread joins the registry the first time it calls [`safe_point`] and leaves it when it
//! exits. An updater that needs a group of changes to take effect at once for every registered
//! thread (an `--atomic` patch, a state transfer) calls [`at_safe_point`]:
//!
//! 1. it raises the request flag (`SeqCst`);
//! 2. each registered thread, at its next safe point, sees the flag, marks itself parked and
//!    waits for the flag to drop;
//! 3. when every registered thread (other than the updater) is parked, the update runs; no
//!    registered thread runs any code meanwhile;
//! 4. the flag drops and the threads go on.
//!
//! Waiting is bounded: if some thread does not arrive in time, the flag drops, nothing is
//! changed, and the error lists each thread that did not arrive with the place of the last safe
//! point it passed and how long ago. The fast path of [`safe_point`] is a thread-local check and
//! one atomic load.

use crate::error::{Error, ErrorKind, Result};
use std::cell::RefCell;
use std::panic::Location;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

static REQUESTED: AtomicBool = AtomicBool::new(false);
static THREADS: Mutex<Vec<Arc<Registered>>> = Mutex::new(Vec::new());
/// Wakes parked threads when a request ends.
static RESUME: (Mutex<u64>, Condvar) = (Mutex::new(0), Condvar::new());
/// One updater at a time.
static UPDATER: Mutex<()> = Mutex::new(());

struct Registered {
    name: String,
    parked: AtomicBool,
    last_location: Mutex<Option<&'static Location<'static>>>,
    /// Milliseconds since `epoch()` when it last passed a safe point.
    last_seen_ms: AtomicU64,
}

fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64
}

impl Registered {
    /// Where the thread last passed a safe point (`file:line:column`), if it has.
    fn last_place(&self) -> Option<String> {
        self.last_location
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map(|l| l.to_string())
    }
}

/// Removes the thread from the registry when it exits.
struct Membership(Arc<Registered>);

impl Drop for Membership {
    fn drop(&mut self) {
        let mut threads = THREADS.lock().unwrap_or_else(|p| p.into_inner());
        threads.retain(|t| !Arc::ptr_eq(t, &self.0));
    }
}

thread_local! {
    static MEMBERSHIP: RefCell<Option<Membership>> = const { RefCell::new(None) };
}

fn register() -> Arc<Registered> {
    MEMBERSHIP.with(|m| {
        let mut m = m.borrow_mut();
        if let Some(existing) = &*m {
            return existing.0.clone();
        }
        let current = std::thread::current();
        let record = Arc::new(Registered {
            name: current
                .name()
                .map_or_else(|| format!("{:?}", current.id()), str::to_string),
            parked: AtomicBool::new(false),
            last_location: Mutex::new(None),
            last_seen_ms: AtomicU64::new(now_ms()),
        });
        THREADS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(record.clone());
        *m = Some(Membership(record.clone()));
        record
    })
}

/// Marks a place where this thread may be held for an update. Call it in event loops and
/// long-running loops; it costs a thread-local check and one atomic load when no update waits.
///
/// # Example
///
/// ```
/// for _ in 0..3 {
///     // ... one unit of work ...
///     evolve_hot::safe_point();
/// }
/// assert!(!evolve_hot::safepoint::registered_threads().is_empty());
/// ```
#[track_caller]
#[inline]
pub fn safe_point() {
    let registered = MEMBERSHIP.with(|m| m.borrow().is_some());
    if !registered || REQUESTED.load(Ordering::SeqCst) {
        held(Location::caller());
    }
}

#[cold]
fn held(location: &'static Location<'static>) {
    let me = register();
    *me.last_location.lock().unwrap_or_else(|p| p.into_inner()) = Some(location);
    me.last_seen_ms.store(now_ms(), Ordering::Relaxed);
    if !REQUESTED.load(Ordering::SeqCst) {
        return;
    }
    let (lock, resume) = &RESUME;
    let mut generation = lock.lock().unwrap_or_else(|p| p.into_inner());
    me.parked.store(true, Ordering::SeqCst);
    while REQUESTED.load(Ordering::SeqCst) {
        generation = resume
            .wait_timeout(generation, Duration::from_millis(50))
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
    me.parked.store(false, Ordering::SeqCst);
}

fn release() {
    REQUESTED.store(false, Ordering::SeqCst);
    let (lock, resume) = &RESUME;
    *lock.lock().unwrap_or_else(|p| p.into_inner()) += 1;
    resume.notify_all();
}

/// Runs `update` while every registered thread (but the caller) is held at a safe point.
///
/// If some thread does not reach a safe point within `timeout`, `update` does not run and the
/// error names the threads that did not arrive and where they were last seen.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// let value = evolve_hot::safepoint::at_safe_point(Duration::from_millis(100), || 42).unwrap();
/// assert_eq!(value, 42);
/// ```
pub fn at_safe_point<T>(timeout: Duration, update: impl FnOnce() -> T) -> Result<T> {
    let _one_at_a_time = UPDATER.lock().unwrap_or_else(|p| p.into_inner());
    let me = MEMBERSHIP.with(|m| m.borrow().as_ref().map(|m| m.0.clone()));
    REQUESTED.store(true, Ordering::SeqCst);
    let start = Instant::now();
    loop {
        let missing: Vec<Arc<Registered>> = THREADS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|t| !t.parked.load(Ordering::SeqCst))
            .filter(|t| me.as_ref().is_none_or(|me| !Arc::ptr_eq(me, t)))
            .cloned()
            .collect();
        if missing.is_empty() {
            break;
        }
        if start.elapsed() >= timeout {
            release();
            let now = now_ms();
            let blockers = missing
                .iter()
                .map(|t| {
                    let place = t.last_place().unwrap_or_else(|| "no safe point yet".into());
                    let ago = now.saturating_sub(t.last_seen_ms.load(Ordering::Relaxed));
                    format!("thread {} (last safe point {place}, {ago} ms ago)", t.name)
                })
                .collect();
            return Err(Error::new(ErrorKind::SafePointTimeout {
                waited_ms: start.elapsed().as_millis() as u64,
                blockers,
            }));
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let result = update();
    release();
    Ok(result)
}

/// The registered threads, with where each last passed a safe point.
pub fn registered_threads() -> Vec<String> {
    THREADS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|t| format!("{} at {}", t.name, t.last_place().unwrap_or_default()))
        .collect()
}
