//! Reclamation: unloading old patches once nothing can reach them.
//!
//! A patch is a **candidate** when no function needs it: it was reverted, or every function it
//! changed has moved on by at least two versions (the current version and the one before it are
//! kept, so a revert is always possible). For each candidate, Evolve forgets the versions and
//! stubs it recorded for it, then asks the engine to unload it, which succeeds only if nothing
//! refers to it ([`evolve_code::dylib::PatchObject::unload`]):
//!
//! | policy | what must not point into the patch |
//! |---|---|
//! | [`Policy::Scan`] (default) | patch sites, every thread's PC, registers and stack, and every word of private writable memory |
//! | [`Policy::Stacks`] | patch sites, every thread's PC, registers and stack (PSU's check: escaped pointers in the heap are not seen) |
//! | [`Policy::Never`] | patches are never unloaded |
//!
//! The scan stops every thread of the process for its duration (the report gives the longest
//! pause). The engine runs it on a thread of its own, so the caller's stack (which may hold
//! pointers into a patch) is scanned like any other, except the frames of this module and below
//! ([`evolve_code::scan::engine_frames`]); code in execution is found exactly by walking every
//! thread's stack with the unwind tables ([`evolve_code::scan`] says what counts, and why).
//! Evolve's own bookkeeping keeps patch addresses hidden ([`evolve_code::Hidden`]), so only the
//! program's references count. An unloaded patch's range stays reserved `PROT_NONE`: a pointer
//! that escaped the scan faults at once, with a diagnostic naming the patch.

use crate::error::{Error, ErrorKind, Result};
use crate::patch::with_state;
use evolve_code::dylib::Unload;
use evolve_code::scan::Scope;
use std::time::Duration;

/// Which references keep a patch loaded (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    /// Registers, stacks and all writable memory are scanned.
    #[default]
    Scan,
    /// Registers and stacks only.
    Stacks,
    /// Never unload.
    Never,
}

impl std::str::FromStr for Policy {
    type Err = Error;
    fn from_str(s: &str) -> Result<Policy> {
        match s {
            "scan" => Ok(Policy::Scan),
            "stacks" => Ok(Policy::Stacks),
            "never" => Ok(Policy::Never),
            other => Err(Error::new(ErrorKind::Build {
                step: "reclamation policy".into(),
                detail: format!("{other:?} is not a policy: scan, stacks or never"),
            })),
        }
    }
}

/// What one collection did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReclaimReport {
    /// Patches unloaded now.
    pub unloaded: Vec<String>,
    /// Candidates kept because something still refers to them, with where.
    pub kept: Vec<(String, Vec<String>)>,
    /// Patches still loaded after the collection.
    pub resident: usize,
    /// The longest time the process's threads were stopped, in microseconds.
    pub max_pause_us: u64,
    /// Bytes of memory scanned in all.
    pub bytes_scanned: usize,
}

/// Unloads every candidate that nothing refers to (see the module docs).
///
/// # Example
///
/// ```
/// // With no patches applied there is nothing to unload.
/// let report = evolve_hot::reclaim::collect(evolve_hot::reclaim::Policy::Scan).unwrap();
/// assert!(report.unloaded.is_empty());
/// ```
pub fn collect(policy: Policy) -> Result<ReclaimReport> {
    let scope = match policy {
        Policy::Never => return with_state(|state| Ok(state.resident_report())),
        Policy::Scan => Scope::Memory,
        Policy::Stacks => Scope::Stacks,
    };
    // From here down, frames hold the engine's work on the candidates (their addresses,
    // revealed for a moment): the scan does not read them as the program's references.
    let _engine = evolve_code::scan::engine_frames();
    with_state(|state| state.collect(scope))
}

/// Collects every `interval` in the background, for the life of the process.
pub fn start_background(policy: Policy, interval: Duration) {
    std::thread::Builder::new()
        .name("evolve-reclaim-timer".into())
        .spawn(move || loop {
            std::thread::sleep(interval);
            let _ = collect(policy);
        })
        .ok();
}

/// How long to wait for every thread to stop for a scan.
pub(crate) const STOP_TIMEOUT: Duration = Duration::from_secs(2);

pub(crate) fn unload(
    object: &mut crate::patch::Object,
    scope: Scope,
    name: &str,
) -> Result<Unload> {
    Ok(object.unload(scope, STOP_TIMEOUT, name)?)
}
