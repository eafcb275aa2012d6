//! Hot functions of C programs: functions prepared with compiler-reserved entry padding
//! (`EVOLVE_HOT` of `evolve.h`), redirected to a new implementation while threads call them.
//!
//! PSU's use case without PSU's indirection: until it is redirected, a prepared C function
//! costs two one-byte NOPs per call (no stub); redirected, its direct callers call the new
//! implementation directly and calls through pointers take two extra jumps
//! ([`evolve_code::padded`]). A call already running finishes on the code it started with.
//!
//! `evolve.h`'s library registers every `EVOLVE_HOT` function it finds in the program's sections
//! ([`register`]); [`redirect`] changes any number of them in one engine batch, optionally while
//! every thread that calls [`crate::safe_point`] is held at one (a group of functions that must
//! switch together).

use crate::error::Result;
use evolve_code::{BatchReport, EntryBatch, ForeignCode, PaddedFunction};
use std::sync::{Mutex, RwLock};
use std::time::Duration;

static FUNCTIONS: RwLock<Vec<&'static PaddedHot>> = RwLock::new(Vec::new());
/// Serialises redirections: each plans from the state the previous one left.
static REDIRECT: Mutex<()> = Mutex::new(());

/// A prepared C hot function.
#[derive(Debug)]
pub struct PaddedHot {
    name: &'static str,
    location: &'static str,
    function: PaddedFunction,
}

impl PaddedHot {
    /// Its name in the program.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Where it is defined (`file:line`).
    pub fn location(&self) -> &'static str {
        self.location
    }

    /// Its entry (the address its callers call).
    pub fn entry(&self) -> usize {
        self.function.entry()
    }

    /// Its signature identity (what [`ForeignCode`] targets must carry).
    pub fn signature(&self) -> u64 {
        self.function.signature()
    }

    /// Where it is redirected to, if it is.
    pub fn target(&self) -> Option<usize> {
        self.function.target()
    }

    /// The number of its direct call sites found in the executable, once prepared (at its first
    /// redirection).
    pub fn call_sites(&self) -> Option<usize> {
        self.function.call_sites()
    }
}

/// Registers the hot function `name` defined at `location`, prepared as `function`, unless it
/// is registered already (by entry). Returns it.
pub fn register(name: &str, location: &str, function: PaddedFunction) -> &'static PaddedHot {
    let mut functions = FUNCTIONS.write().unwrap_or_else(|p| p.into_inner());
    if let Some(known) = functions.iter().find(|f| f.entry() == function.entry()) {
        return known;
    }
    let hot: &'static PaddedHot = Box::leak(Box::new(PaddedHot {
        name: Box::leak(name.to_owned().into_boxed_str()),
        location: Box::leak(location.to_owned().into_boxed_str()),
        function,
    }));
    functions.push(hot);
    hot
}

/// The registered hot function whose entry is `entry`.
pub fn find(entry: usize) -> Option<&'static PaddedHot> {
    functions().into_iter().find(|f| f.entry() == entry)
}

/// Every registered C hot function, in registration order.
pub fn functions() -> Vec<&'static PaddedHot> {
    FUNCTIONS.read().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Redirects each function to its new code (`Some`), or restores it (`None`), all in one engine
/// batch: every call started afterwards runs the new code; a call already running finishes on
/// the old.
///
/// With `at_safe_point`, the batch is written while every thread registered at safe points is
/// held at one, so that no such thread sees some of the functions changed and others not; if
/// they do not all arrive within the timeout nothing changes.
///
/// # Errors
/// [`crate::ErrorKind::Engine`] naming the cause (code of another signature identity, a target that
/// is not code, a function twice), [`crate::ErrorKind::SafePointTimeout`]; nothing changed.
pub fn redirect(
    changes: &[(&PaddedHot, Option<ForeignCode>)],
    at_safe_point: Option<Duration>,
) -> Result<BatchReport> {
    let _one_at_a_time = REDIRECT.lock().unwrap_or_else(|p| p.into_inner());
    let mut edits = EntryBatch::new();
    for (function, to) in changes {
        match to {
            Some(code) => function.function.redirect_in(&mut edits, *code)?,
            None => function.function.restore_in(&mut edits),
        }
    }
    let report = match at_safe_point {
        None => edits.apply()?,
        Some(timeout) => crate::safepoint::at_safe_point(timeout, || edits.apply())??,
    };
    Ok(report)
}
