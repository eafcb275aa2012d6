//! A C module's declarations, registered with the capabilities, and the operations of the C API
//! over them.
//!
//! A module (the executable, or a shared library built with `evolve.h`) registers at its first
//! call into the library: its switches with multiverse, its hot functions with hot update, its
//! multiversed functions with multiverse (checked against the switches). Registering reads
//! declarations only; no code changes until a function is first redirected or committed.

use evolve_code::{ForeignVariable, PaddedFunction};
use evolve_hot::padded::PaddedHot;
use evolve_multiverse::ForeignVariant;
use std::ffi::c_int;
use std::sync::Mutex;
use std::time::Duration;

/// A hot function as `EVOLVE_HOT` declared it.
pub(crate) struct HotDecl {
    pub name: String,
    pub location: String,
    pub function: PaddedFunction,
}

/// A switch as `EVOLVE_SWITCH` declared it.
pub(crate) struct SwitchDecl {
    pub name: String,
    pub variable: ForeignVariable,
    pub domain: Vec<u64>,
}

/// A multiversed function as `EVOLVE_MULTIVERSE` declared it.
pub(crate) struct MultiverseDecl {
    pub name: String,
    pub location: String,
    pub function: PaddedFunction,
    /// The switches' variable addresses.
    pub switches: Vec<usize>,
    pub variants: Vec<ForeignVariant>,
}

/// Everything one module declares.
#[derive(Default)]
pub(crate) struct Declarations {
    pub hot: Vec<HotDecl>,
    pub switches: Vec<SwitchDecl>,
    pub multiverse: Vec<MultiverseDecl>,
}

/// The modules registered so far, by descriptor address.
static REGISTERED: Mutex<Vec<usize>> = Mutex::new(Vec::new());

pub(crate) fn is_registered(module: usize) -> bool {
    REGISTERED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .contains(&module)
}

/// Registers a module's declarations (idempotent: each registration is keyed by address).
pub(crate) fn register(module: usize, declarations: Declarations) -> Result<(), String> {
    let mut registered = REGISTERED.lock().unwrap_or_else(|p| p.into_inner());
    if registered.contains(&module) {
        return Ok(());
    }
    for s in declarations.switches {
        evolve_multiverse::register_switch(&s.name, s.variable, s.domain)
            .map_err(|e| e.to_string())?;
    }
    for h in declarations.hot {
        evolve_hot::padded::register(&h.name, &h.location, h.function);
    }
    for m in declarations.multiverse {
        evolve_multiverse::register_function(&m.name, m.function, &m.switches, m.variants)
            .map_err(|e| format!("{e} (declared at {})", m.location))?;
    }
    registered.push(module);
    Ok(())
}

/// `address` as a person reads it: the function or variable there, if the executable names it.
fn describe(address: usize) -> String {
    let name = evolve_code::inspect::executable().ok().and_then(|exe| {
        exe.symbols()
            .iter()
            .find(|s| s.address == address && !s.demangled.is_empty())
            .map(|s| s.demangled.clone())
    });
    match name {
        Some(name) => format!("`{name}` ({address:#x})"),
        None => format!("{address:#x}"),
    }
}

/// The registered hot function at `address`.
pub(crate) fn hot(address: usize) -> Result<&'static PaddedHot, String> {
    evolve_hot::padded::find(address).ok_or_else(|| {
        format!(
            "{} is not a hot function: declare it with EVOLVE_HOT (in a module that has called \
             into Evolve); nothing was changed",
            describe(address)
        )
    })
}

/// Redirects or restores hot functions (see [`evolve_hot::padded::redirect`]).
pub(crate) fn redirect(
    changes: &[(&'static PaddedHot, Option<evolve_code::ForeignCode>)],
    at_safe_point: Option<Duration>,
) -> Result<c_int, String> {
    evolve_hot::padded::redirect(changes, at_safe_point)
        .map(|_| 0)
        .map_err(|e| {
            let names: Vec<&str> = changes.iter().map(|(h, _)| h.name()).collect();
            format!("{}: {e}", names.join(", "))
        })
}

/// What a multiverse operation applies to.
pub(crate) enum Scope {
    /// Every multiversed function.
    All,
    /// The functions specialised on the switch whose variable is at this address.
    Switch(usize),
    /// The multiversed function at this address.
    Function(usize),
}

/// Commits (or reverts) `scope`; returns the number of functions whose code changed and
/// records the report for `evolve_last_report`.
pub(crate) fn commit(scope: Scope, commit: bool) -> Result<c_int, String> {
    use evolve_multiverse as mv;
    let report = match scope {
        Scope::All if commit => mv::commit(),
        Scope::All => mv::revert(),
        Scope::Switch(address) => {
            let switch = mv::switch_with_id(address).ok_or_else(|| {
                format!(
                    "{} is not a switch: declare it with EVOLVE_SWITCH (in a module that has \
                     called into Evolve); nothing was changed",
                    describe(address)
                )
            })?;
            if commit {
                mv::commit_refs_dyn(switch)
            } else {
                mv::revert_refs_dyn(switch)
            }
        }
        Scope::Function(address) if commit => mv::commit_fn_at(address),
        Scope::Function(address) => mv::revert_fn_at(address),
    }
    .map_err(|e| match e {
        mv::Error::NotMultiversed { address } => format!(
            "{} is not a multiversed function: declare it with EVOLVE_MULTIVERSE; nothing was \
             changed",
            describe(address)
        ),
        other => other.to_string(),
    })?;
    let unmatched: Vec<String> = report
        .unmatched
        .iter()
        .map(|u| format!("{}: {}={}", u.function, u.switch, u.value as i64))
        .collect();
    crate::state::set_report(&format!(
        "changed: [{}]; unmatched: [{}]",
        report.changed.join(", "),
        unmatched.join(", ")
    ));
    Ok(report.changed.len() as c_int)
}

/// 1 if the multiversed function at `address` runs a variant, 0 if its generic code.
pub(crate) fn is_committed(address: usize) -> Result<c_int, String> {
    evolve_multiverse::is_committed_at(address)
        .map(c_int::from)
        .map_err(|_| {
            format!(
                "{} is not a multiversed function: declare it with EVOLVE_MULTIVERSE",
                describe(address)
            )
        })
}
