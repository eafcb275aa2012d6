//! Commit and revert: binding multiversed functions to their switches' current values.
//!
//! # Semantics
//!
//! Until a function is committed it runs its generic body, which reads the switches at every
//! call. [`commit`] reads each switch once, picks for each function the variant compiled for
//! those values, and rewires the live code to it: the function's entry stub jumps to the variant
//! (calls through pointers) and every direct call site in the executable calls the variant (or
//! becomes a NOP if the variant is empty). From then on the function behaves as its variant,
//! **even if a switch changes**: the binding changes only at the next commit (as in the
//! multiverse paper). A switch whose current value has no variant makes the function run its
//! generic code, and is reported in [`CommitReport::unmatched`]. [`revert`] restores every byte
//! it changed.
//!
//! Function-pointer switches take part in the same operations, as if they were functions that
//! read themselves: commit binds their calls to their current function, revert makes them
//! indirect again (see [`crate::FnSwitch`]).
//!
//! # Threads
//!
//! Commits and reverts are serialised by one lock, and all the sites of one operation are
//! written in one engine [`EntryBatch`], which is safe while other threads execute them: every call
//! runs either the old binding or the new one, never a torn instruction. Sites switch one at a
//! time, so during a commit a thread may run the old binding through one call site and the new
//! one through another.

use crate::registry::{Function, Plan, FUNCTIONS};
use crate::switch::AnySwitch;
use crate::Error;
use evolve_code::{BatchReport, EntryBatch, FnPtr};
use std::sync::Mutex;

static COMMIT: Mutex<()> = Mutex::new(());

/// What a commit or revert did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommitReport {
    /// The functions whose installed code changed, in registry order.
    pub changed: Vec<&'static str>,
    /// Switches whose current value has no variant: those functions run their generic code.
    pub unmatched: Vec<Unmatched>,
    /// What the engine wrote.
    pub batch: BatchReport,
}

/// A switch value without a variant in a function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unmatched {
    /// The function.
    pub function: &'static str,
    /// The switch.
    pub switch: &'static str,
    /// Its value, in raw form (`value as u64`).
    pub value: u64,
}

/// Every multiversed function: the macros' (link-time) and those registered at run time
/// ([`crate::foreign`]).
fn all_functions() -> impl Iterator<Item = &'static dyn Function> {
    FUNCTIONS.iter().copied().chain(crate::foreign::functions())
}

fn run(select: impl Fn(&dyn Function) -> bool, commit: bool) -> Result<CommitReport, Error> {
    let _guard = COMMIT.lock().unwrap_or_else(|p| p.into_inner());
    let mut report = CommitReport::default();
    let mut batch = EntryBatch::new();
    let mut plans = Vec::new();
    for function in all_functions().filter(|f| select(*f)) {
        let plan = if commit {
            function.plan_commit(&mut batch, &mut report)?
        } else {
            function.plan_revert(&mut batch)?
        };
        if plan != Plan::Unchanged {
            plans.push((function, plan));
        }
    }
    if !batch.is_empty() {
        report.batch = batch.apply().map_err(|e| Error::code("commit", e))?;
    }
    for (function, plan) in plans {
        function.finish(plan);
        report.changed.push(function.name());
    }
    Ok(report)
}

/// Binds every multiversed function to the current values of its switches, and the calls of
/// every function-pointer switch to its current function.
///
/// # Example
///
/// ```
/// #[evolve::switch]
/// static FAST: bool = false;
///
/// #[evolve::multiverse(FAST)]
/// fn speed() -> u32 {
///     if FAST.get() { 2 } else { 1 }
/// }
///
/// FAST.set(true);
/// let report = evolve::multiverse::commit().unwrap();
/// assert!(report.changed.contains(&"speed"));
/// FAST.set(false); // no effect until the next commit
/// assert_eq!(speed(), 2);
/// evolve::multiverse::revert().unwrap();
/// assert_eq!(speed(), 1);
/// ```
pub fn commit() -> Result<CommitReport, Error> {
    run(|_| true, true)
}

/// Restores the generic code of every multiversed function and the indirect calls of every
/// function-pointer switch.
///
/// # Example
///
/// ```
/// #[evolve::switch]
/// static ROUND: fn(f64) -> f64 = f64::floor;
///
/// evolve::multiverse::commit().unwrap();
/// assert!(ROUND.is_committed());
/// assert!(evolve::multiverse::revert().unwrap().changed.contains(&"ROUND"));
/// assert!(!ROUND.is_committed());
/// ```
pub fn revert() -> Result<CommitReport, Error> {
    run(|_| true, false)
}

/// Commits only the functions that read `switch` (for a function-pointer switch: its call
/// sites).
///
/// # Example
///
/// ```
/// #[evolve::switch]
/// static FAST: bool = false;
/// #[evolve::multiverse(FAST)]
/// fn speed() -> u32 {
///     if FAST.get() { 2 } else { 1 }
/// }
///
/// #[evolve::switch]
/// static ROUND: fn(f64) -> f64 = f64::floor;
///
/// FAST.set(true);
/// ROUND.set(f64::ceil);
/// assert_eq!(evolve::multiverse::commit_refs(&FAST).unwrap().changed, ["speed"]);
/// assert_eq!(evolve::multiverse::commit_refs(&ROUND).unwrap().changed, ["ROUND"]);
/// assert_eq!((speed(), ROUND.call(1.5)), (2, 2.0));
/// evolve::multiverse::revert_refs(&FAST).unwrap();
/// evolve::multiverse::revert_refs(&ROUND).unwrap();
/// ```
pub fn commit_refs<S: AnySwitch + ?Sized>(switch: &'static S) -> Result<CommitReport, Error> {
    let id = switch.id();
    run(|f| f.uses(id), true)
}

/// Reverts only the functions that read `switch` (for a function-pointer switch: its call
/// sites).
///
/// # Example
///
/// ```
/// #[evolve::switch]
/// static ROUND: fn(f64) -> f64 = f64::floor;
///
/// evolve::multiverse::commit_refs(&ROUND).unwrap();
/// ROUND.set(f64::ceil); // committed calls keep `floor`
/// assert_eq!(ROUND.call(1.5), 1.0);
/// assert_eq!(evolve::multiverse::revert_refs(&ROUND).unwrap().changed, ["ROUND"]);
/// assert_eq!(ROUND.call(1.5), 2.0); // the indirect path follows the value again
/// ```
pub fn revert_refs<S: AnySwitch + ?Sized>(switch: &'static S) -> Result<CommitReport, Error> {
    let id = switch.id();
    run(|f| f.uses(id), false)
}

fn find(address: usize) -> Result<&'static dyn Function, Error> {
    all_functions()
        .find(|f| f.entry() == address)
        .ok_or(Error::NotMultiversed { address })
}

/// Commits only the functions that read the switch `switch` (any [`AnySwitch`], e.g. one found
/// by name with [`crate::switch_named`]).
pub fn commit_refs_dyn(switch: &dyn AnySwitch) -> Result<CommitReport, Error> {
    let id = switch.id();
    run(|f| f.uses(id), true)
}

/// Reverts only the functions that read `switch`.
pub fn revert_refs_dyn(switch: &dyn AnySwitch) -> Result<CommitReport, Error> {
    let id = switch.id();
    run(|f| f.uses(id), false)
}

/// Commits one function (`f` as named in the program: its entry).
///
/// # Errors
/// [`Error::NotMultiversed`] if `f` is not a `#[evolve::multiverse]` function.
pub fn commit_fn<F: FnPtr>(f: F) -> Result<CommitReport, Error> {
    commit_fn_at(f.address())
}

/// Reverts one function.
///
/// # Errors
/// [`Error::NotMultiversed`] if `f` is not a `#[evolve::multiverse]` function.
pub fn revert_fn<F: FnPtr>(f: F) -> Result<CommitReport, Error> {
    revert_fn_at(f.address())
}

/// Commits the multiversed function whose entry is `address` (a C function's address).
///
/// # Errors
/// [`Error::NotMultiversed`] if no multiversed function starts there.
pub fn commit_fn_at(address: usize) -> Result<CommitReport, Error> {
    let entry = find(address)?.entry();
    run(|g| g.entry() == entry, true)
}

/// Reverts the multiversed function whose entry is `address`.
///
/// # Errors
/// [`Error::NotMultiversed`] if no multiversed function starts there.
pub fn revert_fn_at(address: usize) -> Result<CommitReport, Error> {
    let entry = find(address)?.entry();
    run(|g| g.entry() == entry, false)
}

/// Whether `f` runs a variant (it was committed and its switches had a variant); `false` for a
/// function that is not multiversed. For a function-pointer switch pass its `entry()`, or ask
/// `SWITCH.is_committed()`.
pub fn is_committed<F: FnPtr>(f: F) -> bool {
    is_committed_at(f.address()).unwrap_or(false)
}

/// Whether the multiversed function whose entry is `address` runs a variant.
///
/// # Errors
/// [`Error::NotMultiversed`] if no multiversed function starts there.
pub fn is_committed_at(address: usize) -> Result<bool, Error> {
    find(address).map(|g| g.is_committed())
}

/// The names of every multiversed function and function-pointer switch of the program.
pub fn functions() -> Vec<&'static str> {
    all_functions().map(|f| f.name()).collect()
}

/// A multiversed function and what it runs now, for status displays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionState {
    /// Its name.
    pub name: &'static str,
    /// Whether a variant (not the generic code) is installed.
    pub committed: bool,
}

/// Every multiversed function of the program with whether it is committed.
pub fn function_states() -> Vec<FunctionState> {
    all_functions()
        .map(|f| FunctionState {
            name: f.name(),
            committed: f.is_committed(),
        })
        .collect()
}
