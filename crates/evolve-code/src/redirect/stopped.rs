//! The one place redirects stop the world ([`crate::sys::world`]).
//!
//! Redirects ask one question of a stopped world: can a thread resume inside these bytes? The
//! world answers with every context a thread can resume at — its interrupted PC, the PCs saved
//! in signal frames on its stack, its return addresses, and, past code the unwind tables do not
//! describe, every stack word ([`crate::world::World::resumable_in`]).

use crate::error::{ErrorKind, Result};
use crate::sys::world::{stop_the_world, World};
use std::ops::Range;
use std::time::{Duration, Instant};

/// A stopped thread that can resume inside a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Busy {
    pub tid: i32,
    pub pc: usize,
}

/// The other threads, stopped.
pub(super) struct Stopped<'a, 'w> {
    world: &'a World<'w>,
}

impl Stopped<'_, '_> {
    /// A thread that can resume inside `range`, if any. Allocation-free.
    pub fn resumable_in(&self, range: Range<usize>) -> Option<Busy> {
        self.world.resumable_in(range).map(|r| Busy {
            tid: r.tid,
            pc: r.pc,
        })
    }
}

/// Stops that time out (a thread did not park: on an overloaded machine it may not get a CPU
/// within the world's deadline) are tried this many times more before the error is returned.
const TIMEOUT_RETRIES: usize = 3;

/// Stops every other thread, runs `f` (which must not allocate nor take a lock another thread
/// may hold), resumes them. Returns what `f` returned and how long the stop took, from before
/// the first thread was signalled to after the last was told to resume: an upper bound of the
/// pause any thread saw. A stop that times out ran nothing and is tried again (up to
/// [`TIMEOUT_RETRIES`] times).
pub(super) fn with_world_stopped<R>(
    mut f: impl FnMut(&Stopped<'_, '_>) -> R,
) -> Result<(R, Duration)> {
    let mut retries = 0;
    loop {
        let started = Instant::now();
        match stop_the_world(|world| f(&Stopped { world })) {
            Ok(result) => return Ok((result, started.elapsed())),
            Err(e)
                if matches!(e.kind(), ErrorKind::ThreadsDidNotStop { .. })
                    && retries < TIMEOUT_RETRIES =>
            {
                retries += 1;
            }
            Err(e) => return Err(e),
        }
    }
}
