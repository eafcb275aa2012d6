//! [`Function`]: one version of a function — the program's code, or a replacement in a loaded
//! patch — with what the engine must know to overwrite its entry or find its references.

use crate::error::{Error, ErrorKind, Result};
use crate::fnsite::FnPtr;
use crate::hidden::Hidden;
use crate::inspect::{self, Image, Symbol, SymbolKind};
use crate::loader::LoadedPatch;
use std::any::TypeId;
use std::fmt;

/// The prefix of a patch's replacement of the program's function `F`: `__evolve_new__<F>`,
/// `F` being the program's (mangled) symbol (the patch format of ISSUE11).
pub const REPLACEMENT_PREFIX: &str = "__evolve_new__";

/// What makes two functions interchangeable: a redirect or a retarget only ever sends calls of
/// one function to another of the same lineage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Lineage {
    /// The program's function with this (mangled) symbol: its own code, and every patch's
    /// `__evolve_new__<symbol>`. Patches are built by Evolve's builder from the same source
    /// and signature, and [`LoadedPatch::load`]'s caller vouched for the patch.
    Symbol(String),
    /// Functions given as values of one Rust function-pointer type: the type system says they
    /// are called alike.
    Typed { id: TypeId, name: &'static str },
}

impl fmt::Display for Lineage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Lineage::Symbol(symbol) => write!(f, "a version of `{}`", demangle(symbol)),
            Lineage::Typed { name, .. } => write!(f, "a function of type `{name}`"),
        }
    }
}

/// One version of a function: the program's own code or a replacement in a loaded patch, with
/// its symbol, address, size and what follows it.
///
/// Addresses are kept hidden from reclamation scans ([`Hidden`]), so a `Function` of a patch
/// does not keep the patch from being unloaded; its address must not be used once the patch
/// is unloaded.
///
/// # Example
/// ```
/// use evolve_code::redirect::Function;
/// #[inline(never)]
/// fn square(x: u64) -> u64 { std::hint::black_box(x).wrapping_mul(x) }
/// let f = Function::from_fn(square as fn(u64) -> u64)?;
/// assert_eq!(f.address(), square as fn(u64) -> u64 as usize);
/// assert!(f.name().ends_with("square"));
/// # Ok::<(), evolve_code::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Function {
    symbol: String,
    shown: String,
    address: Hidden,
    size: usize,
    /// The end of the bytes that are this function's or padding after it: the next symbol's
    /// start, or the end of its code.
    limit: Hidden,
    /// Other function symbols at the same address (functions the compiler merged).
    aliases: Vec<String>,
    lineage: Lineage,
}

fn demangle(name: &str) -> String {
    if let Some(of) = name.strip_prefix(REPLACEMENT_PREFIX) {
        return format!("{} (new version)", demangle(of));
    }
    match rustc_demangle::try_demangle(name) {
        Ok(d) => format!("{d:#}"),
        Err(_) => name.to_owned(),
    }
}

fn invalid(reason: String) -> Error {
    Error::new(ErrorKind::InvalidArgument { reason })
}

impl Function {
    /// The executable's function with this symbol: its raw (mangled) name, or its demangled
    /// path without hash (`my_crate::module::function`). Its versions are the patches'
    /// `__evolve_new__<symbol>` ([`Function::replacement`]).
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`] if the executable has no sized function of that name; the
    /// errors of [`inspect::executable`].
    ///
    /// # Example
    /// ```
    /// let main = evolve_code::redirect::Function::in_executable("main")?;
    /// assert_eq!(main.symbol(), "main");
    /// # Ok::<(), evolve_code::Error>(())
    /// ```
    pub fn in_executable(symbol: &str) -> Result<Function> {
        let exe = inspect::executable()?;
        let found = exe
            .symbol_by_name(symbol)
            .filter(|s| s.kind == SymbolKind::Function && s.size > 0)
            .ok_or_else(|| invalid(format!("the executable has no function `{symbol}`")))?;
        let lineage = Lineage::Symbol(found.name.clone());
        Ok(Function::of_executable(exe, found, lineage))
    }

    /// The executable's function `f` (which must be a function symbol's entry), as a value of
    /// type `F`: its versions are the other functions of type `F`.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`] if `f` is not the entry of a function symbol of the
    /// executable (a closure shim, code of a library).
    pub fn from_fn<F: FnPtr>(f: F) -> Result<Function> {
        let address = f.address();
        let exe = inspect::executable()?;
        let found = exe
            .function_containing(address)
            .filter(|s| s.address == address)
            .ok_or_else(|| {
                invalid(format!(
                    "{address:#x} is not the entry of a function symbol of the executable"
                ))
            })?;
        let lineage = Lineage::Typed {
            id: TypeId::of::<F>(),
            name: std::any::type_name::<F>(),
        };
        Ok(Function::of_executable(exe, found, lineage))
    }

    /// The replacement of the program's function `program_symbol` that `patch` carries: its
    /// function `__evolve_new__<program_symbol>`, a version of
    /// [`Function::in_executable`]`(program_symbol)`.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`] if the patch defines no such function.
    pub fn replacement(patch: &LoadedPatch, program_symbol: &str) -> Result<Function> {
        let name = format!("{REPLACEMENT_PREFIX}{program_symbol}");
        Function::of_patch(patch, &name, Lineage::Symbol(program_symbol.to_owned()))
    }

    /// The function `symbol` defined by `patch` (a new function it adds): later patches replace
    /// it with their `__evolve_new__<symbol>`.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`] if the patch defines no such function.
    pub fn in_patch(patch: &LoadedPatch, symbol: &str) -> Result<Function> {
        Function::of_patch(patch, symbol, Lineage::Symbol(symbol.to_owned()))
    }

    /// This function, declared a version of `of`: redirects and retargets may then send `of`'s
    /// calls here and back.
    ///
    /// # Safety
    ///
    /// Calling this function must be sound wherever `of` is called: the same signature and ABI,
    /// and a body that is correct for `of`'s callers with the program's data as it is.
    pub unsafe fn vouched_version_of(mut self, of: &Function) -> Function {
        self.lineage = of.lineage.clone();
        self
    }

    fn of_executable(exe: &Image, symbol: &Symbol, lineage: Lineage) -> Function {
        let address = symbol.address;
        // Symbols are sorted by address: those at this address, and the next one.
        let all = exe.symbols();
        let here = all.partition_point(|s| s.address < address)
            ..all.partition_point(|s| s.address <= address);
        let next = all.get(here.end).map(|s| s.address);
        let end_of_code = exe
            .exec_ranges()
            .iter()
            .find(|r| r.contains(&address))
            .map_or(address + symbol.size, |r| r.end);
        let limit = next.map_or(end_of_code, |n| n.min(end_of_code));
        let aliases = all[here]
            .iter()
            .filter(|s| s.kind == SymbolKind::Function && s.size > 0 && s.name != symbol.name)
            .map(|s| s.demangled.clone())
            .collect();
        Function {
            shown: demangle(&symbol.name),
            symbol: symbol.name.clone(),
            address: Hidden::new(address),
            size: symbol.size,
            limit: Hidden::new(limit),
            aliases,
            lineage,
        }
    }

    fn of_patch(patch: &LoadedPatch, name: &str, lineage: Lineage) -> Result<Function> {
        let missing = || {
            invalid(format!(
                "patch {} defines no function `{name}`",
                patch.path().display()
            ))
        };
        let address = patch.symbol(name).ok_or_else(missing)?;
        let functions = patch.functions();
        let (_, (start, end)) = functions
            .iter()
            .find(|(n, (start, _))| *n == name && start.get() == address)
            .ok_or_else(missing)?;
        let size = end.get() - start.get();
        let end_of_code = patch
            .exec_ranges()
            .iter()
            .find(|r| (r.0.get()..r.1.get()).contains(&address))
            .map_or(address + size, |r| r.1.get());
        let limit = functions
            .iter()
            .map(|(_, (s, _))| s.get())
            .find(|&s| s > address)
            .map_or(end_of_code, |n| n.min(end_of_code));
        let aliases = functions
            .iter()
            .filter(|(n, (s, e))| s.get() == address && e.get() > s.get() && *n != name)
            .map(|(n, _)| demangle(n))
            .collect();
        Ok(Function {
            shown: demangle(name),
            symbol: name.to_owned(),
            address: Hidden::new(address),
            size,
            limit: Hidden::new(limit),
            aliases,
            lineage,
        })
    }

    /// Its symbol as the symbol table spells it.
    pub fn symbol(&self) -> &str {
        &self.symbol
    }

    /// Its name for people: demangled, without hash.
    pub fn name(&self) -> &str {
        &self.shown
    }

    /// The address of its entry.
    pub fn address(&self) -> usize {
        self.address.get()
    }

    /// Its size in bytes (from its symbol).
    pub fn size(&self) -> usize {
        self.size
    }

    /// Whether `other` is a version of the same function (see [`Function::vouched_version_of`]).
    pub fn same_function_as(&self, other: &Function) -> bool {
        self.lineage == other.lineage
    }

    pub(crate) fn lineage(&self) -> &Lineage {
        &self.lineage
    }

    /// Bytes from the entry up to the next symbol or the end of its code.
    pub(crate) fn room(&self) -> usize {
        self.limit.get().saturating_sub(self.address())
    }

    /// The refusal for this function, with `reason`.
    pub(crate) fn refuse(&self, reason: impl Into<String>) -> Error {
        Error::new(ErrorKind::NotRedirectable {
            function: self.shown.clone(),
            address: self.address(),
            reason: reason.into(),
        })
    }

    /// Refuses a function that shares its address with other functions: a jump at the entry,
    /// or a retargeted call, would change them too.
    pub(crate) fn check_not_aliased(&self) -> Result<()> {
        if self.aliases.is_empty() {
            return Ok(());
        }
        Err(self.refuse(format!(
            "it shares its address with {} (functions the compiler merged): redirecting it \
             would redirect them too",
            self.aliases
                .iter()
                .map(|a| format!("`{a}`"))
                .collect::<Vec<_>>()
                .join(", ")
        )))
    }

    /// Refuses `other` unless it is a version of the same function.
    pub(crate) fn check_version(&self, other: &Function) -> Result<()> {
        if self.lineage == other.lineage {
            return Ok(());
        }
        Err(invalid(format!(
            "`{}` is {}, not {}: calls of one cannot be sent to the other",
            other.shown, other.lineage, self.lineage
        )))
    }
}

impl fmt::Display for Function {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` ({:#x})", self.shown, self.address())
    }
}
