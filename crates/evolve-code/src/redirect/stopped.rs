//! The one place redirects stop the world ([`crate::world`]).
//!
//! Redirects ask one question of a stopped world: can a thread resume inside these bytes? Today
//! the world gives each stopped thread's interrupted PC; return addresses never point into the
//! bytes a redirect replaces (the entry check refuses a `call` there, see
//! [`crate::overwrite`]). When the world reports every resumable context of a thread (return
//! addresses, PCs saved in signal frames), [`Stopped::resumable_in`] asks it that instead, and
//! nothing else in the redirects changes.

use crate::error::Result;
use crate::world::stop_the_world_threads;
use std::ops::Range;
use std::time::{Duration, Instant};

/// A stopped thread that can resume inside a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Busy {
    pub tid: i32,
    pub pc: usize,
}

/// The other threads, stopped.
pub(super) struct Stopped<'a> {
    tids: &'a [i32],
    pcs: &'a [usize],
}

impl Stopped<'_> {
    /// A thread that can resume inside `range`, if any. Allocation-free.
    pub fn resumable_in(&self, range: Range<usize>) -> Option<Busy> {
        self.pcs
            .iter()
            .zip(self.tids)
            .find(|(pc, _)| range.contains(pc))
            .map(|(&pc, &tid)| Busy { tid, pc })
    }
}

/// Stops every other thread, runs `f` (which must not allocate nor take a lock another thread
/// may hold), resumes them. Returns what `f` returned and how long the call took, from before
/// the first thread was signalled to after the last was told to resume: an upper bound of the
/// pause any thread saw.
pub(super) fn with_world_stopped<R>(f: impl FnOnce(&Stopped<'_>) -> R) -> Result<(R, Duration)> {
    let started = Instant::now();
    let result = stop_the_world_threads(|tids, pcs| f(&Stopped { tids, pcs }))?;
    Ok((result, started.elapsed()))
}
