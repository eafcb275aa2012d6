//! The safe way in: a detour only on what the engine knows to be a whole function.

use super::{Detour, DetourHooks};
use crate::error::{Error, ErrorKind, Result};
use crate::site::{PatchSite, SiteInsn};

impl Detour {
    /// Detours the function at `function` of `size` bytes, as [`Detour::install`] does, after
    /// checking that it is one: a function symbol of an image loaded in the process with exactly
    /// this address and size, or a registered jump stub (a prepared function's entry, `size` =
    /// 5).
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`] if the range is not a known function; those of
    /// [`Detour::install`].
    ///
    /// # Example
    /// ```
    /// use std::sync::{Arc, atomic::AtomicBool};
    /// #[inline(never)]
    /// extern "C" fn f(x: u64) -> u64 { std::hint::black_box(x).wrapping_mul(0x9e37_79b9) ^ x >> 7 }
    /// let sym = evolve_code::inspect::executable().unwrap().function_containing(f as usize).unwrap().clone();
    /// let hooks = evolve_code::DetourHooks {
    ///     counter: Arc::new(evolve_code::Counter::new()),
    ///     slow: Arc::new(AtomicBool::new(false)),
    ///     on_entry: Arc::new(|_| {}),
    /// };
    /// // The middle of a function is refused.
    /// assert!(evolve_code::Detour::install_at_function(sym.address + 1, sym.size - 1, hooks.clone()).is_err());
    /// let d = evolve_code::Detour::install_at_function(sym.address, sym.size, hooks.clone()).unwrap();
    /// let g: extern "C" fn(u64) -> u64 = std::hint::black_box(f);
    /// assert_eq!(g(5), 5u64.wrapping_mul(0x9e37_79b9) ^ 0);
    /// assert_eq!(hooks.counter.get(), 1);
    /// d.remove().unwrap();
    /// ```
    pub fn install_at_function(function: usize, size: usize, hooks: DetourHooks) -> Result<Detour> {
        let stub = size == crate::SITE_LEN
            && PatchSite::lookup(function)
                .is_ok_and(|site| matches!(site.current(), SiteInsn::Jmp(_)));
        let symbol = || -> Result<bool> {
            Ok(crate::inspect::images()?.iter().any(|image| {
                // Symbols are sorted by address: look at those starting at `function` (aliases
                // included).
                let symbols = image.symbols();
                symbols[symbols.partition_point(|f| f.address < function)..]
                    .iter()
                    .take_while(|f| f.address == function)
                    .any(|f| f.kind == crate::inspect::SymbolKind::Function && f.size == size)
            }))
        };
        if !stub && !symbol()? {
            return Err(Error::new(ErrorKind::InvalidArgument {
                reason: format!(
                    "{function:#x} ({size} bytes) is neither a function symbol of a loaded image \
                     nor a registered jump stub"
                ),
            }));
        }
        // SAFETY: checked above: a whole function as its symbol table gives it, or a registered
        // jump stub.
        unsafe { Detour::install(function, size, hooks) }
    }
}
