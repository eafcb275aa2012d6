//! Hot-function stubs and fingerprinted code: retargeting that is checked like a type.
//!
//! `#[evolve::hot]` compiles every prepared function into a **stub** (an aligned `jmp rel32`
//! patch site that callers call) and an **implementation**, and registers a [`StubEntry`] in the
//! [`STUBS`] table (a link-time slice: no start-up cost). Each entry carries a **signature
//! fingerprint**, a hash of the function's parameter and return types computed by the macro.
//!
//! Code outside this crate can only name code through [`Code`] values, which carry a fingerprint
//! and are made only here: from a stub entry's implementation, or from a loaded patch's symbol
//! whose name the macro derived from the same fingerprint (see [`crate::dylib`]). A stub accepts
//! only targets with its own fingerprint, so a safe caller cannot send callers of `fn(u32)` into
//! code compiled for `fn(String)` — the run-time counterpart of the type check that
//! [`crate::FnSite`] gets from the compiler.
//!
//! # Safety
//!
//! [`StubEntry::new`] is `unsafe`: the macro that emits an entry vouches that `stub` is a
//! `jmp rel32` that callers call with the signature hashed into `fingerprint`, and that
//! `implementation` is a function with that signature. Everything after that is checked.
#![allow(unsafe_code)]

use crate::error::{Error, ErrorKind, Result};
use crate::hidden::Hidden;
use crate::site::{PatchSite, SiteInsn};
use crate::write::Batch;

/// A hot function as the macro registered it.
#[derive(Debug)]
pub struct StubEntry {
    name: &'static str,
    id: &'static str,
    fingerprint: u64,
    stub: fn() -> usize,
    implementation: fn() -> usize,
}

impl StubEntry {
    /// An entry for the link-time table.
    ///
    /// # Safety
    ///
    /// `stub()` returns the address of a `jmp rel32` to `implementation()`, which callers call
    /// with the signature whose fingerprint is `fingerprint`; `implementation()` returns a
    /// function with that signature; `id` is the symbol-safe identity that the macro also used to
    /// name the implementation `__evolve_impl_{id}_{fingerprint:016x}`.
    pub const unsafe fn new(
        name: &'static str,
        id: &'static str,
        fingerprint: u64,
        stub: fn() -> usize,
        implementation: fn() -> usize,
    ) -> StubEntry {
        StubEntry {
            name,
            id,
            fingerprint,
            stub,
            implementation,
        }
    }

    /// The function's path (`crate::module::function` or `crate::module::Type::method`).
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The symbol-safe identity shared by the host and its patches.
    pub fn id(&self) -> &'static str {
        self.id
    }

    /// The signature fingerprint.
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// The stub's address.
    pub fn stub_address(&self) -> usize {
        (self.stub)()
    }

    /// The implementation compiled into the program.
    pub fn implementation(&self) -> Code {
        Code::new((self.implementation)(), self.fingerprint)
    }
}

/// Every hot function of the program, filled at link time by `#[evolve::hot]`.
#[linkme::distributed_slice]
pub static STUBS: [StubEntry];

/// The entry of the hot function with this id.
pub fn entry_by_id(id: &str) -> Option<&'static StubEntry> {
    STUBS.iter().find(|e| e.id == id)
}

/// Code with a known signature fingerprint: a valid target for stubs of that fingerprint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Code {
    /// Hidden: versions of hot functions are bookkeeping, kept (and copied through
    /// temporaries) where a reclamation scan must not take them for references to a patch.
    address: Hidden,
    fingerprint: u64,
}

impl Code {
    /// Made by the engine only (stub entries and loaded patches).
    pub(crate) fn new(address: usize, fingerprint: u64) -> Code {
        Code {
            address: Hidden::new(address),
            fingerprint,
        }
    }

    /// Where the code starts.
    pub fn address(self) -> usize {
        self.address.get()
    }

    /// Its signature fingerprint.
    pub fn fingerprint(self) -> u64 {
        self.fingerprint
    }
}

/// A registered stub: retargetable between [`Code`] of its fingerprint.
#[derive(Debug, Clone, Copy)]
pub struct Stub {
    site: PatchSite,
    fingerprint: u64,
}

impl Stub {
    /// The stub of a table entry, registered with the engine on first use.
    pub fn of(entry: &'static StubEntry) -> Result<Stub> {
        // SAFETY: the entry's maker vouched that the stub is a jump site called with the
        // entry's signature (StubEntry::new); every later target is checked to carry the
        // same fingerprint.
        let site = unsafe { PatchSite::register(entry.stub_address())? };
        Ok(Stub {
            site,
            fingerprint: entry.fingerprint,
        })
    }

    /// A stub inside a loaded patch, made by [`crate::dylib`].
    pub(crate) fn from_parts(site: PatchSite, fingerprint: u64) -> Stub {
        Stub { site, fingerprint }
    }

    /// The stub's address.
    pub fn address(self) -> usize {
        self.site.address()
    }

    /// Its fingerprint.
    pub fn fingerprint(self) -> u64 {
        self.fingerprint
    }

    /// Where the stub jumps now.
    pub fn target(self) -> usize {
        self.site.current().target().unwrap_or(0)
    }

    /// As [`Code`]: callers of another stub with the same fingerprint may be sent here.
    pub fn as_code(self) -> Code {
        Code::new(self.address(), self.fingerprint)
    }

    /// Adds "jump to `new` instead of `expected`" to `batch`, if the fingerprints agree.
    pub fn retarget_in(self, batch: &mut Batch, expected: usize, new: Code) -> Result<()> {
        if new.fingerprint != self.fingerprint {
            return Err(Error::new(ErrorKind::FingerprintMismatch {
                stub: self.address(),
                expected: self.fingerprint,
                found: new.fingerprint,
            }));
        }
        // SAFETY: `new` carries the stub's fingerprint (checked above): it is code of the
        // signature the stub's callers call (`StubEntry::new`, `Code`).
        unsafe {
            batch.retarget(
                self.site,
                SiteInsn::Jmp(expected),
                SiteInsn::Jmp(new.address()),
            )
        };
        Ok(())
    }
}
