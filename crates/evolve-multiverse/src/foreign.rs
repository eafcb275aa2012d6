//! Switches and multiversed functions described at run time: C programs through `evolve.h`.
//!
//! A C program has no `#[evolve::switch]` or `#[evolve::multiverse]`. Its switches are C
//! variables (`EVOLVE_SWITCH`), and `EVOLVE_MULTIVERSE` compiles a function's body once
//! generically and once per listed value of its switches, each variant an ordinary C function
//! of the same prototype. `evolve.h`'s library reads those declarations from the program's
//! sections and registers them here ([`register_switch`], [`register_function`]); from then on
//! they are switches and multiversed functions like the Rust ones: [`crate::commit`],
//! [`crate::switches`], and the agent's `evolve switch` and `evolve commit` include them.
//!
//! # How a C function is bound
//!
//! The generic body is the function the program calls, compiled with entry padding
//! ([`evolve_code::padded`]). Committing it to a variant redirects it there: its gate jumps to
//! the variant (calls through pointers) and its direct call sites in the executable call the
//! variant (5-byte NOPs if the variant is an empty function). Reverting restores every byte.
//! A value combination with no variant (a value the function did not list) leaves the generic
//! body, which reads the switches at every call, and is reported in
//! [`crate::CommitReport::unmatched`], as for Rust functions.

use crate::commit::CommitReport;
use crate::registry::{Binding, Function, Plan};
use crate::switch::AnySwitch;
use crate::{Error, Unmatched, MAX_VARIANTS};
use evolve_code::{EntryBatch, ForeignCode, ForeignVariable, PaddedFunction};
use std::sync::{Mutex, RwLock};

static SWITCHES: RwLock<Vec<&'static ForeignSwitch>> = RwLock::new(Vec::new());
static FUNCTIONS: RwLock<Vec<&'static ForeignFunction>> = RwLock::new(Vec::new());

/// A switch that is a variable of the program (an `EVOLVE_SWITCH` of `evolve.h`).
#[derive(Debug)]
pub struct ForeignSwitch {
    name: &'static str,
    variable: ForeignVariable,
    domain: &'static [u64],
}

impl AnySwitch for ForeignSwitch {
    fn name(&self) -> &'static str {
        self.name
    }
    fn raw(&self) -> u64 {
        self.variable.load()
    }
    fn id(&self) -> usize {
        self.variable.address()
    }
    fn domain(&self) -> &'static [u64] {
        self.domain
    }
    fn set_raw(&self, raw: u64) {
        self.variable.store(raw);
    }
}

/// Registers the switch `name`, the variable `variable` whose values form `domain` (raw form),
/// unless it is registered already (by address). Returns it.
///
/// # Errors
/// [`Error::Declaration`] if the domain is empty, or the variable was registered before under
/// another name or domain.
///
/// # Example
///
/// ```
/// use evolve_code::ForeignVariable;
/// use evolve_multiverse::AnySwitch;
/// use std::sync::atomic::AtomicU8;
///
/// static FAST: AtomicU8 = AtomicU8::new(0); // a C `bool`
/// // SAFETY: a static byte, accessed atomically.
/// let variable = unsafe { ForeignVariable::new(FAST.as_ptr() as usize, 1, false) }.unwrap();
/// let switch = evolve_multiverse::register_switch("fast", variable, vec![0, 1]).unwrap();
/// switch.set_raw(1);
/// assert_eq!(evolve_multiverse::switch_named("fast").unwrap().raw(), 1);
/// ```
pub fn register_switch(
    name: &str,
    variable: ForeignVariable,
    domain: Vec<u64>,
) -> Result<&'static dyn AnySwitch, Error> {
    let mut domain: Vec<u64> = domain.into_iter().map(|v| variable.normalise(v)).collect();
    domain.dedup();
    let mut switches = SWITCHES.write().unwrap_or_else(|p| p.into_inner());
    if let Some(known) = switches.iter().find(|s| s.id() == variable.address()) {
        if known.name != name || known.domain != domain.as_slice() || known.variable != variable {
            return Err(Error::Declaration {
                name: name.into(),
                reason: format!(
                    "the variable at {:#x} is already the switch `{}` with domain {:?}",
                    variable.address(),
                    known.name,
                    known.domain
                ),
            });
        }
        return Ok(*known);
    }
    if domain.is_empty() {
        return Err(Error::Declaration {
            name: name.into(),
            reason: "a switch needs at least one value in its domain".into(),
        });
    }
    let switch: &'static ForeignSwitch = Box::leak(Box::new(ForeignSwitch {
        name: Box::leak(name.to_owned().into_boxed_str()),
        variable,
        domain: Box::leak(domain.into_boxed_slice()),
    }));
    switches.push(switch);
    Ok(switch)
}

/// The switches registered at run time.
pub(crate) fn switches() -> Vec<&'static dyn AnySwitch> {
    SWITCHES
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|s| *s as &'static dyn AnySwitch)
        .collect()
}

/// One variant of a C function: the switch values it was compiled for (raw form, in the order
/// of the function's switches) and its code.
#[derive(Debug, Clone)]
pub struct ForeignVariant {
    /// The values, one per switch.
    pub values: Vec<u64>,
    /// The variant's code, of the generic function's signature identity.
    pub code: ForeignCode,
}

/// A multiversed function whose generic body is a padded C function.
pub struct ForeignFunction {
    name: &'static str,
    generic: PaddedFunction,
    switches: Vec<&'static dyn AnySwitch>,
    variants: Vec<ForeignVariant>,
    binding: Mutex<Binding>,
}

impl std::fmt::Debug for ForeignFunction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForeignFunction")
            .field("name", &self.name)
            .field("variants", &self.variants.len())
            .finish()
    }
}

/// Registers the multiversed function `name`: its generic body `generic`, the switches it is
/// specialised on (by variable address, each registered with [`register_switch`] first), and
/// its variants. Idempotent (by the generic's entry).
///
/// # Errors
/// [`Error::Declaration`] naming the function and the cause: a switch address that is not a
/// registered switch, a variant whose number of values differs from the number of switches, a
/// value outside its switch's domain, more than [`MAX_VARIANTS`] variants, a variant of
/// another signature identity, or none at all.
pub fn register_function(
    name: &str,
    generic: PaddedFunction,
    switch_addresses: &[usize],
    variants: Vec<ForeignVariant>,
) -> Result<(), Error> {
    let refuse = |reason: String| Error::Declaration {
        name: name.into(),
        reason,
    };
    let mut functions = FUNCTIONS.write().unwrap_or_else(|p| p.into_inner());
    if functions.iter().any(|f| f.entry() == generic.entry()) {
        return Ok(());
    }
    let known = switches();
    let mut switches = Vec::with_capacity(switch_addresses.len());
    for &address in switch_addresses {
        let switch = known.iter().find(|s| s.id() == address).ok_or_else(|| {
            refuse(format!(
                "it is specialised on the variable at {address:#x}, which is not an \
                 EVOLVE_SWITCH"
            ))
        })?;
        switches.push(*switch);
    }
    if variants.is_empty() || variants.len() > MAX_VARIANTS {
        return Err(refuse(format!(
            "{} variants (1 to {MAX_VARIANTS} are allowed: list fewer values)",
            variants.len()
        )));
    }
    for variant in &variants {
        if variant.values.len() != switches.len() {
            return Err(refuse(format!(
                "a variant has {} values for {} switches",
                variant.values.len(),
                switches.len()
            )));
        }
        if variant.code.signature() != generic.signature() {
            return Err(refuse(
                "a variant was declared for another C signature than the function".into(),
            ));
        }
        for (switch, value) in switches.iter().zip(&variant.values) {
            if !switch.domain().contains(value) {
                return Err(refuse(format!(
                    "value {} of switch `{}` is not in its domain {:?}",
                    *value as i64,
                    switch.name(),
                    switch.domain()
                )));
            }
        }
    }
    let function: &'static ForeignFunction = Box::leak(Box::new(ForeignFunction {
        name: Box::leak(name.to_owned().into_boxed_str()),
        generic,
        switches,
        variants,
        binding: Mutex::new(Binding::Generic),
    }));
    functions.push(function);
    Ok(())
}

/// The functions registered at run time.
pub(crate) fn functions() -> Vec<&'static dyn Function> {
    FUNCTIONS
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|f| *f as &'static dyn Function)
        .collect()
}

impl ForeignFunction {
    /// The variant for the switches' current values, or what has none.
    fn select(&self) -> Result<&ForeignVariant, Vec<Unmatched>> {
        let values: Vec<u64> = self.switches.iter().map(|s| s.raw()).collect();
        if let Some(v) = self.variants.iter().find(|v| v.values == values) {
            return Ok(v);
        }
        // Name each switch whose value no variant lists.
        let unmatched: Vec<Unmatched> = self
            .switches
            .iter()
            .enumerate()
            .filter(|(j, _)| !self.variants.iter().any(|v| v.values[*j] == values[*j]))
            .map(|(j, s)| Unmatched {
                function: self.name,
                switch: s.name(),
                value: values[j],
            })
            .collect();
        Err(if unmatched.is_empty() {
            // Every value is listed but not this combination.
            self.switches
                .iter()
                .zip(&values)
                .map(|(s, v)| Unmatched {
                    function: self.name,
                    switch: s.name(),
                    value: *v,
                })
                .collect()
        } else {
            unmatched
        })
    }

    fn plan_to(&self, edits: &mut EntryBatch, want: Binding) -> Result<Plan, Error> {
        let current = *self.binding.lock().unwrap_or_else(|p| p.into_inner());
        if current == want {
            return Ok(Plan::Unchanged);
        }
        match want {
            Binding::Generic => self.generic.restore_in(edits),
            Binding::Variant { target, .. } => {
                let code = self
                    .variants
                    .iter()
                    .map(|v| v.code)
                    .find(|c| c.address() == target)
                    .expect("targets come from the variants");
                self.generic
                    .redirect_in(edits, code)
                    .map_err(|e| Error::code(self.name, e))?;
            }
        }
        Ok(Plan::Change(want))
    }
}

impl Function for ForeignFunction {
    fn name(&self) -> &'static str {
        self.name
    }

    fn entry(&self) -> usize {
        self.generic.entry()
    }

    fn uses(&self, switch: usize) -> bool {
        self.switches.iter().any(|s| s.id() == switch)
    }

    fn plan_commit(
        &self,
        edits: &mut EntryBatch,
        report: &mut CommitReport,
    ) -> Result<Plan, Error> {
        let want = match self.select() {
            Ok(variant) if variant.code.address() != self.generic.entry() => Binding::Variant {
                target: variant.code.address(),
                nop: false,
            },
            Ok(_) => Binding::Generic,
            Err(unmatched) => {
                report.unmatched.extend(unmatched);
                Binding::Generic
            }
        };
        self.plan_to(edits, want)
    }

    fn plan_revert(&self, edits: &mut EntryBatch) -> Result<Plan, Error> {
        self.plan_to(edits, Binding::Generic)
    }

    fn finish(&self, plan: Plan) {
        if let Plan::Change(binding) = plan {
            *self.binding.lock().unwrap_or_else(|p| p.into_inner()) = binding;
        }
    }

    fn is_committed(&self) -> bool {
        matches!(
            *self.binding.lock().unwrap_or_else(|p| p.into_inner()),
            Binding::Variant { .. }
        )
    }
}
