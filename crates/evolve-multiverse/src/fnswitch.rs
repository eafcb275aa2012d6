//! Function-pointer switches: a switch holding one of several functions, whose call sites become
//! direct calls at commit (the multiverse paper's PV-ops case).
//!
//! # Layout
//!
//! `#[evolve::switch] static HASH: fn(&[u8]) -> u64 = fnv;` generates, besides the static:
//!
//! - a **dispatcher**, an `#[inline(never)]` Rust function with the switch's signature that
//!   loads the function to run from an [`FnCell`] (the value, or the committed function while
//!   committed) and calls it (an indirect call);
//! - `HASH.call(args)`, an always-inlined method whose body is a direct call of the dispatcher:
//!   every call of the switch in the program is a `call rel32` the engine can find;
//! - an **entry stub** ([`FnSwitch::entry`]), an aligned 5-byte `jmp rel32` to the dispatcher,
//!   for callers that need a function pointer (a callback table, C code).
//!
//! Before any commit, a call runs dispatcher → the current value. [`crate::commit`] reads the
//! switch once and rewrites every direct call of the dispatcher to call that function (and the
//! stub's jump to jump to it): a committed call is one direct `call`, as if the source had named
//! the function. The dispatcher then calls the committed function too, so a call the engine
//! could not rewrite (through a pointer to the dispatcher, or a call the compiler made through
//! the GOT) keeps the same binding. [`crate::revert`] restores every byte, and calls again follow
//! the switch's current value. As for value switches, [`FnSwitch::set`] without a commit changes
//! the value ([`FnSwitch::get`], what the next commit binds), not what committed calls run. A
//! call made through `(HASH.get())(x)` is an ordinary indirect call of the current value, never
//! rewritten.
//!
//! If the committed function's code is a bare `ret`, its call sites become 5-byte NOPs, as for
//! multiversed functions.
//!
//! # Threads
//!
//! Values are atomics (`set` also takes a short lock); call sites are written through the engine's [`evolve_code::Batch`] under
//! the commit lock, like every multiverse commit, so other threads may call through the switch
//! meanwhile and run either binding.

use crate::registry::{bind_calls, Binding, Function, Plan};
use crate::switch::AnySwitch;
use crate::{CommitReport, Error};
use evolve_code::callsite::{is_bare_return, jump_stub, DirectCalls};
use evolve_code::{Batch, FnCell, FnPtr};
use std::sync::{Mutex, OnceLock};

/// A function-pointer switch holding a function of type `F`; declare it with
/// `#[evolve::switch]` on a `static` whose type is a `fn(..)` type.
///
/// The static the macro generates dereferences to a `FnSwitch`; it also has the methods `call`
/// (call the current binding: a call site commit rewrites), `get`, `set` and `committed`, which
/// take and return plain function pointers. `F` here is a newtype of the function pointer
/// (see [`evolve_code::fn_ptr_type!`]).
///
/// # Example
///
/// ```
/// fn fnv(data: &[u8]) -> u64 {
///     data.iter().fold(0xcbf29ce484222325, |h, &b| (h ^ b as u64).wrapping_mul(0x100000001b3))
/// }
/// fn length(data: &[u8]) -> u64 {
///     data.len() as u64
/// }
///
/// #[evolve::switch(in [fnv, length])]
/// static HASH: fn(&[u8]) -> u64 = fnv;
///
/// assert_eq!(HASH.call(b"abc"), fnv(b"abc")); // indirect: dispatcher, fnv
/// HASH.set(length);
/// assert_eq!(HASH.call(b"abc"), 3);
/// evolve::multiverse::commit_refs(&HASH).unwrap(); // call sites now call `length` directly
/// assert!(HASH.is_committed());
/// HASH.set(fnv); // no effect on the call sites until the next commit
/// assert_eq!(HASH.call(b"abc"), 3);
/// assert_eq!(HASH.committed().map(|f| f as usize), Some(length as *const () as usize));
/// evolve::multiverse::revert_refs(&HASH).unwrap(); // indirect again: follows the value
/// assert_eq!(HASH.call(b"abc"), fnv(b"abc"));
/// ```
pub struct FnSwitch<F: FnPtr> {
    name: &'static str,
    value: FnCell<F>,
    /// What the dispatcher calls: the committed function if committed, else the value. Written
    /// under the `committed` lock, so a `set` racing a commit cannot leave the value there.
    route: FnCell<F>,
    stub: F,
    dispatcher: F,
    domain: &'static [F],
    domain_names: &'static [&'static str],
    installed: OnceLock<Installed<F>>,
    /// The function the call sites call, if committed.
    committed: Mutex<Option<F>>,
    /// The function the plan being written binds (under the commit lock, until `finish`).
    planned: Mutex<Option<F>>,
}

struct Installed<F: FnPtr> {
    /// Every direct branch to the dispatcher: the `call`s of the switch and the stub's `jmp`.
    calls: DirectCalls<F>,
}

/// Raw values of declared functions: their indices.
static INDICES: [u64; 256] = {
    let mut indices = [0u64; 256];
    let mut i = 0;
    while i < 256 {
        indices[i] = i as u64;
        i += 1;
    }
    indices
};

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl<F: FnPtr> FnSwitch<F> {
    /// A switch (used by `#[evolve::switch]`): its name, initial function, entry stub (a
    /// `jmp rel32` to `dispatcher`), dispatcher, and the declared functions with their names.
    #[doc(hidden)]
    pub const fn new(
        name: &'static str,
        initial: F,
        stub: F,
        dispatcher: F,
        domain: &'static [F],
        domain_names: &'static [&'static str],
    ) -> FnSwitch<F> {
        assert!(domain.len() == domain_names.len() && domain.len() <= INDICES.len());
        FnSwitch {
            name,
            value: FnCell::new(initial),
            route: FnCell::new(initial),
            stub,
            dispatcher,
            domain,
            domain_names,
            installed: OnceLock::new(),
            committed: Mutex::new(None),
            planned: Mutex::new(None),
        }
    }

    /// The current value: what the next commit binds, and what uncommitted calls run.
    ///
    /// The static generated by `#[evolve::switch]` has its own `get` returning the plain
    /// function pointer (see the type's example); this one returns the newtype `F`.
    ///
    /// ```
    /// use evolve::multiverse::FnSwitch;
    ///
    /// #[evolve::switch]
    /// static OP: fn(u32) -> u32 = u32::swap_bytes;
    /// let switch: &FnSwitch<_> = &OP;
    /// assert_eq!((switch.get().0)(1), 1 << 24);
    /// assert_eq!(OP.get() as usize, switch.get().0 as usize);
    /// ```
    #[inline(always)]
    pub fn get(&self) -> F {
        self.value.get()
    }

    /// Changes the value. Committed calls keep their binding until the next commit; before the
    /// first commit, and after a revert, calls follow the value at once. Takes a short lock
    /// (shared with commit's last step).
    ///
    /// The static generated by `#[evolve::switch]` has its own `set` taking the plain function
    /// pointer (see the type's example).
    ///
    /// # Panics
    ///
    /// If `f` is the switch's own [`entry`](FnSwitch::entry) or
    /// [`dispatcher`](FnSwitch::dispatcher): calls would loop forever.
    ///
    /// ```
    /// use evolve::multiverse::FnSwitch;
    ///
    /// #[evolve::switch]
    /// static OP: fn(u32) -> u32 = u32::swap_bytes;
    /// let switch: &FnSwitch<_> = &OP;
    /// let saved = switch.get();
    /// OP.set(u32::reverse_bits);
    /// assert_eq!(OP.call(1), 1 << 31);
    /// switch.set(saved);
    /// assert_eq!(OP.call(1), 1 << 24);
    /// ```
    pub fn set(&self, f: F) {
        assert!(
            !self.is_own(f),
            "switch `{}`: cannot hold its own entry or dispatcher (calls would loop)",
            self.name
        );
        let committed = lock(&self.committed);
        self.value.set(f);
        if committed.is_none() {
            self.route.set(f);
        }
    }

    fn is_own(&self, f: F) -> bool {
        f.address() == self.stub.address() || f.address() == self.dispatcher.address()
    }

    /// What the dispatcher calls: the committed function, or the value if not committed (used
    /// by the generated dispatcher).
    #[doc(hidden)]
    #[inline(always)]
    pub fn route(&self) -> F {
        self.route.get()
    }

    /// The switch's name as declared.
    ///
    /// ```
    /// #[evolve::switch]
    /// static OP: fn(u32) -> u32 = u32::reverse_bits;
    /// assert_eq!(OP.name(), "OP");
    /// ```
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The function committed call sites call, or `None` if the switch is not committed (calls
    /// go through the dispatcher and follow the value).
    ///
    /// The static generated by `#[evolve::switch]` has its own `committed` returning the plain
    /// function pointer (see the type's example).
    ///
    /// ```
    /// use evolve::multiverse::FnSwitch;
    ///
    /// #[evolve::switch]
    /// static OP: fn(u32) -> u32 = u32::swap_bytes;
    /// let switch: &FnSwitch<_> = &OP;
    /// assert!(switch.committed().is_none());
    /// evolve::multiverse::commit_refs(&OP).unwrap();
    /// assert_eq!(switch.committed().map(|f| f.0 as usize), Some(OP.get() as usize));
    /// evolve::multiverse::revert_refs(&OP).unwrap();
    /// ```
    pub fn committed(&self) -> Option<F> {
        *lock(&self.committed)
    }

    /// Whether the call sites are bound to a function (committed).
    ///
    /// ```
    /// #[evolve::switch]
    /// static OP: fn(u32) -> u32 = u32::swap_bytes;
    /// assert!(!OP.is_committed());
    /// evolve::multiverse::commit_refs(&OP).unwrap();
    /// assert!(OP.is_committed());
    /// evolve::multiverse::revert_refs(&OP).unwrap();
    /// ```
    pub fn is_committed(&self) -> bool {
        lock(&self.committed).is_some()
    }

    /// The entry stub: the function every `call` of the switch calls. It also names the switch
    /// for [`crate::commit_fn`], [`crate::revert_fn`] and [`crate::is_committed`].
    ///
    /// ```
    /// #[evolve::switch]
    /// static OP: fn(u32) -> u32 = u32::swap_bytes;
    /// evolve::multiverse::commit_fn(OP.entry()).unwrap();
    /// assert!(evolve::multiverse::is_committed(OP.entry()));
    /// assert_eq!((OP.entry().0)(1), 1 << 24); // calling the stub calls the binding
    /// evolve::multiverse::revert_fn(OP.entry()).unwrap();
    /// ```
    pub fn entry(&self) -> F {
        self.stub
    }

    /// The dispatcher: the indirect path (never rewritten), which calls the committed function,
    /// or the value if the switch is not committed. Every direct branch to it is a call site of
    /// the switch.
    ///
    /// ```
    /// #[evolve::switch]
    /// static OP: fn(u32) -> u32 = u32::swap_bytes;
    /// OP.set(u32::reverse_bits);
    /// assert_eq!((OP.dispatcher().0)(1), 1 << 31); // not committed: the value
    /// ```
    pub fn dispatcher(&self) -> F {
        self.dispatcher
    }

    /// The declared functions (`#[evolve::switch(in [f, g])]`), with their names as written.
    ///
    /// ```
    /// fn one() -> u8 { 1 }
    /// fn two() -> u8 { 2 }
    /// #[evolve::switch(in [one, two])]
    /// static PICK: fn() -> u8 = one;
    /// let names: Vec<&str> = PICK.declared().map(|(name, _)| name).collect();
    /// assert_eq!(names, ["one", "two"]);
    /// ```
    pub fn declared(&self) -> impl Iterator<Item = (&'static str, F)> + '_ {
        self.domain_names
            .iter()
            .copied()
            .zip(self.domain.iter().copied())
    }

    /// The number of direct call sites found, once the switch was first committed.
    ///
    /// ```
    /// #[evolve::switch]
    /// static OP: fn(u32) -> u32 = u32::swap_bytes;
    /// assert_eq!(OP.call_sites(), None);
    /// evolve::multiverse::commit_refs(&OP).unwrap();
    /// assert!(OP.call_sites().is_some());
    /// evolve::multiverse::revert_refs(&OP).unwrap();
    /// ```
    pub fn call_sites(&self) -> Option<usize> {
        Some(self.installed.get()?.calls.len())
    }

    fn installed(&self) -> Result<&Installed<F>, Error> {
        if let Some(installed) = self.installed.get() {
            return Ok(installed);
        }
        let stub = jump_stub(self.stub, self.dispatcher).map_err(|e| Error::code(self.name, e))?;
        let calls = DirectCalls::find(self.dispatcher).map_err(|e| Error::code(self.name, e))?;
        // The stub is a direct branch to the dispatcher too: its jump is retargeted with the
        // call sites, so calls through `entry()` follow the binding.
        if !calls
            .sites()
            .iter()
            .any(|s| s.address() == stub.site().address())
        {
            return Err(Error::Code {
                function: self.name,
                source: evolve_code::Error::new(evolve_code::ErrorKind::InvalidArgument {
                    reason: format!(
                        "the stub {:#x} was not found among the branches to the dispatcher",
                        self.stub.address()
                    ),
                }),
            });
        }
        // Under the commit lock: no other thread installs concurrently.
        Ok(self.installed.get_or_init(|| Installed { calls }))
    }

    fn binding(&self) -> Binding {
        match *lock(&self.committed) {
            None => Binding::Generic,
            Some(f) => Binding::Variant {
                target: f.address(),
                nop: is_bare_return(f),
            },
        }
    }

    /// Adds the edits that bind the call sites to `want` (`None`: the dispatcher).
    fn plan_to(&self, batch: &mut Batch, want: Option<F>) -> Result<Plan, Error> {
        let binding = match want {
            None => Binding::Generic,
            Some(f) => Binding::Variant {
                target: f.address(),
                nop: is_bare_return(f),
            },
        };
        if binding == self.binding() {
            return Ok(Plan::Unchanged);
        }
        let installed = self.installed()?;
        match want {
            None => installed.calls.restore_in(batch),
            Some(f) => bind_calls(&installed.calls, batch, f, is_bare_return(f), self.name)?,
        }
        *lock(&self.planned) = want;
        Ok(Plan::Change(binding))
    }
}

impl<F: FnPtr> Function for FnSwitch<F> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn entry(&self) -> usize {
        self.stub.address()
    }

    fn uses(&self, switch: usize) -> bool {
        AnySwitch::id(self) == switch
    }

    fn plan_commit(&self, batch: &mut Batch, _report: &mut CommitReport) -> Result<Plan, Error> {
        let f = self.value.get();
        // `set` refuses the switch's own entry and dispatcher; a value that is one anyway has
        // nothing to bind (binding the stub to itself would loop).
        let want = (!self.is_own(f)).then_some(f);
        self.plan_to(batch, want)
    }

    fn plan_revert(&self, batch: &mut Batch) -> Result<Plan, Error> {
        self.plan_to(batch, None)
    }

    fn finish(&self, plan: Plan) {
        if let Plan::Change(_) = plan {
            let mut committed = lock(&self.committed);
            *committed = lock(&self.planned).take();
            self.route
                .set(committed.unwrap_or_else(|| self.value.get()));
        }
    }

    fn is_committed(&self) -> bool {
        FnSwitch::is_committed(self)
    }
}

/// A function-pointer switch as a switch: its raw value is the index of its function among the
/// declared ones (`in [f, g]`), or the function's address if it is not declared; its domain is
/// the indices of the declared functions, and [`AnySwitch::set_raw`] selects one of them (other
/// raw values are ignored).
impl<F: FnPtr> AnySwitch for FnSwitch<F> {
    fn name(&self) -> &'static str {
        self.name
    }
    fn raw(&self) -> u64 {
        let current = self.value.get().address();
        match self.domain.iter().position(|f| f.address() == current) {
            Some(index) => index as u64,
            None => current as u64,
        }
    }
    fn id(&self) -> usize {
        self as *const FnSwitch<F> as usize
    }
    fn domain(&self) -> &'static [u64] {
        &INDICES[..self.domain.len()]
    }
    fn set_raw(&self, raw: u64) {
        if let Some(&f) = usize::try_from(raw).ok().and_then(|i| self.domain.get(i)) {
            self.set(f);
        }
    }
}

impl<F: FnPtr> std::fmt::Debug for FnSwitch<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FnSwitch")
            .field("name", &self.name)
            .field("value", &format_args!("{:#x}", self.value.get().address()))
            .field("committed", &self.is_committed())
            .finish()
    }
}
