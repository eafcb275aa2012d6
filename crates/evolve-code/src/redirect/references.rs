//! References: every direct call or jump to a function, and every GOT slot the program loads
//! its address from, retargeted together to another version of it.

use super::entry::replaced_ranges;
use super::function::{Function, Lineage};
use super::got::{self, SlotEdit};
use crate::error::{Error, ErrorKind, Result};
use crate::hidden::{hide_insn, reveal_insn, Hidden};
use crate::inspect::{self, BranchKind};
use crate::loader::LoadedPatch;
use crate::overwrite;
use crate::site::{PatchSite, SiteInsn};
use crate::sys::memory;
use crate::write::{self, Batch, BatchReport};
use std::collections::HashMap;

/// A direct branch to the function.
#[derive(Debug, Clone, Copy)]
struct CodeReference {
    site: Hidden,
    kind: BranchKind,
}

/// A GOT slot holding the function's address.
#[derive(Debug, Clone, Copy)]
struct SlotReference {
    slot: Hidden,
    original: Hidden,
}

/// Every direct reference to one function: `call rel32` / `jmp rel32` instructions in the
/// executable (from its branch index) and in loaded patches (whose loader relaxed GOT calls
/// into `addr32 call rel32` — the site is the `call rel32` one byte in — and tail calls into
/// `jmp rel32; nop`), and the executable's GOT slots that hold its address (rustc calls other
/// crates' functions through `call *f@GOTPCREL(%rip)`). Each code reference is a registered
/// [`PatchSite`].
///
/// Found once, while the references still hold the function's address; a [`Retarget`] then
/// moves them between versions and back to what they held, exactly.
///
/// # Example
/// ```
/// use evolve_code::redirect::{Function, References, Retarget};
/// #[inline(never)]
/// fn old(x: u64) -> u64 { std::hint::black_box(x) ^ 0x55 }
/// #[inline(never)]
/// fn new(x: u64) -> u64 { std::hint::black_box(x) ^ 0xaa }
/// type F = fn(u64) -> u64;
/// let (f, g) = (Function::from_fn(old as F)?, Function::from_fn(new as F)?);
/// let refs = References::find(&f, &[])?;
/// Retarget::new().retarget(&refs, &f, &g)?.apply()?;
/// Retarget::new().restore(&refs).apply()?;
/// assert!(refs.code_sites().iter().all(|s| s.current() == s.original()));
/// # Ok::<(), evolve_code::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct References {
    lineage: Lineage,
    shown: String,
    function: Hidden,
    code: Vec<CodeReference>,
    slots: Vec<SlotReference>,
}

impl References {
    /// Finds and registers every reference to `function` as the code holds them now: in the
    /// executable if `function` is the executable's, and in each of `patches`. Sites inside the
    /// bytes an installed redirect replaced are left out (nothing executes them); so install
    /// entry redirects before finding references. [`References::find_many`] does it for many
    /// functions at once, reading everything once.
    ///
    /// # Errors
    /// [`ErrorKind::NotRedirectable`] if another function shares `function`'s address (some of
    /// the calls there would be the other's); the errors of [`inspect::branch_sites_to`] and
    /// [`PatchSite::register`].
    pub fn find(function: &Function, patches: &[&LoadedPatch]) -> Result<References> {
        Ok(References::find_many(&[function], patches)?
            .pop()
            .expect("one function, one set"))
    }

    /// [`References::find`] for each of `functions`, in order: the executable's GOT, the
    /// installed redirects and each patch's code are read once for all of them.
    ///
    /// # Errors
    /// As [`References::find`]; nothing is registered for a function after the first error
    /// (the functions before it keep their registered sites, which still hold their
    /// original bytes).
    pub fn find_many(functions: &[&Function], patches: &[&LoadedPatch]) -> Result<Vec<References>> {
        References::find_where(functions, patches, true)
    }

    /// [`References::find_many`] in `patches` only: the references a newly loaded patch makes
    /// to functions whose other references were found before (and may have been retargeted
    /// since).
    ///
    /// # Errors
    /// As [`References::find_many`].
    ///
    /// # Example
    /// ```
    /// use evolve_code::redirect::{Function, References};
    /// let main = Function::in_executable("main")?;
    /// // No patch: nothing to find, and the executable is not looked at.
    /// let found = References::find_in_patches(&[&main], &[])?;
    /// assert!(found[0].is_empty());
    /// # Ok::<(), evolve_code::Error>(())
    /// ```
    pub fn find_in_patches(
        functions: &[&Function],
        patches: &[&LoadedPatch],
    ) -> Result<Vec<References>> {
        References::find_where(functions, patches, false)
    }

    fn find_where(
        functions: &[&Function],
        patches: &[&LoadedPatch],
        in_executable_too: bool,
    ) -> Result<Vec<References>> {
        for f in functions {
            f.check_not_aliased()?;
        }
        let mut skip = replaced_ranges();
        skip.sort_unstable_by_key(|(entry, _)| entry.get());
        let skipped = |site: usize| {
            let i = skip.partition_point(|(entry, _)| entry.get() <= site);
            i > 0 && site < skip[i - 1].0.get() + skip[i - 1].1
        };
        let exe = inspect::executable()?;
        let in_executable = |target: usize| exe.exec_ranges().iter().any(|r| r.contains(&target));
        let wanted: HashMap<Hidden, usize> = functions
            .iter()
            .enumerate()
            .map(|(i, f)| (Hidden::new(f.address()), i))
            .collect();
        // Code sites by function, from the executable's index and each patch's code.
        let mut sites: Vec<Vec<(Hidden, BranchKind)>> = vec![Vec::new(); functions.len()];
        for (i, f) in functions.iter().enumerate() {
            if in_executable_too && in_executable(f.address()) {
                for b in inspect::branch_sites_to(f.address())? {
                    sites[i].push((Hidden::new(b.address), b.kind));
                }
            }
        }
        if !patches.is_empty() {
            let maps = memory::mappings()?;
            for patch in patches {
                for (_, (start, end)) in patch.functions() {
                    let (start, end) = (start.get(), end.get());
                    if end <= start {
                        continue;
                    }
                    let code = overwrite::read_code(&maps, start, end - start)?;
                    let found = inspect::direct_branches(&code, start);
                    for b in &found {
                        if let Some(&i) = wanted.get(&Hidden::new(b.target)) {
                            sites[i].push((Hidden::new(b.address), b.kind));
                        }
                    }
                    crate::hidden::scrub_plain(found);
                    crate::hidden::scrub_plain(code);
                }
            }
        }
        // GOT slots by function (the executable's functions only: its GOT never held patch
        // code, except where a retarget put it).
        let mut slots: Vec<Vec<SlotReference>> = vec![Vec::new(); functions.len()];
        if in_executable_too && functions.iter().any(|f| in_executable(f.address())) {
            let entries = inspect::got_entries()?;
            for &(slot, value) in &entries {
                if let Some(&i) = wanted.get(&Hidden::new(value)) {
                    if in_executable(value) {
                        slots[i].push(SlotReference {
                            slot: Hidden::new(slot),
                            original: Hidden::new(value),
                        });
                    }
                }
            }
            crate::hidden::scrub_plain(entries);
        }
        let mut out = Vec::with_capacity(functions.len());
        for ((f, mut sites), slots) in functions.iter().zip(sites).zip(slots) {
            let target = f.address();
            sites.sort_unstable_by_key(|(s, _)| s.get());
            sites.dedup_by_key(|(s, _)| *s);
            let mut code = Vec::with_capacity(sites.len());
            for (site, kind) in sites {
                if skipped(site.get()) {
                    continue;
                }
                // SAFETY: the site branches to `f` (decoded just now), so its callers call a
                // function of `f`'s lineage; a `Retarget` only ever makes it branch to another
                // version of that lineage or puts its original bytes back. The executable
                // stays mapped; a patch's sites are forgotten by the engine when it is
                // unloaded.
                unsafe { PatchSite::register(site.get())? };
                // While a probe is routed through the function's entry, this branch keeps
                // calling the entry (see `crate::write::follow`), so the probe sees its calls.
                write::follow(site.get(), target);
                code.push(CodeReference { site, kind });
            }
            out.push(References {
                lineage: f.lineage().clone(),
                shown: f.name().to_owned(),
                function: Hidden::new(target),
                code,
                slots,
            });
        }
        Ok(out)
    }

    /// Adds the references `other` found (for instance in a patch loaded later) to these.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`] if `other` holds references of another function.
    pub fn merge(&mut self, other: References) -> Result<()> {
        if other.lineage != self.lineage {
            return Err(Error::new(ErrorKind::InvalidArgument {
                reason: format!(
                    "references of `{}` cannot join those of `{}`",
                    other.shown, self.shown
                ),
            }));
        }
        for c in other.code {
            if !self.code.iter().any(|d| d.site == c.site) {
                self.code.push(c);
            }
        }
        for s in other.slots {
            if !self.slots.iter().any(|t| t.slot == s.slot) {
                self.slots.push(s);
            }
        }
        Ok(())
    }

    /// Forgets the references inside `patch` (before it is unloaded: its code goes away).
    pub fn forget_patch(&mut self, patch: &LoadedPatch) {
        let inside = |a: usize| {
            patch
                .ranges()
                .iter()
                .any(|r| (r.0.get()..r.1.get()).contains(&a))
        };
        self.code.retain(|c| !inside(c.site.get()));
    }

    /// The function's name.
    pub fn name(&self) -> &str {
        &self.shown
    }

    /// The address the references held when they were found.
    pub fn function(&self) -> usize {
        self.function.get()
    }

    /// The code references (call and jump sites), in address order of discovery.
    ///
    /// # Panics
    /// If one was forgotten by the engine (its patch unloaded without
    /// [`References::forget_patch`]).
    pub fn code_sites(&self) -> Vec<PatchSite> {
        self.code
            .iter()
            .map(|c| PatchSite::lookup(c.site.get()).expect("a registered reference"))
            .collect()
    }

    /// The GOT slots holding the function.
    pub fn got_slots(&self) -> Vec<usize> {
        self.slots.iter().map(|s| s.slot.get()).collect()
    }

    /// Code references plus GOT slots.
    pub fn len(&self) -> usize {
        self.code.len() + self.slots.len()
    }

    /// Whether nothing refers to the function directly.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What one code reference must become.
#[derive(Debug, Clone, Copy)]
enum NewCode {
    Insn { expected: SiteInsn, new: SiteInsn },
    Original,
}

/// Retargets the references of several functions together: validated whole first, so that a
/// reference that does not hold what the batch expects refuses it and nothing changes.
///
/// Code references change through one engine [`Batch`] (each one an atomic store or the int3
/// protocol, no thread stopped); GOT slots by one compare-and-swap each (see the parent module
/// docs). Each reference switches at one instant; the references of a batch do not switch
/// together (every one of them reaches a correct version at every instant, since the entry
/// redirects are in place first).
///
/// # Example
/// See [`References`].
#[derive(Debug, Default)]
pub struct Retarget {
    code: Vec<(Hidden, NewCode)>,
    slots: Vec<(Hidden, Option<Hidden>, Hidden)>,
}

/// What [`Retarget::apply`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetargetReport {
    /// The code references' batch.
    pub code: BatchReport,
    /// GOT slots stored.
    pub slots: usize,
}

fn kind_insn(kind: BranchKind, target: usize) -> SiteInsn {
    match kind {
        BranchKind::Call => SiteInsn::Call(target),
        BranchKind::Jmp => SiteInsn::Jmp(target),
    }
}

impl Retarget {
    /// An empty batch.
    pub fn new() -> Retarget {
        Retarget::default()
    }

    /// Adds: every reference of `refs` goes from `from` to `to` (compare-and-swap: each must
    /// hold `from` when the batch is applied). A reference sent back to what it held when found
    /// gets its original bytes, exactly.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`], adding nothing, if `from` or `to` is not a version of
    /// the function whose references `refs` are.
    pub fn retarget(
        &mut self,
        refs: &References,
        from: &Function,
        to: &Function,
    ) -> Result<&mut Retarget> {
        for f in [from, to] {
            if *f.lineage() != refs.lineage {
                return Err(Error::new(ErrorKind::InvalidArgument {
                    reason: format!(
                        "{f} is {}, not {}: the references of `{}` cannot be sent there",
                        f.lineage(),
                        refs.lineage,
                        refs.shown
                    ),
                }));
            }
        }
        let (from, to) = (from.address(), to.address());
        for c in &refs.code {
            let new = kind_insn(c.kind, to);
            self.code.push((
                c.site,
                NewCode::Insn {
                    expected: hide_insn(kind_insn(c.kind, from)),
                    new: hide_insn(new),
                },
            ));
        }
        for s in &refs.slots {
            self.slots
                .push((s.slot, Some(Hidden::new(from)), Hidden::new(to)));
        }
        Ok(self)
    }

    /// Adds: every reference of `refs` gets back what it held when found, exactly, whatever it
    /// holds now.
    pub fn restore(&mut self, refs: &References) -> &mut Retarget {
        for c in &refs.code {
            self.code.push((c.site, NewCode::Original));
        }
        for s in &refs.slots {
            self.slots.push((s.slot, None, s.original));
        }
        self
    }

    /// Number of references the batch changes.
    pub fn len(&self) -> usize {
        self.code.len() + self.slots.len()
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Validates every reference, then changes them: the code references in one engine batch,
    /// then the GOT slots. If the slots fail after the code changed, the code references are
    /// put back.
    ///
    /// # Errors
    /// [`ErrorKind::UnexpectedInstruction`] / [`ErrorKind::UnexpectedBytes`] for a code
    /// reference, [`ErrorKind::UnexpectedSlot`] for a GOT slot, that does not hold what the
    /// batch expects; [`ErrorKind::UnknownSite`] for a reference whose code was unloaded;
    /// [`ErrorKind::DuplicateSite`]; system errors. Nothing was changed.
    pub fn apply(&self) -> Result<RetargetReport> {
        let slots: Vec<SlotEdit> = self
            .slots
            .iter()
            .map(|(slot, expected, new)| SlotEdit {
                slot: slot.get(),
                expected: expected.map(Hidden::get),
                new: new.get(),
            })
            .collect();
        // Slots first, read only: a stale slot refuses before any code changes.
        {
            let _writer = write::lock();
            got::validate(&slots)?;
        }
        let mut batch = Batch::new();
        let mut undo = Batch::new();
        for &(site, new) in &self.code {
            let site = PatchSite::lookup(site.get())?;
            match new {
                NewCode::Insn { expected, new } => {
                    let (expected, new) = (reveal_insn(expected), reveal_insn(new));
                    // SAFETY: `new` was built by `Retarget::retarget` from a version of the
                    // function the site calls (same lineage), and the undo puts back what the
                    // site held.
                    unsafe { batch.retarget(site, expected, new) };
                    if expected == site.original() {
                        undo.restore(site);
                    } else {
                        // SAFETY: as above: the site's previous instruction.
                        unsafe { undo.retarget(site, new, expected) };
                    }
                }
                NewCode::Original => {
                    batch.restore(site);
                    let now = site.current();
                    if now == site.original() {
                        undo.restore(site);
                    } else {
                        // SAFETY: the instruction the site holds now, put back on undo.
                        unsafe { undo.retarget(site, site.original(), now) };
                    }
                }
            }
        }
        let code = batch.apply()?;
        let stored = match got::store(&slots) {
            Ok(before) => {
                let n = before.len();
                crate::hidden::scrub_plain(before);
                n
            }
            Err(e) => {
                // Put the code references back; the slots were left as they were.
                let _ = undo.apply();
                return Err(e);
            }
        };
        crate::hidden::scrub_plain(slots);
        Ok(RetargetReport {
            code,
            slots: stored,
        })
    }
}
